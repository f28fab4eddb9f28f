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

    python tools/ablations.py --iters 800 --seeds 0 1 2 [--variants baseline +SR ...]

Results: OUTPUT/ablations.json and a markdown table (mean ± std over seeds) on stdout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

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
}
METRICS = ("cIoU", "gIoU", "oracle_cIoU", "cBIoU", "gBIoU")


def variant_opts(name: str) -> list:
    kv = VARIANTS[name]
    return [x for k, v in zip(kv[::2], kv[1::2]) for x in (f"MODEL.FLOWSEG.{k}", str(v))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "ablations"))
    p.add_argument("--pretrained-run", default=os.path.join(ROOT, "output", "main"), help="a main-job output")
    p.add_argument("--iters", type=int, default=800, help="stage-3 iterations per run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.pretrained_run, "stage1", "model_final.pth")):
        sys.exit(
            f"error: no stage-1 checkpoint under {args.pretrained_run}: run `bash tools/run_main.sh` first"
        )

    results = {}
    for name in args.variants:
        for seed in args.seeds:
            out = os.path.join(args.output_dir, f"{name}_seed{seed}")
            if not os.path.isfile(os.path.join(out, "summary.json")):
                cmd = [sys.executable, os.path.join(ROOT, "tools", "main_job.py"), "--output-dir", out]
                cmd += ["--pretrained-run", args.pretrained_run, "--iters", str(args.iters), "--num-vis", "0"]
                cmd += ["SEED", str(seed), *variant_opts(name)]
                subprocess.run(cmd, check=True, cwd=ROOT)
            with open(os.path.join(out, "metrics_all.json")) as f:
                ref = json.load(f)["metrics"]["synthref_test"]["referring"]
            results.setdefault(name, []).append({k: ref.get(k) for k in METRICS} | {"seed": seed})

    with open(os.path.join(args.output_dir, "ablations.json"), "w") as f:
        json.dump({"iters": args.iters, "seeds": args.seeds, "runs": results}, f, indent=2)
    print(f"| variant | {' | '.join(METRICS)} |\n|---|" + "---|" * len(METRICS))
    for name, runs in results.items():
        cells = []
        for k in METRICS:
            vals = [r[k] for r in runs if r[k] is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}" if vals else "–")
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
