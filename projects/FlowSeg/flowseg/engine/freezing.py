"""Which parameters train in a stage (paper A.3), chosen by config.

``MODEL.FLOWSEG.TRAINABLE``: a list of module-name prefixes of the FlowSeg model, e.g.
``["condition_head.vis_projector", "condition_head.llm_projector"]`` (stage 2: the dual
projectors only).

* Empty (the default; stages 1 and 3): nothing changes here, each component's own switches decide
  (``MODEL.SAM_VIT.FREEZE``, ``MODEL.LLM.FREEZE`` + ``MODEL.LLM.LORA``, ``MODEL.VANILLA_ENCODER.FREEZE``).
* Non-empty: every parameter outside those prefixes is frozen. Parameters inside keep their
  component's setting: a prefix never unfreezes the base weights of a frozen LLM (that is what
  ``MODEL.LLM.FREEZE`` is for), so ``["condition_head"]`` means "only the trainable parts of the
  condition head" (projectors, LoRA, new-token rows, an unfrozen vision tower).

A prefix matches whole module names (``condition_head.llm`` matches ``condition_head.llm.…`` but
not ``condition_head.llm_projector.…``). A prefix that matches no parameter, or a selection that
leaves nothing trainable, raises ``ValueError``: a typo must not silently train nothing.

Call :func:`apply_stage_freezing` after building the model and before building the optimizer
(``FlowSegTrainer.build_model``); the optimizer only takes parameters with ``requires_grad``.
"""

from __future__ import annotations

import logging
from typing import List, Sequence

from detectron2.config import CfgNode
from torch import nn

from ..checkpoint.components import COMPONENTS, group_keys_by_component

__all__ = ["apply_stage_freezing", "trainable_parameter_names"]

logger = logging.getLogger(__name__)


def _normalise(prefixes: Sequence[str]) -> List[str]:
    return [str(p).strip().rstrip(".") for p in prefixes if str(p).strip().rstrip(".")]


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def trainable_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters with ``requires_grad`` (DDP wrapper removed)."""
    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    return [n for n, p in model.named_parameters() if p.requires_grad]


def apply_stage_freezing(model: nn.Module, cfg: CfgNode) -> List[str]:
    """Freeze every parameter outside ``cfg.MODEL.FLOWSEG.TRAINABLE`` (see the module docstring).

    Returns the names of the parameters that remain trainable.
    """
    prefixes = _normalise(cfg.MODEL.FLOWSEG.get("TRAINABLE", []) or [])
    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    if not prefixes:
        return trainable_parameter_names(model)
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in prefixes if not any(_matches(n, p) for n in names)]
    if unmatched:
        top = sorted({".".join(n.split(".")[:2]) for n in names})
        raise ValueError(
            f"MODEL.FLOWSEG.TRAINABLE entries {unmatched} match no parameter of the model; "
            f"module names look like {top}"
        )
    for name, param in model.named_parameters():
        if not any(_matches(name, p) for p in prefixes):
            param.requires_grad_(False)
    trainable = trainable_parameter_names(model)
    if not trainable:
        raise ValueError(
            f"MODEL.FLOWSEG.TRAINABLE {prefixes} leaves no trainable parameter: the selected modules are "
            "frozen by their own switches (MODEL.LLM.FREEZE, MODEL.VANILLA_ENCODER.FREEZE, MODEL.SAM_VIT.FREEZE)"
        )
    params = dict(model.named_parameters())
    summary = ", ".join(
        f"{COMPONENTS[c]}: {sum(params[n].numel() for n in keys):,}"
        for c, keys in group_keys_by_component(trainable).items()
    )
    total = sum(p.numel() for p in params.values())
    logger.info(
        f"MODEL.FLOWSEG.TRAINABLE={prefixes}: {sum(params[n].numel() for n in trainable):,} of "
        f"{total:,} parameters train ({summary})"
    )
    return trainable
