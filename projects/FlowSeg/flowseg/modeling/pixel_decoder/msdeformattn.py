"""Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al. 2022).

A deformable-attention transformer encoder runs over the coarsest feature levels
(1/8, 1/16, 1/32 by default); an FPN-style top-down path then adds the finer levels
(1/4) and a 1x1 conv gives the per-pixel mask embeddings. X-SAM's variant reads 1/8-1/32 only
and puts its one FPN level on the 1/8 input itself (``num_fpn_levels=1``): mask features at 1/8. Module and parameter names are
those of Mask2Former's ``MSDeformAttnPixelDecoder``, so an original Detectron2 Mask2Former
checkpoint's ``sem_seg_head.pixel_decoder.*`` weights load with an identity key mapping.
"""

import copy
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from torch import Tensor, nn

from ..registry import PIXEL_DECODER_REGISTRY
from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .ms_deform_attn import MSDeformAttn

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
]


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name == "relu":
        return F.relu
    if name == "gelu":
        return F.gelu
    if name == "glu":
        return F.glu
    raise ValueError(f"activation should be relu/gelu/glu, not {name}")


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
        self.activation = _activation(activation)
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


@PIXEL_DECODER_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Mask2Former's pixel decoder.

    ``forward_features(features)`` returns ``(mask_features, transformer_encoder_output,
    multi_scale_features)``: ``mask_features`` ``(B, mask_dim, H/common_stride, W/common_stride)``;
    ``transformer_encoder_output`` the encoder output at the coarsest level; and
    ``multi_scale_features`` the first ``maskformer_num_feature_levels`` (3) maps, ordered from
    low to high resolution (1/32, 1/16, 1/8 by default), each with ``conv_dim`` channels.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
        transformer_enc_n_points: int = 4,
        num_fpn_levels: int = -1,
    ):
        """
        Args:
            input_shape: channels and stride of each input feature.
            transformer_dropout: dropout in the deformable encoder.
            transformer_nheads: heads of the deformable attention.
            transformer_dim_feedforward: FFN width of the encoder layers.
            transformer_enc_layers: number of encoder layers.
            conv_dim: width of the encoder and of every output map.
            mask_dim: channels of ``mask_features``.
            norm: norm of the FPN convs (Detectron2 ``get_norm`` name or callable).
            transformer_in_features: features the deformable encoder reads.
            common_stride: stride of ``mask_features``.
            transformer_enc_n_points: sampling points per head and level.
            num_fpn_levels: top-down FPN levels; -1 = Mask2Former's rule (one per octave from the
                encoder's finest stride down to ``common_stride``, over the finer inputs);
                n >= 0 = the n finest inputs, which may include the encoder's finest level
                itself (X-SAM: n = 1 on the 1/8 input, so the mask features are at 1/8).
        """
        super().__init__()
        transformer_input_shape = {k: v for k, v in input_shape.items() if k in transformer_in_features}

        # All features, from high to low resolution (p2 -> p5).
        input_shape_sorted = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape_sorted]
        self.feature_strides = [v.stride for _, v in input_shape_sorted]
        self.feature_channels = [v.channels for _, v in input_shape_sorted]

        # The encoder's features (a subset), also from high to low resolution.
        transformer_shape_sorted = sorted(transformer_input_shape.items(), key=lambda x: x[1].stride)
        self.transformer_in_features = [k for k, _ in transformer_shape_sorted]
        transformer_in_channels = [v.channels for _, v in transformer_shape_sorted]
        self.transformer_feature_strides = [v.stride for _, v in transformer_shape_sorted]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        if self.transformer_num_feature_levels == 0:
            raise ValueError(f"none of transformer_in_features {transformer_in_features} is in the input")

        # One projection per encoder level, ordered low -> high resolution (p5 first), like
        # level_embed. GroupNorm(32) regardless of `norm`, as in the original.
        self.input_proj = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(c, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
                for c in transformer_in_channels[::-1]
            ]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
            enc_n_points=transformer_enc_n_points,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        self.maskformer_num_feature_levels = 3  # the transformer decoder always reads 3 scales
        self.common_stride = common_stride

        self.num_fpn_levels = self._fpn_levels(num_fpn_levels)

        lateral_convs = []
        output_convs = []
        use_bias = norm == ""
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(
                in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim)
            )
            output_conv = Conv2d(
                conv_dim,
                conv_dim,
                kernel_size=3,
                stride=1,
                padding=1,
                bias=use_bias,
                norm=get_norm(norm, conv_dim),
                activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            # Registered under Mask2Former's names; the lists below are plain lists so the
            # parameters appear once in the state dict.
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Top-down order (low to high resolution) for the forward loop.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    def _fpn_levels(self, requested: int) -> int:
        stride = min(self.transformer_feature_strides)
        if requested < 0:
            # FPN levels below the encoder's finest stride, down to common_stride.
            return max(int(round(math.log2(stride) - math.log2(self.common_stride))), 0)
        if requested > len(self.in_features):
            raise ValueError(f"num_fpn_levels={requested} but only {len(self.in_features)} input features")
        mask_stride = self.feature_strides[0] if requested > 0 else stride
        if mask_stride != self.common_stride:
            raise ValueError(
                f"num_fpn_levels={requested} gives mask features at stride {mask_stride}, but "
                f"common_stride (MODEL.SEM_SEG_HEAD.COMMON_STRIDE) is {self.common_stride}"
            )
        return requested

    @classmethod
    def from_config(cls, cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            # Mask2Former took the heads from MASK_FORMER.NHEADS and hard-coded FFN 1024 and
            # 4 points; the dedicated keys have the same defaults (8 / 1024 / 4).
            "transformer_nheads": head.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS,
            "transformer_dim_feedforward": head.DEFORMABLE_TRANSFORMER_ENCODER_DIM_FEEDFORWARD,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES,
            "common_stride": head.COMMON_STRIDE,
            "transformer_enc_n_points": head.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS,
            "num_fpn_levels": head.NUM_FPN_LEVELS,
        }

    def forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """
        Args:
            features: name -> ``(B, C, H, W)`` for every name in ``in_features``.

        Returns:
            ``(mask_features, transformer_encoder_output, multi_scale_features)``, see the class doc.
        """
        device_type = next(iter(features.values())).device.type
        # Deformable attention is run in float32 (as in Mask2Former): grid_sample's
        # bilinear weights and the offset normalisation are sensitive to half precision.
        with torch.autocast(device_type=device_type, enabled=False):
            return self._forward_features(features)

    def _forward_features(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        srcs = []
        pos = []
        # Low to high resolution, matching input_proj and level_embed.
        for idx, f in enumerate(self.transformer_in_features[::-1]):
            x = features[f].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))

        memory, _, _ = self.transformer(srcs, pos)
        bs = memory.shape[0]
        shapes = [(s.shape[2], s.shape[3]) for s in srcs]
        per_level = torch.split(memory, [h * w for h, w in shapes], dim=1)
        out = [z.transpose(1, 2).reshape(bs, -1, h, w) for z, (h, w) in zip(per_level, shapes)]

        # Top-down FPN over the finer levels (bilinear upsampling, as Mask2Former does).
        for idx, f in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[f].float()
            cur_fpn = self.lateral_convs[idx](x)
            y = cur_fpn + F.interpolate(
                out[-1], size=cur_fpn.shape[-2:], mode="bilinear", align_corners=False
            )
            out.append(self.output_convs[idx](y))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """Same as :meth:`forward_features` (Mask2Former's heads call that name)."""
        return self.forward_features(features)
