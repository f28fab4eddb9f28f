"""FlowSeg's components, named from state-dict keys: the unit of the load report and of freezing."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Dict, Iterable, List

__all__ = [
    "AUX_CLASSIFIER_PREFIX",
    "COMPONENTS",
    "LLM_PREFIX",
    "NEW_COMPONENTS",
    "PREDICTOR_PREFIX",
    "component_of",
    "group_keys_by_component",
]

#: Component id -> label used in the load report, in report order.
COMPONENTS: Dict[str, str] = OrderedDict(
    [
        ("segmentation_encoder", "segmentation encoder (SAM-ViT)"),
        ("pixel_decoder", "pixel decoder"),
        ("transformer_decoder", "transformer decoder"),
        ("transformer_decoder.bsf", "transformer decoder / BSF modules (SR, fusion gates, CR)"),
        ("transformer_decoder.condition_logits", "transformer decoder / condition-logit head"),
        ("transformer_decoder.class_head", "transformer decoder / class head (class_embed)"),
        ("aux_classifier", "auxiliary segment classifier (MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT)"),
        ("condition_head.llm_base", "condition head / LLM base weights"),
        ("condition_head.lora", "condition head / LoRA"),
        ("condition_head.token_rows", "condition head / new-token rows (<p>, </p>, <SEG>)"),
        ("condition_head.projectors", "condition head / projectors (phi_vis, phi_llm, SAM-token projector)"),
        ("condition_head.vision_tower", "condition head / vision tower"),
        ("condition_head", "condition head (other)"),
        ("refiner", "refiner (BAR)"),
        ("other", "other"),
    ]
)

PREDICTOR_PREFIX = "sem_seg_head.predictor."
AUX_CLASSIFIER_PREFIX = "sem_seg_head.aux_classifier."
LLM_PREFIX = "condition_head.llm."
#: FlowSeg's additions to X-SAM's scaffold: never in an X-SAM checkpoint.
NEW_COMPONENTS = ("transformer_decoder.bsf", "refiner")

_PROJECTOR_SCOPES = (
    "condition_head.vis_projector.",
    "condition_head.llm_projector.",
    "condition_head.sam_projector.",
)
_BSF_MODULES = ("semantic_cross_attention_layers", "fusion_gates", "condition_refinement_layers")
_CONDITION_LOGIT_MODULES = (
    "cond_query_proj",
    "no_object_embed",
    "background_embed",
    "logit_scale",
    "mask_position_proj",
)
# peft adapter tensors: lora_A/B, lora_embedding_A/B, DoRA's lora_magnitude_vector
_LORA_RE = re.compile(r"\.lora_[A-Za-z_]+\.")


def _predictor_component(key: str) -> str:
    module = key[len(PREDICTOR_PREFIX) :].split(".", 1)[0]
    if module in _BSF_MODULES:
        return "transformer_decoder.bsf"
    if module in _CONDITION_LOGIT_MODULES:
        return "transformer_decoder.condition_logits"
    if module == "class_embed":
        return "transformer_decoder.class_head"
    return "transformer_decoder"


def _llm_component(key: str) -> str:
    if _LORA_RE.search(key):
        return "condition_head.lora"
    if ".trainable_tokens_" in key:
        return "condition_head.token_rows"
    return "condition_head.llm_base"


def component_of(key: str) -> str:
    """The component id (a key of :data:`COMPONENTS`) of one FlowSeg state-dict key."""
    if key.startswith("backbone."):
        return "segmentation_encoder"
    if key.startswith("sem_seg_head.pixel_decoder."):
        return "pixel_decoder"
    if key.startswith(AUX_CLASSIFIER_PREFIX):
        return "aux_classifier"
    if key.startswith(PREDICTOR_PREFIX):
        return _predictor_component(key)
    if key.startswith(LLM_PREFIX):
        return _llm_component(key)
    if key.startswith(_PROJECTOR_SCOPES):
        return "condition_head.projectors"
    if key.startswith("condition_head.vision_encoder."):
        return "condition_head.vision_tower"
    if key.startswith("condition_head."):
        return "condition_head"
    if key.startswith("refiner."):
        return "refiner"
    return "other"


def group_keys_by_component(keys: Iterable[str]) -> Dict[str, List[str]]:
    """Group state-dict keys by FlowSeg component (non-empty groups only, in :data:`COMPONENTS` order).

    Ids: ``segmentation_encoder``, ``pixel_decoder``, ``transformer_decoder`` (and within it
    ``transformer_decoder.bsf``, ``.condition_logits``, ``.class_head``), ``condition_head.llm_base``,
    ``condition_head.lora``, ``condition_head.token_rows``, ``condition_head.projectors``,
    ``condition_head.vision_tower``, ``condition_head`` (other), ``refiner``, ``other``.
    """
    groups: Dict[str, List[str]] = {c: [] for c in COMPONENTS}
    for key in keys:
        groups[component_of(key)].append(key)
    return {c: sorted(v) for c, v in groups.items() if v}
