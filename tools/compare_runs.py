#!/usr/bin/env python
"""One table over the evaluations in several output folders.

    python tools/compare_runs.py output/main output/ablation_a output/other_eval

Reads every ``metrics_all*.json`` in each folder (the latest evaluation, and earlier ones of other
weights that were moved aside as ``metrics_all.<sha256 prefix>_<iteration>.json``) and prints one
row per evaluation and data set, grouped by data set: cIoU, gIoU, oracle cIoU (referring,
reasoning and GRES sets), PQ (panoptic sets), the evaluation's seconds, and which weights
(file, sha256 prefix), iteration and config hash gave them.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Any, Dict, List, Optional

from tabulate import tabulate

COLUMNS = ["data set", "run", "cIoU", "gIoU", "oracle cIoU", "PQ", "seconds", "weights", "iter", "config"]
TASKS = ("referring", "gres", "reasoning")


def _fmt(x: Any) -> str:
    return "" if x is None else f"{x:.1f}" if isinstance(x, float) else str(x)


def _scores(metrics: Dict[str, Any]) -> List[Optional[float]]:
    """cIoU, gIoU, oracle cIoU and PQ of one data set's result dict (None where absent)."""
    task = next((metrics[t] for t in TASKS if isinstance(metrics.get(t), dict)), {})
    pq = metrics.get("panoptic_seg", {}).get("PQ") if isinstance(metrics.get("panoptic_seg"), dict) else None
    return [task.get("cIoU"), task.get("gIoU"), task.get("oracle_cIoU"), pq]


def _weights(run: Dict[str, Any]) -> str:
    if not run.get("weights"):
        return run.get("weights_note", "unknown")
    sha = run.get("weights_sha256")
    return f"{os.path.basename(run['weights'])} {sha[:10] if sha else '(not hashed)'}"


def load_run_files(folder: str) -> List[str]:
    """The metrics files of ``folder``, the current ``metrics_all.json`` first."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such output folder")
    files = sorted(glob.glob(os.path.join(folder, "metrics_all*.json")), key=os.path.getmtime, reverse=True)
    if not files:
        raise FileNotFoundError(
            f"{folder}: no metrics_all.json (evaluate into it: projects/FlowSeg/train_net.py --config-file "
            f"CFG --eval-only MODEL.WEIGHTS W OUTPUT_DIR {folder})"
        )
    return files


def rows_of(path: str, label: str) -> List[List[str]]:
    """One table row per data set of one metrics file."""
    try:
        with open(path) as f:
            data = json.load(f)
        metrics = data["metrics"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a FlowSeg metrics file ({e!r})") from e
    run = data.get("run") or {"weights_note": "not recorded (written before weights were named)"}
    iteration = run.get("iteration", data.get("iteration"))
    config = (run.get("config_sha256") or "")[:10]
    rows = []
    for name, res in metrics.items():
        seconds = run.get("seconds", {}).get(name)
        rows.append(
            [name, label]
            + [_fmt(x) for x in _scores(res)]
            + [_fmt(seconds), _weights(run), _fmt(iteration), config]
        )
    return rows


def compare(folders: List[str]) -> str:
    """The table (text) over ``folders``, rows grouped by data set."""
    rows = []
    for folder in folders:
        for path in load_run_files(folder):
            tag = os.path.basename(path)[len("metrics_all") : -len(".json")].lstrip(".")
            rows += rows_of(path, folder.rstrip("/") + (f" [{tag}]" if tag else ""))
    rows.sort(key=lambda r: r[0])  # stable: within a data set, folders in the order given
    return tabulate(rows, headers=COLUMNS, tablefmt="github", disable_numparse=True)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", help="OUTPUT_DIRs of train_net.py or tools/main_job.py runs")
    args = p.parse_args(argv)
    try:
        print(compare(args.folders))
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
