#!/usr/bin/env python
"""Selected vs oracle cIoU (FlowSeg paper Table 5) from ``per_expression.json`` files.

For each results file (``ReferringEvaluator``'s per-sample records, evaluated with candidates):

* selected cIoU = ΣI / ΣU of the selected masks, gIoU = mean per-sample IoU;
* oracle cIoU / gIoU = the same with each sample's best-IoU candidate (``oracle_intersection``,
  ``oracle_union``, ``oracle_iou``: the best of all queries' masks). Oracle gIoU is an upper
  bound of gIoU (the selected mask is a candidate); oracle cIoU is not one of cIoU (a ratio of
  sums: a better-IoU candidate with a larger union can lower it), so read the gap on gIoU;
* semantic misalignment: a failure is a sample with IoU < ``fail_threshold`` (0.5); it is
  *misaligned* when its oracle IoU >= ``fail_threshold`` (a good candidate existed but another
  was selected). Share = misaligned failures / failures (over samples that have an oracle IoU).

With ``--by-synthetic-kind`` each file of the synthetic benchmark also gets one row per expression
kind (attribute / superlative / relation, read from the expression's wording).

All values are percent. Writes ``oracle_vs_selected.json`` and ``oracle_vs_selected.md``.

    python tools/analysis/oracle_vs_selected.py --inputs output/xsam/inference output/flowseg/inference \
        --labels X-SAM FlowSeg --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    group_by_synthetic_kind,
    load_per_expression,
    markdown_table,
    pct,
    region_metrics,
    resolve_per_expression,
    setup_logging,
    write_report,
)
from flowseg.evaluation.metrics import cumulative_iou  # noqa: E402

logger = logging.getLogger("flowseg.analysis.oracle")

__all__ = ["summarize_records", "oracle_vs_selected", "main"]


def summarize_records(records: Sequence[Dict[str, Any]], fail_threshold: float = 0.5) -> Dict[str, Any]:
    """Selected / oracle cIoU, gIoU and the misalignment share of one results file (percent)."""
    c_iou, g_iou = region_metrics(records)
    out: Dict[str, Any] = {"num_samples": len(records), "cIoU": c_iou, "gIoU": g_iou}
    with_oracle = [r for r in records if r.get("oracle_iou") is not None]
    out["num_with_oracle"] = len(with_oracle)
    if len(with_oracle) < len(records):
        logger.warning(
            "%d of %d samples have no oracle IoU (evaluated without candidates): oracle values use the rest",
            len(records) - len(with_oracle),
            len(records),
        )
    if with_oracle:
        out["oracle_cIoU"] = pct(
            cumulative_iou(
                [r["oracle_intersection"] for r in with_oracle], [r["oracle_union"] for r in with_oracle]
            )
        )
        # mean of the per-sample oracle IoUs (they already apply the empty/empty = 1 rule)
        out["oracle_gIoU"] = 100.0 * sum(float(r["oracle_iou"]) for r in with_oracle) / len(with_oracle)
        out["oracle_gap_cIoU"] = out["oracle_cIoU"] - (out["cIoU"] or 0.0)
    else:
        out["oracle_cIoU"] = out["oracle_gIoU"] = out["oracle_gap_cIoU"] = None
    failures = [r for r in with_oracle if float(r["iou"]) < fail_threshold]
    misaligned = [r for r in failures if float(r["oracle_iou"]) >= fail_threshold]
    out["fail_threshold"] = fail_threshold
    out["num_failures"] = len(failures)
    out["num_misaligned"] = len(misaligned)
    out["misalignment_share"] = 100.0 * len(misaligned) / len(failures) if failures else None
    return out


def oracle_vs_selected(
    inputs: Sequence[str],
    labels: Optional[Sequence[str]] = None,
    fail_threshold: float = 0.5,
    output_dir: Optional[str] = None,
    by_synthetic_kind: bool = False,
) -> Dict[str, Any]:
    """One row per results file. ``inputs``: files or folders (every ``per_expression.json`` below).
    ``by_synthetic_kind``: after each file's row, one row per expression kind (``label [kind]``).

    ``labels`` name the inputs (one per input; a folder with several files gets ``label/relpath``).
    Returns ``{"rows": [...], "markdown": str}``; with ``output_dir`` also writes them.
    """
    if labels is not None and len(labels) != len(inputs):
        raise ValueError(f"{len(labels)} labels for {len(inputs)} inputs")
    rows: List[Dict[str, Any]] = []
    for i, path in enumerate(inputs):
        files = resolve_per_expression(path)
        for f in files:
            label = labels[i] if labels is not None else os.path.dirname(os.path.abspath(f))
            if labels is not None and len(files) > 1:
                label = f"{label}/{os.path.relpath(os.path.dirname(f), path)}"
            records = load_per_expression(f)
            rows.append({"label": label, "file": f, **summarize_records(records, fail_threshold)})
            # kinds are those of referring expressions: a reasoning set (a run's inference/
            # folder holds both) keeps its one row
            if by_synthetic_kind and all(r.get("task", "referring") == "referring" for r in records):
                for kind, subset in group_by_synthetic_kind(records).items():
                    rows.append(
                        {"label": f"{label} [{kind}]", "file": f, **summarize_records(subset, fail_threshold)}
                    )
    headers = [
        "Model",
        "N",
        "cIoU",
        "gIoU",
        "oracle cIoU",
        "oracle gIoU",
        "gap",
        "failures",
        f"misaligned (oracle>={fail_threshold:g}) %",
    ]
    table = markdown_table(
        headers,
        [
            [
                r["label"],
                r["num_samples"],
                r["cIoU"],
                r["gIoU"],
                r["oracle_cIoU"],
                r["oracle_gIoU"],
                r["oracle_gap_cIoU"],
                r["num_failures"],
                r["misalignment_share"],
            ]
            for r in rows
        ],
    )
    result = {"rows": rows, "markdown": table}
    write_report(output_dir, "oracle_vs_selected", result, rows)
    return result


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="per_expression.json files or folders")
    p.add_argument("--labels", nargs="+", default=None, help="one name per input (default: the folder)")
    p.add_argument("--fail-threshold", type=float, default=0.5, help="IoU below this is a failure")
    p.add_argument("--output-dir", default=None, help="write oracle_vs_selected.{json,md} here")
    p.add_argument(
        "--by-synthetic-kind",
        action="store_true",
        help="also one row per expression kind (synthetic benchmark: attribute / superlative / relation)",
    )
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    result = oracle_vs_selected(
        args.inputs, args.labels, args.fail_threshold, args.output_dir, args.by_synthetic_kind
    )
    print(result["markdown"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
