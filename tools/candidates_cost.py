#!/usr/bin/env python
"""What ``TEST.RETURN_CANDIDATES`` costs in referring inference: time and peak memory per sample,
candidates off vs on, measured side by side on one model in one run.

With candidates on, every query's mask is upsampled to the padded input size and then to the
original image size (``ref_seg["candidates"]``, read by the evaluator's oracle metrics); off, only
the selected mask is. The model is the tiny test model (``configs/tiny/flowseg_refer_tiny.yaml``,
random weights, CPU) at the paper's image size (1024 long side) and query count (200), so the
mask-sized work is the paper's while the encoders are small.

Memory is the resident set (RSS) the inference needs on top of what was resident before
(:class:`flowseg.utils.memory.PeakRSS`; CPU: PyTorch keeps no allocator statistics there), or,
with ``--device cuda``, ``torch.cuda.max_memory_allocated`` over the same stretch. Modes alternate
(off, on, off, on, ...) so that a drift of the machine hits both.

    python tools/candidates_cost.py                       # CPU, 1024x768 input, 480x640 output
    python tools/candidates_cost.py --image-size 1024 1024 --orig-size 1024 1024 --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from benchmark import build, build_config, eval_inputs, write_model_files  # noqa: E402

__all__ = ["measure_modes", "main"]


def _one_pass(model: torch.nn.Module, inputs: List[Dict[str, Any]], device: torch.device) -> Dict[str, float]:
    from flowseg.utils.memory import PeakRSS

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss, torch.no_grad():
        t0 = time.perf_counter()
        out = model(inputs)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        del out
    res = {"ms_per_sample": 1e3 * seconds / len(inputs), "rss_extra_bytes": rss.extra}
    if device.type == "cuda":
        res["cuda_extra_bytes"] = torch.cuda.max_memory_allocated(device) - start
    return res


def measure_modes(
    model: torch.nn.Module, inputs: List[Dict[str, Any]], reps: int, device: torch.device
) -> Dict[str, Dict[str, Any]]:
    """``{"off": {...}, "on": {...}}``: median ms per sample and the highest extra memory over
    ``reps`` alternating passes of ``model(inputs)`` with ``return_candidates`` off / on (one
    unmeasured warm-up pass of each first). Restores the model's setting."""
    saved = model.return_candidates
    runs: Dict[str, List[Dict[str, float]]] = {"off": [], "on": []}
    try:
        for rep in range(reps + 1):
            for mode in ("off", "on"):
                model.return_candidates = mode == "on"
                r = _one_pass(model, inputs, device)
                if rep > 0:  # rep 0 warms up
                    runs[mode].append(r)
    finally:
        model.return_candidates = saved
    out: Dict[str, Dict[str, Any]] = {}
    for mode, rs in runs.items():
        out[mode] = {
            "ms_per_sample": statistics.median(r["ms_per_sample"] for r in rs),
            "peak_extra_rss_bytes": max(r["rss_extra_bytes"] for r in rs),
            "reps": len(rs),
        }
        if device.type == "cuda":
            out[mode]["peak_extra_cuda_bytes"] = max(r["cuda_extra_bytes"] for r in rs)
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="samples per forward")
    p.add_argument("--queries", type=int, default=200, help="MODEL.MASK_FORMER.NUM_OBJECT_QUERIES")
    p.add_argument("--image-size", type=int, nargs=2, default=(768, 1024), metavar=("H", "W"))
    p.add_argument("--orig-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    p.add_argument("--output", default="", help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    import flowseg  # noqa: F401  (registers FlowSeg's components)

    device = torch.device(args.device)
    bench_args = argparse.Namespace(tiny=True, device=args.device, dtype="float32", sam_act_checkpoint=False)
    with tempfile.TemporaryDirectory(prefix="flowseg_cand_") as workdir:
        files = write_model_files(workdir, tiny=True, vision="patch14-384")
        cfg = build_config("flowseg", bench_args, files)
        cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = args.queries
        cfg.INPUT.IMAGE_SIZE = max(args.image_size)
        model = build(cfg, args.device).eval()
    inputs = [
        eval_inputs(1, tuple(args.image_size), tuple(args.orig_size), image_id=i, seed=i)[0]
        for i in range(args.batch)
    ]
    result: Dict[str, Any] = {
        "settings": vars(args),
        "torch": torch.__version__,
        "modes": measure_modes(model, inputs, args.reps, device),
    }
    mib = 2**20
    print("| candidates | ms / sample | peak extra RSS (MiB) |\n|---|---|---|")
    for mode, r in result["modes"].items():
        print(f"| {mode} | {r['ms_per_sample']:.1f} | {r['peak_extra_rss_bytes'] / mib:.0f} |")
    print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
