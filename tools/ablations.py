#!/usr/bin/env python
"""Ablations of the main job (paper Table 3 and Table 11) on the synthetic benchmark.

Every variant trains stage 3 from the SAME stage-1/stage-2 checkpoints and tokenizer (those of a
finished main job, ``output/main`` by default) with the same data, iterations and seed list, then is evaluated on the held-out ``synthref_test``:

  baseline          SR off, CR off, BAR off    (Table 3 row 1)
  +SR               semantic cross-attention + fusion gate (eq. 1-3)
  +SR+CR            + condition refinement (eq. 5)
  +SR+CR+BAR        + Boundary-Aware Refinement (full FlowSeg)
  visual-control    SR's modules reading pixel features instead of C (Table 11; as many
                    parameters as +SR)
  no-mask-position  full FlowSeg without MODEL.FLOWSEG.MASK_POSITION_LOGITS (not in the paper)

    python tools/ablations.py --iters 800 --seeds 0 1 2 [--variants baseline +SR ...] [--jobs 2]

Results: OUTPUT/ablations.json and a markdown table on stdout: each metric's mean ± std over
seeds, and each variant's paired difference to the baseline (same seeds, same expressions) with a
95% interval from a bootstrap that resamples both seeds and expressions (:func:`paired_difference`).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Dict, List

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "baseline": ["SEMANTIC_REFINEMENT", False, "CONDITION_REFINEMENT", False, "BAR.ENABLED", False],
    "+SR": ["SEMANTIC_REFINEMENT", True, "CONDITION_REFINEMENT", False, "BAR.ENABLED", False],
    "+SR+CR": ["SEMANTIC_REFINEMENT", True, "CONDITION_REFINEMENT", True, "BAR.ENABLED", False],
    "+SR+CR+BAR": ["SEMANTIC_REFINEMENT", True, "CONDITION_REFINEMENT", True, "BAR.ENABLED", True],
    "visual-control": [
        "SEMANTIC_REFINEMENT",
        True,
        "CONDITION_REFINEMENT",
        False,
        "BAR.ENABLED",
        False,
        "VISUAL_CROSS_ATTN_CONTROL",
        True,
    ],
    # full FlowSeg without the mask positions in the condition logits (not in the paper)
    "no-mask-position": [
        "SEMANTIC_REFINEMENT",
        True,
        "CONDITION_REFINEMENT",
        True,
        "BAR.ENABLED",
        True,
        "MASK_POSITION_LOGITS",
        False,
    ],
}
METRICS = ("cIoU", "gIoU", "oracle_cIoU", "cBIoU", "gBIoU")


def variant_opts(name: str) -> list:
    kv = VARIANTS[name]
    return [x for k, v in zip(kv[::2], kv[1::2]) for x in (f"MODEL.FLOWSEG.{k}", str(v))]


def per_expression(run_dir: str, dataset: str = "synthref_test") -> Dict[int, tuple]:
    """sentence id -> (intersection, union, IoU) of one evaluated run."""
    with open(os.path.join(run_dir, "inference", dataset, "per_expression.json")) as f:
        return {r["sentence_id"]: (r["intersection"], r["union"], r["iou"]) for r in json.load(f)}


def paired_difference(base: List[Dict], variant: List[Dict], n_boot: int = 2000, seed: int = 0) -> Dict:
    """Variant minus baseline in cIoU and gIoU (points), paired by seed (list position) and
    expression, with 95% percentile intervals of a two-level bootstrap (seeds, then expressions)."""
    keys = sorted(set.intersection(*(set(r) for r in base + variant)))
    if not keys:
        raise ValueError("the runs share no expression: were they evaluated on the same split?")

    def arrays(runs):  # (seeds, expressions) of intersection, union, IoU
        a = np.array([[r[k] for k in keys] for r in runs], dtype=np.float64)
        return a[..., 0], a[..., 1], a[..., 2]

    (bi, bu, bg), (vi, vu, vg) = arrays(base), arrays(variant)
    n_seeds, n = bi.shape
    rng = np.random.default_rng(seed)

    def diff(w: np.ndarray, seeds: np.ndarray) -> np.ndarray:
        c = (vi @ w) / (vu @ w) - (bi @ w) / (bu @ w)
        g = ((vg - bg) @ w) / w.sum()
        return 100 * np.array([c[seeds].mean(), g[seeds].mean()])

    point = diff(np.ones(n), np.arange(n_seeds))
    boots = np.array(
        [
            diff(
                np.bincount(rng.integers(n, size=n), minlength=n).astype(np.float64),
                rng.integers(n_seeds, size=n_seeds),
            )
            for _ in range(n_boot)
        ]
    )
    lo, hi = np.percentile(boots, [2.5, 97.5], axis=0)
    return {
        "expressions": n,
        "seeds": n_seeds,
        "d_cIoU": float(point[0]),
        "d_cIoU_ci95": [float(lo[0]), float(hi[0])],
        "d_gIoU": float(point[1]),
        "d_gIoU_ci95": [float(lo[1]), float(hi[1])],
    }


def cell_dir(args: argparse.Namespace, name: str, seed: int) -> str:
    return os.path.join(args.output_dir, f"{name}_seed{seed}")


def cell_command(args: argparse.Namespace, name: str, seed: int) -> list:
    main_job = os.path.join(ROOT, "tools", "main_job.py")
    cmd = [sys.executable, main_job, "--output-dir", cell_dir(args, name, seed), "--num-vis", "0"]
    cmd += ["--pretrained-run", args.pretrained_run, "--iters", str(args.iters), "--cpu-processes", "1"]
    return cmd + ["SEED", str(seed), *variant_opts(name)]


def run_parallel(jobs: List[tuple], parallel: int) -> None:
    """Run ``jobs`` ((command, log path) pairs) ``parallel`` at a time, each with cores /
    ``parallel`` threads: independent single-process runs use the cores better than one
    data-parallel run at a time. The first failure stops the others and exits naming its log."""
    threads = str(max((os.cpu_count() or 1) // parallel, 1))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < parallel:
            cmd, log_path = pending.pop(0)
            log = open(log_path, "w")
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((proc, log, log_path))
        proc, log, log_path = running.pop(0)
        code = proc.wait()
        log.close()
        if code:
            for other, f, _ in running:
                other.kill()
                f.close()
            sys.exit(f"error: a run failed (exit {code}); see {log_path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "ablations"))
    p.add_argument("--pretrained-run", default=os.path.join(ROOT, "output", "main"), help="a main-job output")
    p.add_argument("--iters", type=int, default=800, help="stage-3 iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="cells trained at once, each one process with cores / jobs threads",
    )
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.pretrained_run, "stage1", "model_final.pth")):
        sys.exit(
            f"error: no stage-1 checkpoint under {args.pretrained_run}: run `bash tools/run_main.sh` first"
        )

    cells = [(name, seed) for name in args.variants for seed in args.seeds]
    os.makedirs(args.output_dir, exist_ok=True)
    todo = [c for c in cells if not os.path.isfile(os.path.join(cell_dir(args, *c), "summary.json"))]
    run_parallel([(cell_command(args, *c), cell_dir(args, *c) + ".log") for c in todo], args.jobs)
    results, per_expr = {}, {}
    for name, seed in cells:
        out = cell_dir(args, name, seed)
        with open(os.path.join(out, "metrics_all.json")) as f:
            ref = json.load(f)["metrics"]["synthref_test"]["referring"]
        results.setdefault(name, []).append({k: ref.get(k) for k in METRICS} | {"seed": seed})
        per_expr.setdefault(name, []).append(per_expression(out))
    paired = {}
    if "baseline" in per_expr:
        paired = {
            n: paired_difference(per_expr["baseline"], r) for n, r in per_expr.items() if n != "baseline"
        }
    with open(os.path.join(args.output_dir, "ablations.json"), "w") as f:
        json.dump({"iters": args.iters, "seeds": args.seeds, "runs": results, "paired": paired}, f, indent=2)
    print(markdown(results, paired))


def markdown(results: Dict, paired: Dict) -> str:
    lines = [f"| variant | {' | '.join(METRICS)} | Δ cIoU vs baseline [95% CI] | Δ gIoU [95% CI] |"]
    lines.append("|---|" + "---|" * (len(METRICS) + 2))
    for name, runs in results.items():
        cells = []
        for k in METRICS:
            vals = [r[k] for r in runs if r[k] is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}" if vals else "–")
        for m in ("d_cIoU", "d_gIoU"):
            d = paired.get(name)
            cells.append(f"{d[m]:+.1f} [{d[m + '_ci95'][0]:+.1f}, {d[m + '_ci95'][1]:+.1f}]" if d else "–")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
