#!/usr/bin/env python
"""Paper-scale dry run without a GPU: what breaks or costs too much only at the paper's sizes.

For every paper config (:data:`PAPER_CONFIGS`, as the files say, nothing but the weight sources
replaced) three checks, each a function here:

1. :func:`check_prompts` — the longest prompt of every task the config trains or evaluates
   (all category names of a panoptic data set as ``<p>`` spans, a long RefCOCOg-style expression,
   a long ReasonSeg-style query, a long conversation) tokenised with the config's
   ``MODEL.LLM.MAX_LENGTH`` through the condition head's own ``encode_sample``. Seconds.
2. :func:`count_on_meta` — the model at its true sizes on the ``meta`` device (no memory): parameter
   counts and the bytes of a full vs a trainable-only checkpoint (``SOLVER.CHECKPOINT_TRAINABLE_ONLY``)
   with the LLM / vision tower read from their folders, as the paper configs do.
3. :func:`run_on_cpu` — one real training step (forward, backward, AdamW step; the stage's
   freezing) and one inference per task, on the CPU, with the true token lengths, 1024x1024
   images, the config's query count, class count, widths and vocabulary (Qwen3-4B: 2560 wide,
   151,936 rows; SigLIP2-so400m: 1152 wide, 729 tokens); only the depths of the LLM, the vision
   tower and the SAM-ViT are cut (``--llm-layers``, ``--vision-layers``, ``--sam-depth``).
   Reports time and peak resident memory (:class:`flowseg.utils.memory.PeakRSS`).

The tokenizer is a byte-level BPE trained on the prompts' own words (whole-word tokens, as
Qwen's tokenizer gives for such English text): the real one is not available offline. Counts are
therefore close to, not equal to, Qwen's.

    python tools/dry_run.py                                  # all paper configs, all checks
    python tools/dry_run.py --configs configs/stages/stage3_joint.yaml --checks prompts
    python tools/dry_run.py --checks prompts meta             # seconds, no CPU training step

Exits non-zero when a config fails a check (the error is printed with the config's name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench.dry_checks import _config_weights, check_prompts, count_on_meta, run_on_cpu  # noqa: E402
from bench.paper import (  # noqa: E402
    IMAGE_SIZE,
    _cut_indexes,  # noqa: F401  (the SAM depth cut's index rule, tested through this tool)
    corpus_texts,
    model_files,
    paper_cfg,
    task_samples,
)

__all__ = [
    "PAPER_CONFIGS",
    "paper_cfg",
    "task_samples",
    "check_prompts",
    "count_on_meta",
    "run_on_cpu",
    "dry_run",
]

PAPER_CONFIGS = [
    "configs/flowseg_coco_panoptic.yaml",
    "configs/stages/stage1_segmentor.yaml",
    "configs/stages/stage2_projectors.yaml",
    "configs/stages/stage3_joint.yaml",
    "configs/flowseg_refcoco.yaml",
    "configs/flowseg_refcoco+.yaml",
    "configs/flowseg_refcocog.yaml",
    "configs/flowseg_reasonseg.yaml",
]


# ----------------------------------------------------------------------------------- driver
def dry_run(
    config_file: str,
    checks: Sequence[str] = ("prompts", "meta", "cpu"),
    *,
    workdir: str,
    llm_layers: int = 1,
    vision_layers: int = 1,
    sam_depth: int = 2,
    llm_dtype: str = "",
) -> Dict[str, Any]:
    """Run ``checks`` on one config; returns the numbers (raises on the first failing check).
    ``llm_dtype`` replaces ``MODEL.LLM.TORCH_DTYPE`` in the CPU check ("": the config's)."""
    import flowseg  # noqa: F401  (registers FlowSeg's components and data sets)

    res: Dict[str, Any] = {"config": config_file}
    texts = corpus_texts()
    if "prompts" in checks or "meta" in checks:
        files = model_files(workdir, 0, 0, texts)  # true depths: meta only
        cfg = paper_cfg(config_file, files, "cpu")
        samples = task_samples(cfg)
        res["prompt_tokens"] = check_prompts(cfg, samples)
        res["max_length"] = cfg.MODEL.LLM.MAX_LENGTH
        if "meta" in checks:
            res["meta"] = count_on_meta(cfg, _config_weights(config_file))
    if "cpu" in checks:
        files = model_files(workdir, llm_layers, vision_layers, texts)
        cfg = paper_cfg(config_file, files, "cpu", sam_depth)
        if llm_dtype:
            cfg.MODEL.LLM.TORCH_DTYPE = llm_dtype
        samples = task_samples(cfg, torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8))
        tokens = check_prompts(cfg, samples)
        t0 = time.perf_counter()
        res["cpu"] = run_on_cpu(cfg, samples, tokens)
        res["cpu"]["total_s"] = time.perf_counter() - t0
        res["cpu"]["cut"] = {"llm_layers": llm_layers, "vision_layers": vision_layers, "sam_depth": sam_depth}
        res["cpu"]["llm_dtype"] = cfg.MODEL.LLM.TORCH_DTYPE
    return res


def _row(r: Dict[str, Any]) -> str:
    gib = 2**30
    tok = ", ".join(f"{k} {v}" for k, v in r.get("prompt_tokens", {}).items()) or "-"
    meta = r.get("meta", {})
    ck = meta.get("checkpoint_bytes", {})
    size = f"{ck['full'] / gib:.2f} / {ck['trainable_only'] / gib:.3f}" if ck else "-"
    cpu = r.get("cpu", {})
    tr, inf = cpu.get("train", {}), cpu.get("inference", {})
    step = f"{tr['task']} {tr['s']:.0f} s, {tr['peak_rss'] / gib:.1f} GiB" if tr else "-"
    infer = f"{inf['task']} {inf['s']:.0f} s, {inf['peak_rss'] / gib:.1f} GiB" if inf else "-"
    params = f"{meta['params']['total'] / 1e9:.3f}B" if meta else "-"
    status = "FAILED: " + r["error"].splitlines()[0][:120] if "error" in r else "ok"
    return f"| {r['config']} | {status} | {tok} / {r.get('max_length', '-')} | {params} | {size} | {step} | {infer} |"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=PAPER_CONFIGS)
    p.add_argument(
        "--checks", nargs="+", default=["prompts", "meta", "cpu"], choices=["prompts", "meta", "cpu"]
    )
    p.add_argument("--llm-layers", type=int, default=1)
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--sam-depth", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument(
        "--llm-dtype",
        default="",
        help="LLM dtype of the CPU check (default: the config's). CPUs without native bfloat16 "
        "(e.g. AVX2 only) run bf16 matrix products in PyTorch's reference loop, 20-40 min a step: "
        "float32 goes through MKL (the LLM's weights then take twice the memory)",
    )
    p.add_argument("--output", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="flowseg_dry_run_") as workdir:
        for config in args.configs:
            try:
                r = dry_run(
                    config,
                    args.checks,
                    workdir=workdir,
                    llm_layers=args.llm_layers,
                    vision_layers=args.vision_layers,
                    sam_depth=args.sam_depth,
                    llm_dtype=args.llm_dtype,
                )
            except Exception as e:  # report every config, then fail
                r = {
                    "config": config,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc(),
                }
            results.append(r)
            print(_row(r), flush=True)
    print(
        "\n| config | status | prompt tokens / MAX_LENGTH | params | checkpoint GiB full / trainable-only "
        "| train step (CPU) | inference (CPU) |\n|---|---|---|---|---|---|---|"
    )
    print("\n".join(_row(r) for r in results))
    for r in results:
        if "traceback" in r:
            print(f"\n{r['config']}:\n{r['traceback']}", file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
