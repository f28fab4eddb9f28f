#!/usr/bin/env python
"""Condition drift across decoder layers (FlowSeg paper Table 12, appendix A.4).

Runs a referring model over a data set with the decoder's intermediates and reports, for each
layer l = 1..L, the mean cosine similarity between the initial condition embedding C(0) (the
projected LLM ``<p>…</p>`` embedding fed to the decoder) and C(l), the condition after layer l's
condition refinement (eq. 5). The mean is over every valid condition of every sample (padded
condition slots are left out); std and min are reported too. With
``MODEL.FLOWSEG.CONDITION_REFINEMENT False`` the conditions never change and every value is 1.

Writes ``condition_drift.json`` and ``condition_drift.md``.

    python tools/analysis/condition_drift.py --config-file configs/flowseg_refcoco.yaml \
        --weights model_final.pth --dataset refcoco_unc_val --max-samples 500 --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Iterable, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    batched,
    markdown_table,
    model_and_dataset_from_args,
    run_head_with_intermediates,
    setup_logging,
    write_report,
)

logger = logging.getLogger("flowseg.analysis.drift")

__all__ = ["condition_cosines", "condition_drift", "main"]


def condition_cosines(conditions: Sequence[torch.Tensor], condition_mask: torch.Tensor) -> torch.Tensor:
    """cos(C(0), C(l)) for l = 1..L of every valid condition: ``[L, N_valid]`` float64.

    ``conditions``: C(0)..C(L), each ``[B,K,h]``; ``condition_mask``: ``[B,K]`` (True = valid).
    """
    if len(conditions) < 2:
        raise ValueError(
            "the decoder returned no per-layer conditions: the model needs an LLM condition head "
            "(referring mode) and return_intermediates=True"
        )
    valid = condition_mask.to(torch.bool)
    # float64: identical vectors give exactly 1 (up to 1e-16), so "no drift" is visible as 1.0.
    c0 = conditions[0][valid].double()
    return torch.stack([F.cosine_similarity(c0, c[valid].double(), dim=-1) for c in conditions[1:]])


@torch.no_grad()
def condition_drift(
    model: torch.nn.Module, inputs: Iterable[Dict[str, Any]], batch_size: int = 1
) -> Dict[str, Any]:
    """Mean / std / min cosine(C(0), C(l)) per layer over ``inputs`` (model inputs from a test mapper)."""
    sums: Optional[torch.Tensor] = None
    sq_sums: Optional[torch.Tensor] = None
    mins: Optional[torch.Tensor] = None
    count = 0
    num_samples = 0
    for batch in batched(inputs, batch_size):
        outputs, cond, _ = run_head_with_intermediates(model, batch)
        cos = condition_cosines(outputs.get("conditions", []), cond["condition_mask"]).cpu()  # [L, N]
        if cos.shape[1] == 0:
            continue
        if sums is None:
            sums = torch.zeros(cos.shape[0], dtype=torch.float64)
            sq_sums = torch.zeros_like(sums)
            mins = torch.full_like(sums, float("inf"))
        sums += cos.sum(1)
        sq_sums += (cos * cos).sum(1)
        mins = torch.minimum(mins, cos.min(1).values)
        count += cos.shape[1]
        num_samples += len(batch)
    if sums is None:
        raise ValueError("no sample with a valid condition: nothing to measure")
    mean = sums / count
    std = (sq_sums / count - mean * mean).clamp(min=0).sqrt()
    return {
        "layers": list(range(1, len(mean) + 1)),
        "mean_cosine": mean.tolist(),
        "std_cosine": std.tolist(),
        "min_cosine": mins.tolist(),
        "num_conditions": count,
        "num_samples": num_samples,
        "condition_refinement": bool(getattr(model.sem_seg_head.predictor, "condition_refinement", False)),
    }


def table(result: Dict[str, Any]) -> str:
    headers = ["Layer l", *[str(layer) for layer in result["layers"]]]
    return markdown_table(
        headers,
        [
            ["Cosine Sim.", *result["mean_cosine"]],
            ["std", *result["std_cosine"]],
            ["min", *result["min_cosine"]],
        ],
        digits=3,
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg, model, dataset, samples = model_and_dataset_from_args(args)
    inputs = (x for _, x in samples)
    result = condition_drift(model, inputs, args.batch_size)
    result.update(dataset=dataset, weights=cfg.MODEL.WEIGHTS)
    result["markdown"] = table(result)
    if not result["condition_refinement"]:
        logger.info("CONDITION_REFINEMENT is off: the conditions are not updated, cosines are 1")
    write_report(args.output_dir, "condition_drift", result)
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--output-dir", default=None, help="write condition_drift.{json,md} here")
    add_model_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    result = run(parse_args(argv))
    print(result["markdown"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
