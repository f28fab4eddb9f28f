"""The source format of a checkpoint, recognised by its key names: the one detector every loader uses."""

from __future__ import annotations

from typing import Iterable

from .xsam import is_xsam_checkpoint

__all__ = ["detect_checkpoint_format"]

_FLOWSEG_MARKERS = ("backbone.net.", "backbone.simfp_", "condition_head.", "refiner.")
_SAM_SCOPES = ("image_encoder.", "vision_encoder.", "prompt_encoder.", "mask_decoder.")
_SAM_BARE_KEYS = ("patch_embed.proj.weight", "patch_embed.projection.weight")
_MASK2FORMER_HF_MODULES = ("transformer_module.", "pixel_level_module.")


def detect_checkpoint_format(keys: Iterable[str]) -> str:
    """``"flowseg"``, ``"xsam"``, ``"sam"``, ``"mask2former_hf"`` or ``"mask2former_d2"``, from the
    key names.

    FlowSeg's own names win (its vision tower lives under ``condition_head.vision_encoder``, a name
    SAM's Hugging Face port also uses at the top level), then X-SAM's (whose SigLIP is also under
    ``vision_encoder.``). Unknown layouts count as ``"flowseg"``:
    they are loaded by name and whatever does not match is reported.
    """
    keys = list(keys)
    if any(k.startswith(_FLOWSEG_MARKERS) for k in keys):
        return "flowseg"
    if is_xsam_checkpoint(keys):
        return "xsam"
    if any(k.startswith(_SAM_SCOPES) or k in _SAM_BARE_KEYS for k in keys):
        return "sam"
    if any(m in k for k in keys for m in _MASK2FORMER_HF_MODULES):
        return "mask2former_hf"
    if any(k.startswith("sem_seg_head.") for k in keys):
        return "mask2former_d2"
    return "flowseg"
