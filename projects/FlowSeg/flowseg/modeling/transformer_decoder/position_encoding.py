"""Sine position embedding for 2-D feature maps (DETR / Mask2Former)."""

import math
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine embedding of (y, x) pixel positions, as in DETR and Mask2Former.

    Output channels are ``2 * num_pos_feats``: the first half encodes y, the second x, each
    interleaving sin (even channels) and cos (odd channels). With ``normalize=True`` positions
    are ``cumsum / total * scale`` (no -0.5 shift: that is Deformable DETR's variant, not
    Mask2Former's).

    Args:
        num_pos_feats: channels per coordinate.
        temperature: wavelength base.
        normalize: map positions to ``(0, scale]`` before embedding.
        scale: only with ``normalize``; defaults to ``2 * pi``.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: float = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            x: ``(B, C, H, W)``; only its shape, device and dtype are used.
            mask: ``(B, H, W)`` bool, True at padding; None = no padding.

        Returns:
            ``(B, 2 * num_pos_feats, H, W)`` in ``x``'s floating dtype (computed in float32).
        """
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        not_mask = ~mask
        # float32 regardless of x: sin/cos of large arguments lose too much in half precision.
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale

        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats)

        pos_x = x_embed[:, :, :, None] / dim_t
        pos_y = y_embed[:, :, :, None] / dim_t
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
        # The original returns float32 always; casting keeps a model run wholly in bf16/fp16
        # consistent and is a no-op for float32 inputs.
        return pos.to(x.dtype) if x.is_floating_point() else pos

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
