#!/usr/bin/env python
"""Re-score a baseline's failure cases with another model (FlowSeg paper Table 6).

Inputs: two ``per_expression.json`` files (``ReferringEvaluator``) of a baseline A (X-SAM in the
paper) and a model B (FlowSeg) on the same data. Samples are joined on
``(image_id, ref_id, sentence_id)`` (the expression text when a file has no sentence id); both
files must hold exactly the same samples, otherwise the tool stops and names the missing ones.

For each threshold t (default 0.5 and 0.2) the subset is A's failures, ``IoU_A < t``; on it:

* A's and B's cIoU (ΣI/ΣU) and gIoU (mean IoU), and B − A;
* rescue rate = share of the subset where ``IoU_B >= success_threshold`` (0.5);
* reverse rescue rate = the same with A and B swapped (A's share of B's failures ``IoU_B < t``).
  Read the rescue rate next to it: two models of equal accuracy whose errors differ rescue each
  other's failures at similar rates, so a high rescue rate alone does not show B is better.

Several datasets (one ``--baseline``/``--model`` pair each) add an "Avg." column: the mean of
the per-dataset numbers, as in Table 6. All values are percent.

    python tools/analysis/failure_rescue.py \
        --baseline xsam/refcoco/per_expression.json xsam/refcoco+/per_expression.json \
        --model flowseg/refcoco/per_expression.json flowseg/refcoco+/per_expression.json \
        --labels RefCOCO RefCOCO+ --output-dir output/analysis
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    load_per_expression,
    markdown_table,
    region_metrics,
    resolve_per_expression,
    setup_logging,
    write_report,
)

logger = logging.getLogger("flowseg.analysis.rescue")

__all__ = ["sample_key", "index_records", "failure_rescue", "failure_rescue_files", "main"]

_MAX_NAMED = 10  # ids named in a mismatch error


def sample_key(record: Dict[str, Any]) -> Tuple[Hashable, ...]:
    """Join key of a per-sample record: (image_id, ref_id, sentence_id or, lacking it, expression)."""
    sent = record.get("sentence_id")
    third = ("sentence_id", sent) if sent is not None else ("expression", record.get("expression"))
    return (record.get("image_id"), record.get("ref_id")) + third


def _key_str(key: Tuple[Hashable, ...]) -> str:
    return f"(image_id={key[0]}, ref_id={key[1]}, {key[2]}={key[3]!r})"


def index_records(records: Sequence[Dict[str, Any]], name: str = "records") -> Dict[Tuple, Dict[str, Any]]:
    index: Dict[Tuple, Dict[str, Any]] = {}
    for r in records:
        key = sample_key(r)
        if key in index:
            raise ValueError(
                f"{name}: two records share the sample id {_key_str(key)}; the join would be ambiguous"
            )
        index[key] = r
    return index


def _check_same_samples(a: Dict[Tuple, Any], b: Dict[Tuple, Any], name_a: str, name_b: str) -> None:
    only_a = sorted(set(a) - set(b), key=str)
    only_b = sorted(set(b) - set(a), key=str)
    if not only_a and not only_b:
        return
    parts = []
    for missing, present_in, absent_from in ((only_a, name_a, name_b), (only_b, name_b, name_a)):
        if missing:
            named = ", ".join(_key_str(k) for k in missing[:_MAX_NAMED])
            more = f" and {len(missing) - _MAX_NAMED} more" if len(missing) > _MAX_NAMED else ""
            parts.append(
                f"{len(missing)} sample(s) of {present_in} are missing from {absent_from}: {named}{more}"
            )
    raise ValueError("the two results files do not cover the same samples: " + "; ".join(parts))


def failure_rescue(
    baseline_records: Sequence[Dict[str, Any]],
    model_records: Sequence[Dict[str, Any]],
    thresholds: Sequence[float] = (0.5, 0.2),
    success_threshold: float = 0.5,
    baseline_name: str = "baseline",
    model_name: str = "model",
) -> Dict[str, Any]:
    """Per threshold t: the model's cIoU/gIoU and rescue rate on the baseline's samples with IoU < t."""
    a = index_records(baseline_records, baseline_name)
    b = index_records(model_records, model_name)
    _check_same_samples(a, b, baseline_name, model_name)
    out: Dict[str, Any] = {"num_samples": len(a), "success_threshold": success_threshold, "subsets": []}
    for t in thresholds:
        keys = [k for k, r in a.items() if float(r["iou"]) < t]
        sub_a = [a[k] for k in keys]
        sub_b = [b[k] for k in keys]
        a_c, a_g = region_metrics(sub_a)
        b_c, b_g = region_metrics(sub_b)
        rescued = sum(1 for r in sub_b if float(r["iou"]) >= success_threshold)
        # the same statistic with the roles swapped: two equally good models with different
        # errors rescue each other's failures at similar rates
        b_fail = [k for k, r in b.items() if float(r["iou"]) < t]
        reverse = sum(1 for k in b_fail if float(a[k]["iou"]) >= success_threshold)
        out["subsets"].append(
            {
                "threshold": t,
                "num_failures": len(keys),
                "baseline_cIoU": a_c,
                "baseline_gIoU": a_g,
                "model_cIoU": b_c,
                "model_gIoU": b_g,
                "delta_cIoU": None if a_c is None else b_c - a_c,
                "delta_gIoU": None if a_g is None else b_g - a_g,
                "num_rescued": rescued,
                "rescue_rate": 100.0 * rescued / len(keys) if keys else None,
                "num_model_failures": len(b_fail),
                "reverse_rescue_rate": 100.0 * reverse / len(b_fail) if b_fail else None,
            }
        )
    return out


def _mean(values: Sequence[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _table(results: List[Dict[str, Any]], labels: List[str], baseline_name: str, model_name: str) -> str:
    """Table 6 layout: rows per threshold, one column per dataset plus Avg."""
    headers = ["Subset / metric", *labels, "Avg."]
    rows: List[List[Any]] = []
    for j, t in enumerate(s["threshold"] for s in results[0]["subsets"]):
        per = [r["subsets"][j] for r in results]
        for name, key in (
            (f"{baseline_name} (IoU<{t:g}) cIoU", "baseline_cIoU"),
            (f"{model_name} cIoU", "model_cIoU"),
            ("Δ cIoU", "delta_cIoU"),
            (f"{baseline_name} (IoU<{t:g}) gIoU", "baseline_gIoU"),
            (f"{model_name} gIoU", "model_gIoU"),
            ("Δ gIoU", "delta_gIoU"),
            (f"rescue rate (IoU>={results[0]['success_threshold']:g}) %", "rescue_rate"),
            ("failures", "num_failures"),
            (f"reverse: {baseline_name} rescues {model_name}'s failures %", "reverse_rescue_rate"),
        ):
            vals = [s[key] for s in per]
            avg = _mean(vals) if key != "num_failures" else sum(vals)
            rows.append([name, *vals, avg])
    return markdown_table(headers, rows, digits=1)


def failure_rescue_files(
    baseline: Sequence[str],
    model: Sequence[str],
    labels: Optional[Sequence[str]] = None,
    thresholds: Sequence[float] = (0.5, 0.2),
    success_threshold: float = 0.5,
    baseline_name: str = "Baseline",
    model_name: str = "FlowSeg",
    output_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """:func:`failure_rescue` for each (baseline file, model file) pair, plus the Avg. column."""
    if len(baseline) != len(model):
        raise ValueError(
            f"{len(baseline)} baseline files but {len(model)} model files: give one pair per dataset"
        )
    if labels is not None and len(labels) != len(baseline):
        raise ValueError(f"{len(labels)} labels for {len(baseline)} dataset pairs")
    results = []
    for i, (fa, fb) in enumerate(zip(baseline, model)):
        (pa,), (pb,) = _single(fa), _single(fb)
        res = failure_rescue(
            load_per_expression(pa),
            load_per_expression(pb),
            thresholds,
            success_threshold,
            baseline_name=f"{baseline_name} ({pa})",
            model_name=f"{model_name} ({pb})",
        )
        res.update(label=labels[i] if labels else f"dataset{i}", baseline_file=pa, model_file=pb)
        results.append(res)
    names = [r["label"] for r in results]
    average = [
        {
            "threshold": results[0]["subsets"][j]["threshold"],
            **{
                k: _mean([r["subsets"][j][k] for r in results])
                for k in (
                    "baseline_cIoU",
                    "model_cIoU",
                    "delta_cIoU",
                    "baseline_gIoU",
                    "model_gIoU",
                    "delta_gIoU",
                    "rescue_rate",
                    "reverse_rescue_rate",
                )
            },
        }
        for j in range(len(thresholds))
    ]
    table = _table(results, names, baseline_name, model_name)
    out = {"datasets": results, "average": average, "markdown": table}
    write_report(output_dir, "failure_rescue", out)
    return out


def _single(path: str) -> List[str]:
    files = resolve_per_expression(path)
    if len(files) != 1:
        raise ValueError(f"{path} holds {len(files)} per_expression.json files; name one: {files}")
    return files


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--baseline", nargs="+", required=True, help="baseline per_expression.json (one per dataset)"
    )
    p.add_argument("--model", nargs="+", required=True, help="model per_expression.json, same order")
    p.add_argument("--labels", nargs="+", default=None, help="dataset names (columns)")
    p.add_argument(
        "--thresholds", nargs="+", type=float, default=[0.5, 0.2], help="failure: baseline IoU < t"
    )
    p.add_argument("--success-threshold", type=float, default=0.5, help="rescued: model IoU >= this")
    p.add_argument("--baseline-name", default="Baseline")
    p.add_argument("--model-name", default="FlowSeg")
    p.add_argument("--output-dir", default=None, help="write failure_rescue.{json,md} here")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    setup_logging()
    args = parse_args(argv)
    try:
        out = failure_rescue_files(
            args.baseline,
            args.model,
            args.labels,
            args.thresholds,
            args.success_threshold,
            args.baseline_name,
            args.model_name,
            args.output_dir,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(out["markdown"], end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
