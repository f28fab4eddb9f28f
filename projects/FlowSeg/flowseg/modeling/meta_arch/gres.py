"""Answers with several targets or none (generalized referring segmentation, gRefCOCO).

Propose-then-select keeps one query per condition. For an expression that may denote several
objects or nothing, :func:`select_targets` keeps every query whose probability of the condition
passes ``score_threshold`` and answers "no target" when even the best query's probability stays
below ``no_target_threshold``. The probabilities are each query's softmax over
``[conditions…, no-object]`` (the last column is the "no object" / background class), so the
decision is the one the class head learns: no-target training samples supervise every query as
"no object", multi-target ones supervise one query per target object with the same condition.
It does not matter how the logits are produced (similarity + no-object logit, or cosine logits
with a learned background embedding as the last condition).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

__all__ = ["TargetSelection", "check_thresholds", "gres_answers", "select_targets"]


@dataclass
class TargetSelection:
    """The answer for one condition: ``queries`` (kept, most probable first; empty when
    ``no_target``), the best query and its probability ``score``."""

    best_query: int
    score: float
    no_target: bool
    queries: List[int] = field(default_factory=list)


def check_thresholds(score_threshold: float, no_target_threshold: float) -> None:
    """Both thresholds are probabilities; anything else is a configuration error."""
    for name, v in (("SCORE_THRESHOLD", score_threshold), ("NO_TARGET_THRESHOLD", no_target_threshold)):
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"MODEL.FLOWSEG.GRES.{name} must be a probability in [0, 1], got {v}")


def select_targets(
    prob: Tensor, num_conditions: int, score_threshold: float, no_target_threshold: float
) -> List[TargetSelection]:
    """Multi-target / no-target selection for the first ``num_conditions`` conditions.

    Args:
        prob: [Q, K+1] per-query probabilities over K conditions and "no object" (last column).
        num_conditions: valid conditions (the ``<p>`` spans of the prompt), ``<= K``.
        score_threshold: keep every query with ``p(k | q) >= score_threshold`` (at least the best).
        no_target_threshold: answer "no target" when ``max_q p(k | q) < no_target_threshold``.
    """
    check_thresholds(score_threshold, no_target_threshold)
    if prob.dim() != 2 or not 0 < num_conditions < prob.shape[1]:
        raise ValueError(
            f"select_targets: prob must be [Q, K+1] with 0 < num_conditions <= K, got "
            f"{tuple(prob.shape)} and num_conditions={num_conditions}"
        )
    out = []
    for k in range(num_conditions):
        p = prob[:, k].float()
        score, best = (float(v) for v in p.max(0))
        if score < no_target_threshold:
            out.append(TargetSelection(best_query=int(best), score=score, no_target=True))
            continue
        order = torch.argsort(p, descending=True, stable=True)
        kept = [int(q) for q in order if float(p[q]) >= score_threshold] or [int(best)]
        out.append(TargetSelection(best_query=int(best), score=score, no_target=False, queries=kept))
    return out


def gres_answers(
    selections: List[TargetSelection],
    final_masks: Callable[[Tensor], Tensor],
    height: int,
    width: int,
    device: Optional[torch.device] = None,
) -> List[Dict]:
    """Per condition ``{"mask": union of the kept queries' masks (empty for no target),
    "score", "query" (the best one), "queries", "no_target"}``.

    ``final_masks(query_idx)`` turns query indices [n] into the output masks [n, height, width]
    (bool, refined and resized as the single-target answer is).
    """
    answers = []
    for sel in selections:
        if sel.no_target:
            mask = torch.zeros((height, width), dtype=torch.bool, device=device)
        else:
            masks = final_masks(torch.as_tensor(sel.queries, dtype=torch.long))
            mask = masks.any(dim=0)
        answers.append(
            {
                "mask": mask,
                "score": sel.score,
                "query": sel.best_query,
                "queries": list(sel.queries),
                "no_target": sel.no_target,
            }
        )
    return answers
