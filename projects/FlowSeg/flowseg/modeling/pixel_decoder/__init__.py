# Modules of this subpackage are imported here so that importing flowseg registers them.
from typing import Dict

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from torch import nn

from ..registry import PIXEL_DECODER_REGISTRY
from .ms_deform_attn import MSDeformAttn, ms_deform_attn_core_pytorch
from .msdeformattn import MSDeformAttnPixelDecoder, MSDeformAttnTransformerEncoderOnly


def build_pixel_decoder(cfg: CfgNode, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build the pixel decoder named by ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME``.

    The decoder must have ``forward_features(features)`` returning
    ``(mask_features, transformer_encoder_output, multi_scale_features)``.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = PIXEL_DECODER_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"pixel decoder {name} has no forward_features(features); the transformer decoder needs it"
        )
    return model


__all__ = [
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "build_pixel_decoder",
    "ms_deform_attn_core_pytorch",
]
