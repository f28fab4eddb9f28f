#!/usr/bin/env python
"""Training speed on CPU: one process using every core vs data-parallel single-thread processes.

Runs the main job's stage 1 (``configs/synthetic/stage1_synthpan_cpu.yaml``, same global batch)
for ``--iters`` iterations in each layout, alternating ``--repeats`` times, and reports seconds
per iteration (median of Detectron2's 20-iteration windows after the first) and the speed-up of
each pair. Needs the
synthetic data (``bash tools/run_main.sh`` writes it) and an otherwise idle machine.

    python tools/bench_cpu_processes.py [--iters 100] [--processes 2] [--repeats 3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "stage1_synthpan_cpu.yaml")


def seconds_per_iter(processes: int, threads: int, iters: int, out_dir: str) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, os.path.join(ROOT, "projects", "FlowSeg", "train_net.py")]
    cmd += ["--num-gpus", str(processes), "--config-file", CONFIG, "DATASETS.TEST", "()"]
    cmd += ["SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", str(10 * iters), "OUTPUT_DIR", out_dir]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(out_dir, "metrics.json")) as f:
        times = [r["time"] for r in map(json.loads, f) if "time" in r]
    if len(times) < 2:
        raise RuntimeError(f"too few logged windows in {out_dir}: raise --iters")
    return statistics.median(times[1:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each layout")
    args = p.parse_args()
    cores = os.cpu_count() or 1
    threads = max(cores // args.processes, 1)
    one, many = [], []
    with tempfile.TemporaryDirectory() as tmp:
        # alternating, so that a slow spell of a shared machine hits both layouts
        for r in range(args.repeats):
            one.append(seconds_per_iter(1, cores, args.iters, os.path.join(tmp, f"one{r}")))
            many.append(seconds_per_iter(args.processes, threads, args.iters, os.path.join(tmp, f"dp{r}")))
    ratios = [a / b for a, b in zip(one, many)]
    result = {
        "cores": cores,
        f"1 process x {cores} threads (s/it)": [round(t, 3) for t in one],
        f"{args.processes} processes x {threads} threads (s/it)": [round(t, 3) for t in many],
        "speed-up per pair": [round(x, 2) for x in ratios],
        "median speed-up": round(statistics.median(ratios), 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
