# Modules of this subpackage are imported here so that importing flowseg registers them.
from detectron2.config import CfgNode
from torch import nn

from ..registry import TRANSFORMER_DECODER_REGISTRY
from .bsf_decoder import PADDED_CONDITION_LOGIT, BSFTransformerDecoder


def build_transformer_decoder(cfg: CfgNode, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the transformer decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``."""
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


__all__ = ["BSFTransformerDecoder", "PADDED_CONDITION_LOGIT", "build_transformer_decoder"]
