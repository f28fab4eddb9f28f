#!/usr/bin/env python
"""Training speed on CPU: one process using every core vs data-parallel single-thread processes.

Runs the main job's stage 1 (``configs/synthetic/stage1_synthpan_cpu.yaml``, same global batch)
for ``--iters`` iterations in each layout, one after the other, and reports seconds per iteration
(median of Detectron2's 20-iteration windows after the first) and the speed-up. Needs the
synthetic data (``bash tools/run_main.sh`` writes it) and an otherwise idle machine.

    python tools/bench_cpu_processes.py [--iters 100] [--processes 2]
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
    args = p.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        one = seconds_per_iter(1, cores, args.iters, os.path.join(tmp, "one"))
        many = seconds_per_iter(
            args.processes, max(cores // args.processes, 1), args.iters, os.path.join(tmp, "dp")
        )
    print(
        json.dumps(
            {
                "cores": cores,
                f"1 process x {cores} threads (s/it)": round(one, 3),
                f"{args.processes} processes x {max(cores // args.processes, 1)} threads (s/it)": round(
                    many, 3
                ),
                "speed-up": round(one / many, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
