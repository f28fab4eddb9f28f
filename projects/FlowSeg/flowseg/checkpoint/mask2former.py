"""Start FlowSeg's segmentor from a Mask2Former checkpoint.

Two sources: an original Mask2Former Detectron2 checkpoint (``sem_seg_head.pixel_decoder.*``,
``sem_seg_head.predictor.*`` — the same names FlowSeg uses) and a Hugging Face
``Mask2FormerModel`` / ``Mask2FormerForUniversalSegmentation`` state dict. Either way the
backbone is left out: FlowSeg's segmentation encoder is SAM-ViT.
"""

from typing import Dict, Mapping, Optional

from torch import Tensor

from .formats import detect_checkpoint_format
from .mask2former_decoder import convert_d2_mask2former_checkpoint, convert_hf_mask2former_transformer_decoder
from .mask2former_pixel_decoder import convert_hf_mask2former_pixel_decoder

PIXEL_DECODER_PREFIX = "sem_seg_head.pixel_decoder."
PREDICTOR_PREFIX = "sem_seg_head.predictor."

__all__ = ["convert_hf_mask2former", "convert_d2_mask2former_checkpoint", "convert_mask2former_checkpoint"]


def convert_hf_mask2former(hf_state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """Hugging Face Mask2Former -> FlowSeg keys (``sem_seg_head.*``); the Swin backbone is dropped."""
    out = convert_hf_mask2former_pixel_decoder(hf_state_dict, out_prefix=PIXEL_DECODER_PREFIX)
    out.update(convert_hf_mask2former_transformer_decoder(hf_state_dict, prefix=PREDICTOR_PREFIX))
    return out


def convert_mask2former_checkpoint(
    state_dict: Mapping[str, Tensor], num_classes: Optional[int] = None
) -> Dict[str, Tensor]:
    """Either format, told apart by :func:`~.formats.detect_checkpoint_format` (anything but a
    Hugging Face layout is read as an original Detectron2 checkpoint)."""
    if detect_checkpoint_format(state_dict) == "mask2former_hf":
        return convert_hf_mask2former(state_dict)
    return convert_d2_mask2former_checkpoint(dict(state_dict), num_classes=num_classes)
