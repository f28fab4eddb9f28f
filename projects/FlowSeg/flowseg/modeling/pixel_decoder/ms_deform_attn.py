"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021) in plain PyTorch.

The original implementation ships a CUDA kernel; this one samples with ``F.grid_sample`` so
that it runs on any device without a compiled extension. The module keeps the original
parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``, ``output_proj``)
so that Deformable-DETR / Mask2Former checkpoints load with an identity key mapping.
"""

import math
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MSDeformAttn", "ms_deform_attn_core_pytorch"]

SpatialShapes = Union[Tensor, Sequence[Tuple[int, int]]]


def _shapes_as_list(spatial_shapes: SpatialShapes) -> List[Tuple[int, int]]:
    # Python ints are needed for split/reshape; a tensor is read once here.
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.tolist()
    return [(int(h), int(w)) for h, w in spatial_shapes]


def ms_deform_attn_core_pytorch(
    value: Tensor,
    spatial_shapes: SpatialShapes,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Weighted sum of bilinearly sampled values over levels and points.

    Args:
        value: ``(N, S, M, D)``: ``S = sum_l H_l * W_l`` flattened values of ``M`` heads.
        spatial_shapes: ``(L, 2)`` tensor or list of ``(H_l, W_l)``, in the order of ``value``.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)`` in ``[0, 1]``
            (0 = left/top edge, 1 = right/bottom edge of the feature map).
        attention_weights: ``(N, Lq, M, L, P)``.

    Returns:
        ``(N, Lq, M * D)``.

    Sampling is bilinear with zero padding and ``align_corners=False``, which is what the
    original CUDA kernel computes (pixel centres at ``(i + 0.5) / size``).
    """
    n, _, n_heads, head_dim = value.shape
    _, n_queries, _, n_levels, n_points, _ = sampling_locations.shape
    shapes = _shapes_as_list(spatial_shapes)
    if len(shapes) != n_levels:
        raise ValueError(f"{len(shapes)} spatial shapes given for {n_levels} sampling levels")
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    # grid_sample expects coordinates in [-1, 1].
    grids = 2.0 * sampling_locations - 1.0
    # (N, Lq, M, L, P) -> (N*M, 1, Lq, L, P), broadcast over channels.
    weights = attention_weights.transpose(1, 2).reshape(n * n_heads, 1, n_queries, n_levels, n_points)
    out = None
    for lvl, (h, w) in enumerate(shapes):
        # (N, H*W, M, D) -> (N*M, D, H, W): one "image" per (batch, head).
        v = value_per_level[lvl].permute(0, 2, 3, 1).reshape(n * n_heads, head_dim, h, w)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(n * n_heads, n_queries, n_points, 2)
        # (N*M, D, Lq, P); accumulated level by level rather than stacked, to save memory.
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights[..., lvl, :]).sum(-1)
        out = term if out is None else out + term
    out = out.view(n, n_heads * head_dim, n_queries)
    return out.transpose(1, 2).contiguous()


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention module (same interface as Deformable DETR's).

    Args:
        d_model: hidden dimension.
        n_levels: number of feature levels.
        n_heads: number of attention heads.
        n_points: sampling points per head and level.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, but got {d_model} and {n_heads}")
        if not _is_power_of_2(d_model // n_heads):
            # Only the CUDA kernel cared; kept so that configs behave as with the original.
            warnings.warn(
                "MSDeformAttn: a power-of-2 dimension per head is what the original CUDA kernel "
                "was tuned for (the PyTorch path works with any size).",
                stacklevel=2,
            )
        # Unused here (no im2col kernel); kept for attribute compatibility with the original.
        self.im2col_step = 64

        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)

        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Deformable DETR's init: each head starts looking in its own direction
        # (evenly spaced angles), point k of a head at distance k+1 pixels; uniform weights.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid_init = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid_init = grid_init / grid_init.abs().max(-1, keepdim=True)[0]
        grid_init = grid_init.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid_init = grid_init * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid_init.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        input_flatten: Tensor,
        input_spatial_shapes: SpatialShapes,
        input_level_start_index: Optional[Tensor] = None,
        input_padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` normalised ``(x, y)`` in ``[0, 1]`` (padding
                included), or ``(N, Lq, L, 4)`` reference boxes ``(cx, cy, w, h)``.
            input_flatten: ``(N, sum_l H_l*W_l, C)``.
            input_spatial_shapes: ``(L, 2)`` ``(H_l, W_l)`` per level.
            input_level_start_index: ``(L,)``; unused by the PyTorch path (the split is derived
                from the shapes), accepted for interface compatibility.
            input_padding_mask: ``(N, sum_l H_l*W_l)``, True at padding positions.

        Returns:
            ``(N, Lq, C)``.
        """
        n, len_q, _ = query.shape
        _, len_in, _ = input_flatten.shape
        shapes = _shapes_as_list(input_spatial_shapes)
        if sum(h * w for h, w in shapes) != len_in:
            raise ValueError(f"spatial shapes {shapes} do not add up to the input length {len_in}")

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, len_in, self.n_heads, self.d_model // self.n_heads)
        sampling_offsets = self.sampling_offsets(query).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points, 2
        )
        attention_weights = self.attention_weights(query).view(
            n, len_q, self.n_heads, self.n_levels * self.n_points
        )
        # Softmax jointly over all levels and points of a head.
        attention_weights = F.softmax(attention_weights, -1).view(
            n, len_q, self.n_heads, self.n_levels, self.n_points
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: normalise by (W, H).
            offset_normalizer = torch.tensor(
                [[w, h] for h, w in shapes], dtype=query.dtype, device=query.device
            )
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + sampling_offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + sampling_offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"Last dim of reference_points must be 2 or 4, but got {reference_points.shape[-1]}"
            )
        output = ms_deform_attn_core_pytorch(value, shapes, sampling_locations, attention_weights)
        return self.output_proj(output)
