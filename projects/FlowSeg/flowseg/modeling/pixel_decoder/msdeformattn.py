"""Mask2Former's multi-scale deformable-attention pixel decoder (Cheng et al. 2022).

A deformable-attention transformer encoder (:mod:`.msdeform_encoder`) runs over the coarsest
feature levels (1/8, 1/16, 1/32 by default); an FPN-style top-down path then adds the finer
levels (1/4) and a 1x1 conv gives the per-pixel mask embeddings. X-SAM's variant reads 1/8-1/32
only and puts its one FPN level on the 1/8 input itself (``num_fpn_levels=1``): mask features at
1/8. Module and parameter names are those of Mask2Former's ``MSDeformAttnPixelDecoder``, so an
original Detectron2 Mask2Former checkpoint's ``sem_seg_head.pixel_decoder.*`` weights load with an
identity key mapping.
"""

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
from .msdeform_encoder import (
    MSDeformAttnTransformerEncoder,
    MSDeformAttnTransformerEncoderLayer,
    MSDeformAttnTransformerEncoderOnly,
)

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoder",
    "MSDeformAttnTransformerEncoderLayer",
]


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
        transformer_in_channels = self._read_input_shapes(input_shape, transformer_in_features)
        self._build_input_proj(transformer_in_channels, conv_dim)
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
        self._build_fpn(conv_dim, norm)

    def _read_input_shapes(
        self, input_shape: Dict[str, ShapeSpec], transformer_in_features: List[str]
    ) -> List[int]:
        """Sets the names / strides / channels of all inputs and of the encoder's inputs (both from
        high to low resolution); returns the encoder inputs' channels."""
        transformer_input_shape = {k: v for k, v in input_shape.items() if k in transformer_in_features}

        # All features, from high to low resolution (p2 -> p5).
        input_shape_sorted = sorted(input_shape.items(), key=lambda x: x[1].stride)
        self.in_features = [k for k, _ in input_shape_sorted]
        self.feature_strides = [v.stride for _, v in input_shape_sorted]
        self.feature_channels = [v.channels for _, v in input_shape_sorted]

        # The encoder's features (a subset), also from high to low resolution.
        transformer_shape_sorted = sorted(transformer_input_shape.items(), key=lambda x: x[1].stride)
        self.transformer_in_features = [k for k, _ in transformer_shape_sorted]
        self.transformer_feature_strides = [v.stride for _, v in transformer_shape_sorted]
        self.transformer_num_feature_levels = len(self.transformer_in_features)
        if self.transformer_num_feature_levels == 0:
            raise ValueError(f"none of transformer_in_features {transformer_in_features} is in the input")
        return [v.channels for _, v in transformer_shape_sorted]

    def _build_input_proj(self, transformer_in_channels: List[int], conv_dim: int) -> None:
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

    def _build_fpn(self, conv_dim: int, norm: Optional[Union[str, Callable]]) -> None:
        """Lateral 1x1 and output 3x3 convs of the ``num_fpn_levels`` finest inputs."""
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
        if device_type == "meta":  # shapes only (FLOP counting): there is no autocast to leave
            return self._forward_features(features)
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
