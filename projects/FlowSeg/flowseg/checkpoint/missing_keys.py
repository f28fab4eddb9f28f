"""Which model tensors a checkpoint is expected not to have, and why.

Absences a stage transition explains (BSF + BAR + condition head when stage 3 starts from a
stage-1 checkpoint; LLM / vision-tower weights that come from ``MODEL.LLM.PATH`` /
``MODEL.VANILLA_ENCODER.PATH``; parts a SAM, Mask2Former or X-SAM checkpoint does not have) get a
reason; any other absence is a real mismatch.
"""

from __future__ import annotations

from typing import Callable, Optional, Set

from detectron2.config import CfgNode
from torch import nn

from .components import NEW_COMPONENTS

__all__ = ["is_pretrained", "missing_reason"]

# Missing components a FlowSeg checkpoint of an earlier stage explains, when it has none of their keys.
_STAGE_REASONS = {
    "transformer_decoder.bsf": "Bidirectional Semantic Flow is introduced in stage 3 (paper A.3): new modules",
    "refiner": "BAR is introduced in stage 3 (paper A.3): new module",
    "transformer_decoder.condition_logits": (
        "query-condition similarity replaces the class head of a checkpoint trained without an LLM"
    ),
    "transformer_decoder.class_head": "the checkpoint classified by condition similarity: new class head",
    "condition_head.lora": "LoRA starts from its initialisation (B = 0: the base LLM unchanged)",
    "condition_head.projectors": "checkpoint without a condition head: projectors start fresh (stage 2 trains them)",
    "condition_head": "checkpoint without a condition head",
}


def _hf_pretrained(module: Optional[nn.Module]) -> bool:
    """Whether a transformers model was loaded with ``from_pretrained`` from a weights folder (a
    model built ``from_config`` remembers the config json, or nothing, as its name)."""
    if module is None:
        return False
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    name = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    return bool(name) and not name.endswith(".json")


def is_pretrained(which: str, cfg: Optional[CfgNode], model: nn.Module) -> bool:
    """Whether the ``"llm"`` (else: the vision tower) has pretrained weights of its own: a path in
    ``cfg``, or without a config, read off the model's transformers modules."""
    if cfg is not None:
        node = cfg.MODEL.LLM if which == "llm" else cfg.MODEL.VANILLA_ENCODER
        return bool(node.PATH)
    head = getattr(model, "condition_head", None)
    if which == "llm":
        return _hf_pretrained(getattr(head, "llm", None))
    return _hf_pretrained(getattr(getattr(head, "vision_encoder", None), "tower", None))


def missing_reason(
    component: str, key: str, present: Set[str], fmt: str, neck: str, pretrained: Callable[[str], bool]
) -> str:
    """Why model key ``key`` (of ``component``) is expected to be missing ("" = it is not).

    ``present``: the components the checkpoint has keys of; ``fmt``: its source format; ``neck``:
    where the model receives SAM's neck; ``pretrained("llm" / "vision")``: :func:`is_pretrained`.
    """
    if fmt == "xsam" and component in NEW_COMPONENTS:
        return "FlowSeg's addition to X-SAM's scaffold (BSF / BAR): newly initialised"
    if fmt == "sam":
        if component != "segmentation_encoder":
            return "not part of a SAM image-encoder checkpoint"
        if not key.startswith(("backbone.net.", f"backbone.{neck}.")):
            return (
                "feature-path layers SAM has no weights for (pyramid stages other than its neck, connector)"
            )
        return ""
    if fmt.startswith("mask2former"):
        if component == "segmentation_encoder":
            return "a Mask2Former checkpoint has no SAM encoder (load it with MODEL.SAM_VIT.CHECKPOINT)"
        if component in ("pixel_decoder", "transformer_decoder") or component in present:
            return ""
        return "not part of a Mask2Former checkpoint"
    if component in present:
        return ""  # partly there: a real mismatch
    if component == "condition_head.llm_base":
        return "loaded from MODEL.LLM.PATH" if pretrained("llm") else ""
    if component == "condition_head.vision_tower":
        return "loaded from MODEL.VANILLA_ENCODER.PATH" if pretrained("vision") else ""
    if component == "condition_head.token_rows":
        if "condition_head.llm_base" not in present and pretrained("llm"):
            return "initialised with the LLM from MODEL.LLM.PATH (mean embedding row)"
        return ""
    return _STAGE_REASONS.get(component, "")
