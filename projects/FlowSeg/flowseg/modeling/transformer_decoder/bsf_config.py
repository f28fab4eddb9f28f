"""The BSF decoder's arguments from a config, and which parts of Bidirectional Semantic Flow it
switches on (FlowSeg §3.3, Table 11)."""

from __future__ import annotations

import logging
from typing import Any, Dict

from detectron2.config import CfgNode

from ...config import llm_configured
from .prediction_heads import CONDITION_LOGIT_TYPES

__all__ = ["bsf_decoder_config", "bsf_switches", "check_bsf_arguments"]

logger = logging.getLogger(__name__)


def bsf_decoder_config(cfg: CfgNode, in_channels: int, mask_classification: bool) -> Dict[str, Any]:
    """``BSFTransformerDecoder``'s constructor arguments from ``cfg`` (its ``from_config``)."""
    mf = cfg.MODEL.MASK_FORMER
    fs = cfg.MODEL.FLOWSEG
    return {
        "in_channels": in_channels,
        "mask_classification": mask_classification,
        "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        "hidden_dim": mf.HIDDEN_DIM,
        "num_queries": mf.NUM_OBJECT_QUERIES,
        "nheads": mf.NHEADS,
        "dim_feedforward": mf.DIM_FEEDFORWARD,
        "dec_layers": mf.DEC_LAYERS,  # = L (no "-1": see the bsf_decoder module docstring)
        "pre_norm": mf.PRE_NORM,
        "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        "enforce_input_project": mf.ENFORCE_INPUT_PROJ,
        **bsf_switches(cfg),
        "condition_logit_type": fs.CONDITION_LOGITS,
        "add_seg_embed_to_queries": fs.ADD_SEG_EMBED_TO_QUERIES,
        "logit_scale_init": fs.LOGIT_SCALE_INIT,
        "cr_zero_init": fs.CR_ZERO_INIT,
        "gate_bias_init": fs.GATE_BIAS_INIT,
        "mask_position_logits": fs.MASK_POSITION_LOGITS,
    }


def check_bsf_arguments(sr: bool, cr: bool, visual: bool, dec_layers: int, condition_logit_type: str) -> None:
    """Reject switch combinations that Algorithm 1 does not define."""
    if visual and not sr:
        raise ValueError("visual_cross_attn_control uses the SR modules: set semantic_refinement=True")
    if visual and cr:
        raise ValueError("visual_cross_attn_control is defined with condition_refinement=False (Table 11)")
    if dec_layers < 1:
        raise ValueError(f"dec_layers must be >= 1, got {dec_layers}")
    if condition_logit_type not in CONDITION_LOGIT_TYPES:
        raise ValueError(
            f"condition_logit_type (MODEL.FLOWSEG.CONDITION_LOGITS) must be one of "
            f"{CONDITION_LOGIT_TYPES}, got {condition_logit_type!r}"
        )


def bsf_switches(cfg: CfgNode) -> Dict[str, bool]:
    """The decoder's SR / CR / visual-control / condition-logit switches for ``cfg``'s mode."""
    fs = cfg.MODEL.FLOWSEG
    mode = fs.MODE
    if mode not in ("generic", "referring"):
        raise ValueError(f"MODEL.FLOWSEG.MODE must be 'generic' or 'referring', got {mode!r}")

    sr = bool(fs.SEMANTIC_REFINEMENT)
    cr = bool(fs.CONDITION_REFINEMENT)
    visual = bool(fs.VISUAL_CROSS_ATTN_CONTROL)
    has_llm = llm_configured(cfg)
    if mode == "generic" and not has_llm:
        # Stage-1 segmentor: there is no LLM, hence no conditions to flow.
        if sr or cr or visual:
            logger.info(
                "BSFTransformerDecoder: MODE='generic' without an LLM (MODEL.LLM.PATH and CONFIG empty): "
                "semantic/condition refinement switched off, class head = class_embed."
            )
        sr = cr = visual = False
    if visual:
        if cr:
            logger.info("BSFTransformerDecoder: VISUAL_CROSS_ATTN_CONTROL on -> CONDITION_REFINEMENT off.")
        if not sr:
            logger.info(
                "BSFTransformerDecoder: VISUAL_CROSS_ATTN_CONTROL on -> SR modules read pixel features."
            )
        sr, cr = True, False
    return {
        "semantic_refinement": sr,
        "condition_refinement": cr,
        "visual_cross_attn_control": visual,
        "condition_logits": mode == "referring" or has_llm,
    }
