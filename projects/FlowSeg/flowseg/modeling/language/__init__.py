"""Condition head: vanilla (SigLIP2) encoder + φ_vis, LLM (+LoRA), φ_llm, prompts and special tokens."""

from ..registry import CONDITION_HEAD_REGISTRY
from .condition_head import LLMConditionHead
from .llm import LoraSettings, load_causal_lm, load_tokenizer, parse_dtype, setup_trainable
from .projector import MLPProjector, pool_spans
from .prompts import (
    DEFAULT_ANSWERS,
    IGNORE_INDEX,
    PROMPT_TEMPLATES,
    EncodedPrompt,
    build_instruction,
    build_turns,
    count_phrase_spans,
    encode_sample,
    ensure_phrase_markers,
    find_seg_position,
    find_spans,
    render_segments,
    shift_position,
)
from .tokens import (
    IMAGE,
    P_END,
    P_START,
    SEG,
    SPECIAL_TOKENS,
    SpecialTokenIds,
    add_special_tokens,
    check_user_text,
)
from .tokens import resize_token_embeddings as resize_token_embeddings
from .vanilla_encoder import VanillaEncoder, build_vision_tower


def build_condition_head(cfg):
    """Build the condition head named by ``cfg.MODEL.LLM.NAME`` from ``CONDITION_HEAD_REGISTRY``."""
    return CONDITION_HEAD_REGISTRY.get(cfg.MODEL.LLM.NAME)(cfg)


__all__ = [
    "DEFAULT_ANSWERS",
    "IGNORE_INDEX",
    "IMAGE",
    "P_END",
    "P_START",
    "PROMPT_TEMPLATES",
    "SEG",
    "SPECIAL_TOKENS",
    "EncodedPrompt",
    "LLMConditionHead",
    "LoraSettings",
    "MLPProjector",
    "SpecialTokenIds",
    "VanillaEncoder",
    "add_special_tokens",
    "build_condition_head",
    "build_instruction",
    "build_turns",
    "build_vision_tower",
    "check_user_text",
    "count_phrase_spans",
    "encode_sample",
    "ensure_phrase_markers",
    "find_seg_position",
    "find_spans",
    "load_causal_lm",
    "load_tokenizer",
    "parse_dtype",
    "pool_spans",
    "render_segments",
    "resize_token_embeddings",
    "setup_trainable",
    "shift_position",
]
