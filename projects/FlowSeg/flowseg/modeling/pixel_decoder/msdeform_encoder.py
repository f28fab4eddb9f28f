"""Deformable DETR's transformer encoder (Zhu et al. 2021), the first half of Mask2Former's
pixel decoder: post-norm layers of multi-scale deformable self-attention and an FFN over the
flattened feature levels. Module names are Mask2Former's (``transformer.encoder.layers.N.*``).
"""

import copy
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..transformer_decoder.layers import activation_fn
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoderOnly",
]


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a 2-layer FFN."""

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = activation_fn(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        pos: Optional[Tensor],
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        # Position enters the query only; values are sampled from the plain features.
        query = src if pos is None else src + pos
        src2 = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class MSDeformAttnTransformerEncoder(nn.Module):
    """A stack of ``num_layers`` independent copies of ``encoder_layer``."""

    def __init__(self, encoder_layer: MSDeformAttnTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(spatial_shapes: Tensor, valid_ratios: Tensor, device: torch.device) -> Tensor:
        """Pixel centres of every level, normalised to ``[0, 1]`` of the valid area.

        Returns ``(N, sum_l H_l*W_l, L, 2)`` as ``(x, y)``: each query's centre expressed in
        every level's normalised coordinates.
        """
        reference_points_list = []
        for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            reference_points_list.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(reference_points_list, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        pos: Optional[Tensor] = None,
        padding_mask: Optional[Tensor] = None,
    ) -> Tensor:
        output = src
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable DETR's encoder over a list of feature maps (no decoder)."""

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        encoder_layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = MSDeformAttnTransformerEncoder(encoder_layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # The xavier pass above overwrote the deformable-attention init: redo it.
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """``(B, H, W)`` padding mask -> ``(B, 2)`` valid fraction as ``(w, h)``."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)

    def forward(self, srcs: List[Tensor], pos_embeds: List[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """
        Args:
            srcs: per level ``(B, d_model, H_l, W_l)``, in the order of ``level_embed``.
            pos_embeds: matching position embeddings.

        Returns:
            memory ``(B, sum_l H_l*W_l, d_model)``, spatial_shapes ``(L, 2)``,
            level_start_index ``(L,)``.
        """
        # Inputs are never padded here (Detectron2 pads images, Mask2Former ignores that).
        masks = [
            torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs
        ]
        src_flatten = []
        mask_flatten = []
        lvl_pos_embed_flatten = []
        spatial_shapes_list = []
        for lvl, (src, mask, pos_embed) in enumerate(zip(srcs, masks, pos_embeds)):
            spatial_shapes_list.append((src.shape[2], src.shape[3]))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            lvl_pos_embed_flatten.append(
                pos_embed.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
            )
        src_flat = torch.cat(src_flatten, 1)
        mask_flat = torch.cat(mask_flatten, 1)
        pos_flat = torch.cat(lvl_pos_embed_flatten, 1)
        spatial_shapes = torch.as_tensor(spatial_shapes_list, dtype=torch.long, device=src_flat.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flat, spatial_shapes, level_start_index, valid_ratios, pos_flat, mask_flat)
        return memory, spatial_shapes, level_start_index
