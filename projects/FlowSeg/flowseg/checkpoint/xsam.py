"""X-SAM checkpoints (``pytorch_model.bin`` of its stage 1, 2 or 3) -> FlowSeg's names.

X-SAM saves ``XSamModel.state_dict()``: the segmentor under ``segmentor.*`` (SAM's encoder with Hugging
Face ``SamVisionEncoder`` names, Hugging Face Mask2Former pixel decoder and transformer module, a class
head), the conv connector under ``seg_connector.*``, the background condition ``bg_embeds``, the three
projectors, the LLM under ``llm.*`` and SigLIP under ``vision_encoder.vision_model.*``. Two key
generations exist; the older one (X-SAM's first public releases, which the released Hugging Face
weights use) differs in three names only:

=====================================================  ============================================
current                                                older
=====================================================  ============================================
``vision_encoder.vision_model.*``                      ``visual_encoder.vision_model.*``
``segmentor.class_predictor.logit_scale``              ``segmentor.logit_scale``
``segmentor.class_predictor.predictor.{weight,bias}``  ``segmentor.class_predictor.{weight,bias}``
=====================================================  ============================================

Mapping to FlowSeg (paper configs, ``MODEL.SAM_VIT.FEATURE_PATH "connector"``):

* ``segmentor.encoder.*`` -> ``backbone.net.*`` and ``backbone.sam_neck.*``
  (:func:`~flowseg.checkpoint.sam.convert_sam_checkpoint`);
* ``seg_connector.model.{i}.model.{j}.*`` -> ``backbone.connector.{i}.{j}.*``;
* ``segmentor.pixel_decoder.*`` / ``segmentor.decoder.*`` -> ``sem_seg_head.pixel_decoder.*`` /
  ``sem_seg_head.predictor.*`` (the Hugging Face Mask2Former converters);
* the cosine head's ``logit_scale`` ([1]) -> the predictor's scalar ``logit_scale``; ``bg_embeds`` ->
  ``background_embed``; the stage-1 linear head -> ``class_embed``;
* ``visual_projector`` / ``llm_projector`` / ``seg_projector`` ``.model.{0,2}`` ->
  ``condition_head.{vis,llm,sam}_projector.{0,2}``;
* ``llm.*`` -> ``condition_head.llm.*`` (the checkpointer then matches peft's LoRA layout);
* SigLIP -> ``condition_head.vision_encoder.tower.vision_model.*``.

SAM's prompt positional table (``segmentor.shared_image_embedding``) has no FlowSeg counterpart and
is dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional

from torch import Tensor

from .mask2former_decoder import convert_hf_mask2former_transformer_decoder
from .mask2former_pixel_decoder import convert_hf_mask2former_pixel_decoder
from .sam import convert_sam_checkpoint

__all__ = [
    "XSamConversion",
    "convert_xsam_checkpoint",
    "is_xsam_checkpoint",
    "to_older_generation",
    "xsam_key_generation",
]

StateDict = Dict[str, Tensor]

_XSAM_SCOPES = (
    "segmentor.",
    "seg_connector.",
    "bg_embeds.",
    "visual_projector.",
    "llm_projector.",
    "seg_projector.",
)
_OLD_MARKERS = ("visual_encoder.", "segmentor.logit_scale")
_OLD_LINEAR_HEAD = ("segmentor.class_predictor.weight", "segmentor.class_predictor.bias")
_PREDICTOR = "sem_seg_head.predictor."
_SIGLIP_OUT = "condition_head.vision_encoder.tower."
_PROJECTORS = {
    "visual_projector": "vis_projector",
    "llm_projector": "llm_projector",
    "seg_projector": "sam_projector",
}
_CONNECTOR = re.compile(r"^seg_connector\.model\.(\d+)\.model\.(\d+)\.(weight|bias)$")
_PROJECTOR = re.compile(r"^(visual_projector|llm_projector|seg_projector)\.model\.(\d+)\.(weight|bias)$")
_DROPPED = ("segmentor.shared_image_embedding.",)


def is_xsam_checkpoint(keys: Iterable[str]) -> bool:
    """True when the key names are X-SAM's (any stage, either generation)."""
    return any(k.startswith(_XSAM_SCOPES) for k in keys)


def xsam_key_generation(keys: Iterable[str]) -> str:
    """``"older"`` (the released Hugging Face files) or ``"current"``, from the three renamed keys."""
    keys = list(keys)
    old = any(k.startswith(_OLD_MARKERS) or k in _OLD_LINEAR_HEAD for k in keys)
    return "older" if old else "current"


@dataclass
class XSamConversion:
    """What :func:`convert_xsam_checkpoint` did: ``converted`` maps each FlowSeg key to the X-SAM key
    it came from; ``dropped`` lists X-SAM keys without a FlowSeg counterpart; ``generation`` is
    :func:`xsam_key_generation`."""

    converted: Dict[str, str] = field(default_factory=dict)
    dropped: List[str] = field(default_factory=list)
    generation: str = "current"


def _strip(state_dict: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _siglip_target(rest: str, model_keys: Optional[set]) -> str:
    # FlowSeg's tower is a SiglipVisionModel (``vision_model.*``) when built from a vision config,
    # the bare transformer when a full SigLIP checkpoint was reduced to it.
    key = _SIGLIP_OUT + rest
    if model_keys is not None and key not in model_keys and rest.startswith("vision_model."):
        bare = _SIGLIP_OUT + rest[len("vision_model.") :]
        if bare in model_keys:
            return bare
    return key


def _segmentor(state_dict: Mapping[str, Tensor]) -> Dict[str, tuple]:
    """FlowSeg key -> (X-SAM key, tensor) for the segmentor's encoder, pixel decoder and decoder."""
    out: Dict[str, tuple] = {}
    for src, value in _strip(state_dict, "segmentor.encoder.").items():
        for dst, new in convert_sam_checkpoint({src: value}, "backbone.", neck_prefix="sam_neck").items():
            out[dst] = ("segmentor.encoder." + src, new)
    for scope, convert in (
        (
            "segmentor.pixel_decoder.",
            lambda sd: convert_hf_mask2former_pixel_decoder(sd, "sem_seg_head.pixel_decoder."),
        ),
        ("segmentor.decoder.", lambda sd: convert_hf_mask2former_transformer_decoder(sd, prefix=_PREDICTOR)),
    ):
        part = _strip(state_dict, scope)
        if part:
            for dst, value in convert(part).items():
                out[dst] = (scope + "*", value)
    return out


def convert_xsam_checkpoint(
    state_dict: Mapping[str, Tensor], model_keys: Optional[Iterable[str]] = None
) -> tuple[StateDict, XSamConversion]:
    """Rename an X-SAM state dict (either generation, any stage) to FlowSeg's names.

    Args:
        state_dict: ``XSamModel.state_dict()`` as X-SAM's ``pytorch_model.bin`` holds it.
        model_keys: the target model's state-dict keys, to pick the vision tower's layout (optional).

    Returns:
        ``(state_dict, conversion)``; unknown keys are kept under their own name so that loading
        reports them as unexpected.
    """
    model_keys = set(model_keys) if model_keys is not None else None
    info = XSamConversion(generation=xsam_key_generation(state_dict))
    out: StateDict = {}

    def put(dst: str, src: str, value: Tensor) -> None:
        if dst in out:
            raise ValueError(f"X-SAM keys {info.converted[dst]!r} and {src!r} both map to {dst!r}")
        out[dst], info.converted[dst] = value, src

    for dst, (src, value) in _segmentor(state_dict).items():
        put(dst, src, value)
    for key, value in state_dict.items():
        if key.startswith(("segmentor.encoder.", "segmentor.pixel_decoder.", "segmentor.decoder.")):
            continue
        if key.startswith(_DROPPED):
            info.dropped.append(key)
        elif key in ("segmentor.class_predictor.logit_scale", "segmentor.logit_scale"):
            put(_PREDICTOR + "logit_scale", key, value.reshape(()))
        elif re.fullmatch(r"segmentor\.class_predictor\.(predictor\.)?(weight|bias)", key):
            put(_PREDICTOR + "class_embed." + key.rsplit(".", 1)[1], key, value)
        elif key == "bg_embeds.weight":
            put(_PREDICTOR + "background_embed.weight", key, value)
        elif (m := _CONNECTOR.match(key)) is not None:
            put(f"backbone.connector.{m[1]}.{m[2]}.{m[3]}", key, value)
        elif (m := _PROJECTOR.match(key)) is not None:
            put(f"condition_head.{_PROJECTORS[m[1]]}.{m[2]}.{m[3]}", key, value)
        elif key.startswith("llm."):
            put("condition_head." + key, key, value)
        elif key.startswith(("vision_encoder.", "visual_encoder.")):
            put(_siglip_target(key.split(".", 1)[1], model_keys), key, value)
        else:
            out[key] = value  # reported as unexpected by the checkpointer
    return out, info


def to_older_generation(state_dict: Mapping[str, Tensor]) -> StateDict:
    """The same weights under the older generation's names (the released files' layout); the
    inverse of X-SAM's own checkpoint converters, for tests and for writing older-layout files."""
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("vision_encoder."):
            key = "visual_encoder." + key[len("vision_encoder.") :]
        elif key == "segmentor.class_predictor.logit_scale":
            key = "segmentor.logit_scale"
        elif key.startswith("segmentor.class_predictor.predictor."):
            key = "segmentor.class_predictor." + key.rsplit(".", 1)[1]
        out[key] = value
    return out
