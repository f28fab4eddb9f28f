"""Which parts of a model an evaluation would run at their initialisation.

A checkpoint of another stage or task loads "cleanly" with its gaps explained (a stage-1 segmentor
checkpoint has no LLM, projectors or condition logits; a referring one has no class head), and
the load report logs them. Training from it is what stage transitions do; *evaluating* it scores
random weights. :func:`check_evaluation_weights` refuses that, naming the parts, unless
``TEST.ALLOW_UNTRAINED_PARTS`` is set.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional

from detectron2.config import CfgNode
from torch import nn

from .components import group_keys_by_component
from .report import LoadReport, _group_line
from .trainable import build_time_source

__all__ = ["UntrainedPartsError", "check_evaluation_weights", "untrained_parts"]

logger = logging.getLogger(__name__)

# Left at their initialisation on purpose: LoRA starts as the identity (B = 0, the base LLM
# unchanged) and the auxiliary segment classifier only adds a training loss.
_HARMLESS_AT_INIT = ("condition_head.lora", "aux_classifier")


class UntrainedPartsError(ValueError):
    """An evaluation would run parts of the model that no checkpoint or pretrained file set."""


def untrained_parts(model: nn.Module, cfg: CfgNode, report: Optional[LoadReport]) -> Dict[str, List[str]]:
    """Parameters of ``model`` still at their initialisation after the load ``report`` describes
    (``None``: nothing was loaded), by component: not in the checkpoint (or skipped for their
    shape) and not loaded at build time from a pretrained file the config names
    (``MODEL.LLM.PATH``, ``MODEL.VANILLA_ENCODER.PATH``, ``MODEL.SAM_VIT.CHECKPOINT``)."""
    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    params = [name for name, _ in model.named_parameters()]
    if report is not None:
        not_loaded = {k for keys in report.missing.values() for k in keys}
        not_loaded |= {k for k, _, _ in report.incorrect_shapes}
        params = [name for name in params if name in not_loaded]
    groups = group_keys_by_component(params)
    return {
        c: keys for c, keys in groups.items() if c not in _HARMLESS_AT_INIT and not build_time_source(c, cfg)
    }


def check_evaluation_weights(
    model: nn.Module, cfg: CfgNode, report: Optional[LoadReport], source: str = ""
) -> Dict[str, List[str]]:
    """Raise :class:`UntrainedPartsError` listing the :func:`untrained_parts` of ``model``, unless
    ``cfg.TEST.ALLOW_UNTRAINED_PARTS`` (then they are logged as a warning). Returns them."""
    parts = untrained_parts(model, cfg, report)
    if not parts:
        return parts
    what = source or (report.source if report is not None else "") or "no checkpoint (MODEL.WEIGHTS is empty)"
    listing = "\n".join(_group_line(c, keys) for c, keys in parts.items())
    if cfg.TEST.get("ALLOW_UNTRAINED_PARTS", False):
        logger.warning(
            "TEST.ALLOW_UNTRAINED_PARTS: evaluating with parts left at their initialisation by %s:\n%s",
            what,
            listing,
        )
        return parts
    raise UntrainedPartsError(
        f"{what}: the evaluation needs these parts of the model, which it leaves at their "
        f"initialisation (no weights in the checkpoint, no pretrained file in the config):\n{listing}\n"
        "A checkpoint of another stage or task (e.g. a stage-1 segmentor checkpoint for a referring "
        "config, or a referring checkpoint for a panoptic one)? Point MODEL.WEIGHTS at a checkpoint "
        "trained for this config, or set TEST.ALLOW_UNTRAINED_PARTS True to evaluate anyway."
    )
