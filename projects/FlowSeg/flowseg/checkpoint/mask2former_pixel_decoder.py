"""Hugging Face ``Mask2Former*`` pixel-decoder weights -> FlowSeg's ``MSDeformAttnPixelDecoder``.

FlowSeg's pixel decoder uses the original (Detectron2) Mask2Former names, so an original
Mask2Former checkpoint needs only its ``sem_seg_head.pixel_decoder.`` prefix; the Hugging Face
port renamed the modules. Mapping (HF, relative to ``pixel_level_module.decoder.`` -> FlowSeg):

==========================================  =============================================
``level_embed``                             ``transformer.level_embed``
``input_projections.{i}.{0,1}.*``           ``input_proj.{i}.{0,1}.*`` (conv, GroupNorm)
``encoder.layers.{n}.self_attn.*``          ``transformer.encoder.layers.{n}.self_attn.*``
``encoder.layers.{n}.self_attn_layer_norm`` ``transformer.encoder.layers.{n}.norm1``
``encoder.layers.{n}.fc1`` / ``fc2``        ``transformer.encoder.layers.{n}.linear1`` / ``linear2``
``encoder.layers.{n}.final_layer_norm``     ``transformer.encoder.layers.{n}.norm2``
``mask_projection.*``                       ``mask_features.*``
``adapter_{k}.0.weight`` / ``adapter_{k}.1.*``  ``adapter_{k}.weight`` / ``adapter_{k}.norm.*``
``layer_{k}.0.weight`` / ``layer_{k}.1.*``      ``layer_{k}.weight`` / ``layer_{k}.norm.*``
==========================================  =============================================

The level order is the same on both sides (index 0 = coarsest level, ``adapter_1`` = finest).
"""

import re
from typing import Dict, Mapping

from torch import Tensor

__all__ = ["HF_PIXEL_DECODER_PREFIX", "convert_hf_mask2former_pixel_decoder"]

HF_PIXEL_DECODER_PREFIX = "pixel_level_module.decoder."

# (pattern on the HF key relative to the decoder, replacement in FlowSeg's naming)
_RULES = [
    (r"^level_embed$", r"transformer.level_embed"),
    (r"^input_projections\.(\d+)\.([01])\.(weight|bias)$", r"input_proj.\1.\2.\3"),
    (
        r"^encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(weight|bias)$",
        r"transformer.encoder.layers.\1.self_attn.\2.\3",
    ),
    (
        r"^encoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$",
        r"transformer.encoder.layers.\1.norm1.\2",
    ),
    (r"^encoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"transformer.encoder.layers.\1.linear1.\2"),
    (r"^encoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"transformer.encoder.layers.\1.linear2.\2"),
    (r"^encoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"transformer.encoder.layers.\1.norm2.\2"),
    (r"^mask_projection\.(weight|bias)$", r"mask_features.\1"),
    # Detectron2's Conv2d holds its norm as `.norm`; HF uses Sequential(conv, norm[, relu]).
    (r"^(adapter|layer)_(\d+)\.0\.(weight|bias)$", r"\1_\2.\3"),
    (r"^(adapter|layer)_(\d+)\.1\.(weight|bias)$", r"\1_\2.norm.\3"),
]
_COMPILED = [(re.compile(p), r) for p, r in _RULES]


def _rename(key: str) -> str:
    for pattern, repl in _COMPILED:
        if pattern.match(key):
            return pattern.sub(repl, key)
    raise KeyError(f"unexpected key in the Hugging Face Mask2Former pixel decoder: {key!r}")


def convert_hf_mask2former_pixel_decoder(
    hf_state_dict: Mapping[str, Tensor], out_prefix: str = ""
) -> Dict[str, Tensor]:
    """Rename a Hugging Face Mask2Former pixel decoder's weights to FlowSeg's names.

    Args:
        hf_state_dict: a state dict of ``Mask2FormerModel`` (keys ``pixel_level_module.decoder.*``),
            ``Mask2FormerForUniversalSegmentation`` (``model.pixel_level_module.decoder.*``), or of the
            ``Mask2FormerPixelDecoder`` itself (keys without a prefix). Keys outside the pixel
            decoder (backbone, transformer module, ...) are ignored.
        out_prefix: prepended to every returned key, e.g. ``"sem_seg_head.pixel_decoder."`` for a
            whole-model state dict.

    Returns:
        ``{FlowSeg key: tensor}``, loadable into ``MSDeformAttnPixelDecoder`` with ``strict=True``.

    Raises:
        KeyError: for a decoder key with no known counterpart (a newer/different HF layout).
    """
    if any(HF_PIXEL_DECODER_PREFIX in k for k in hf_state_dict):
        items = {
            k.split(HF_PIXEL_DECODER_PREFIX, 1)[1]: v
            for k, v in hf_state_dict.items()
            if HF_PIXEL_DECODER_PREFIX in k
        }
    else:
        items = dict(hf_state_dict)
    return {out_prefix + _rename(k): v for k, v in items.items()}
