#!/usr/bin/env python
"""Boundary-Aware Refinement ablation and ε sensitivity (FlowSeg paper Tables 7 and 8).

One checkpoint, one data set, several BAR settings, each scored by FlowSeg's own
``ReferringEvaluator`` (cIoU, gIoU, cBIoU, gBIoU with a 2 %-of-diagonal boundary band, Pr@k):

* ``w/o BAR``: the refiner is skipped (``model.refiner = None``), i.e. the raw selected mask;
* ``eps=E`` for every E of ``--epsilons`` (default 1.0, 0.05, 0.1, 0.15, 0.2): the refiner's
  boundary threshold of eq. 6 set to E. ε = 1.0 is the paper's "no BAR" row: a 3×3 probability
  gradient never exceeds 1, so no pixel is refined and the row equals ``w/o BAR``.

The image encoder, LLM and decoder run once per sample; only the cheap selection + refinement
(``FlowSeg.referring_inference``) is repeated per setting. A model built with
``MODEL.FLOWSEG.BAR.ENABLED False`` has no refiner: only ``w/o BAR`` is reported.
Candidates are not computed (oracle cIoU does not depend on BAR). Writes
``boundary_eval.json``, ``boundary_eval.md`` and each setting's ``per_expression.json``.

    python tools/analysis/boundary_eval.py --config-file configs/flowseg_refcoco.yaml \
        --weights model_final.pth --dataset refcoco_unc_val --output-dir output/bar_ablation
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (  # noqa: E402
    add_model_args,
    batched,
    markdown_table,
    model_and_dataset_from_args,
    setup_logging,
    write_report,
)
from flowseg.evaluation import ReferringEvaluator  # noqa: E402

logger = logging.getLogger("flowseg.analysis.bar")

__all__ = ["DEFAULT_EPSILONS", "OFF", "bar_settings", "boundary_eval", "main"]

DEFAULT_EPSILONS: Tuple[float, ...] = (1.0, 0.05, 0.1, 0.15, 0.2)
OFF = "w/o BAR"
METRICS = ("cIoU", "gIoU", "cBIoU", "gBIoU")


def bar_settings(
    model: torch.nn.Module, epsilons: Sequence[float], include_off: bool = True
) -> List[Tuple[str, Optional[float]]]:
    """``[(name, epsilon or None for "refiner skipped")]`` applicable to ``model``."""
    if model.refiner is None:
        if epsilons:
            logger.warning(
                "the model has no refiner (MODEL.FLOWSEG.BAR.ENABLED False): only '%s' is evaluated", OFF
            )
        return [(OFF, None)]
    settings: List[Tuple[str, Optional[float]]] = [(OFF, None)] if include_off else []
    settings += [(f"eps={float(e):g}", float(e)) for e in epsilons]
    return settings


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", name).strip("_")


@torch.no_grad()
def boundary_eval(
    model: torch.nn.Module,
    inputs: Iterable[Dict[str, Any]],
    dataset_name: str,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    include_off: bool = True,
    output_dir: Optional[str] = None,
    batch_size: int = 1,
) -> Dict[str, Dict[str, float]]:
    """``{setting: ReferringEvaluator metrics}`` over ``inputs`` (test-mapper outputs with ``gt_mask``)."""
    if getattr(model, "mode", "referring") != "referring":
        raise ValueError("boundary_eval needs a referring-mode model (MODEL.FLOWSEG.MODE 'referring')")
    settings = bar_settings(model, epsilons, include_off)
    evaluators = {
        name: ReferringEvaluator(
            dataset_name,
            output_dir=os.path.join(output_dir, _slug(name)) if output_dir else None,
            distributed=False,
        )
        for name, _ in settings
    }
    for ev in evaluators.values():
        ev.reset()
    refiner = model.refiner
    saved_eps = None if refiner is None else refiner.epsilon
    saved_candidates = model.return_candidates
    model.return_candidates = False  # oracle cIoU is BAR-independent; candidates cost time and memory
    try:
        for batch in batched(inputs, batch_size):
            images = model.preprocess_image(batch)
            outputs, cond = model.run_head(batch, images)  # encoder + LLM + decoder: once per sample
            for name, eps in settings:
                if eps is None:
                    model.refiner = None
                else:
                    model.refiner = refiner
                    refiner.epsilon = eps
                evaluators[name].process(batch, model.referring_inference(outputs, cond, batch, images))
    finally:
        model.refiner = refiner
        if refiner is not None:
            refiner.epsilon = saved_eps
        model.return_candidates = saved_candidates
    return {name: dict(ev.evaluate().get("referring", {})) for name, ev in evaluators.items()}


def table(results: Dict[str, Dict[str, float]]) -> str:
    return markdown_table(
        ["Setting", *METRICS, "N"],
        [[n, *(r.get(m) for m in METRICS), r.get("num_samples")] for n, r in results.items()],
    )


def run(args: argparse.Namespace) -> Dict[str, Any]:
    cfg, model, dataset, samples = model_and_dataset_from_args(args)
    inputs = (x for _, x in samples)
    results = boundary_eval(
        model, inputs, dataset, args.epsilons, not args.no_off_row, args.output_dir, args.batch_size
    )
    out = {"dataset": dataset, "weights": cfg.MODEL.WEIGHTS, "results": results, "markdown": table(results)}
    write_report(args.output_dir, "boundary_eval", out)
    return out


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--epsilons",
        nargs="*",
        type=float,
        default=list(DEFAULT_EPSILONS),
        help="boundary thresholds to evaluate (1.0 = no refinement)",
    )
    p.add_argument("--no-off-row", action="store_true", help="leave out the 'refiner skipped' row")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument(
        "--output-dir", default=None, help="write boundary_eval.{json,md} and per-setting files here"
    )
    add_model_args(p)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    out = run(parse_args(argv))
    print(out["markdown"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
