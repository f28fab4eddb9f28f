#!/usr/bin/env python
"""Where a training step's time goes: ``torch.profiler`` over steps of any config's trainer.

Builds the trainer of ``--config-file`` (``projects/FlowSeg/train_net.py``'s: the run's model,
optimizer and data loader, random or ``MODEL.WEIGHTS`` weights), runs ``--warmup`` steps, then
profiles ``--steps`` steps (forward, backward, optimizer step) in this one process with the
current thread setting, and prints the seconds per step, each operator category's share of the
self CPU time (:data:`CATEGORIES`: convolutions, matrix products, copies, grid sampling, top-k /
sort, the rest) and the ``--top`` operators.

    OMP_NUM_THREADS=1 python tools/profile_train_step.py \\
        --config-file configs/synthetic/stage1_synthpan_cpu.yaml --steps 8 DATASETS.TEST "()"

Data loading is outside the timed steps (batches are drawn before profiling).
"""

import argparse
import os
import sys
import time
from typing import Callable, Dict, Iterable, Iterator, List, Tuple

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: category -> substrings of ``aten::`` operator names; the first category that matches wins
CATEGORIES: Tuple[Tuple[str, Tuple[str, ...]], ...] = (
    ("convolution", ("conv",)),
    ("matrix product", ("::mm", "::bmm", "::addmm", "::matmul", "::baddbmm", "scaled_dot_product")),
    ("copy", ("copy_", "::clone", "::cat", "::stack", "::contiguous")),
    ("grid sampling", ("grid_sampler",)),
    ("top-k / sort", ("::topk", "::sort")),
)


def categorize(op_name: str) -> str:
    """The :data:`CATEGORIES` entry of an operator name, else ``"other"``."""
    for category, patterns in CATEGORIES:
        if any(p in op_name for p in patterns):
            return category
    return "other"


def category_shares(events: Iterable) -> Dict[str, float]:
    """Share (%) of the summed self CPU time per category, from ``key_averages()`` entries (each
    with ``key`` and ``self_cpu_time_total``). Self times are exclusive, so the shares add to 100."""
    totals: Dict[str, float] = {}
    for e in events:
        c = categorize(e.key)
        totals[c] = totals.get(c, 0.0) + float(e.self_cpu_time_total)
    whole = sum(totals.values()) or 1.0
    return {c: 100.0 * t / whole for c, t in sorted(totals.items(), key=lambda kv: -kv[1])}


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch) -> None:
    """One step as Detectron2's ``SimpleTrainer.run_step`` takes it (hooks aside)."""
    loss = sum(model(batch).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def profile_steps(
    step: Callable[[object], None], batches: Iterator, steps: int, warmup: int
) -> Tuple[float, List]:
    """``(seconds per step, key_averages())`` of ``steps`` calls of ``step`` after ``warmup``."""
    for _ in range(warmup):
        step(next(batches))
    drawn = [next(batches) for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for batch in drawn:
            step(batch)
        seconds = (time.perf_counter() - t0) / max(steps, 1)
    return seconds, prof.key_averages()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True)
    p.add_argument("--steps", type=int, default=8, help="profiled steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before profiling")
    p.add_argument("--top", type=int, default=20, help="operators listed")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config KEY VALUE options")
    args = p.parse_args(argv)
    sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
    import train_net  # noqa: E402  (the project's entry point: its config set-up and Trainer)

    cfg = train_net.setup(argparse.Namespace(config_file=args.config_file, opts=args.opts, eval_only=False))
    trainer = train_net.Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.model.train()
    seconds, events = profile_steps(
        lambda b: train_step(trainer.model, trainer.optimizer, b),
        iter(trainer.data_loader),
        args.steps,
        args.warmup,
    )
    print(f"\n{seconds:.3f} s per step ({torch.get_num_threads()} threads), over {args.steps} steps")
    print("| operator category | share of self CPU time |\n|---|---|")
    for category, share in category_shares(events).items():
        print(f"| {category} | {share:.1f}% |")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
