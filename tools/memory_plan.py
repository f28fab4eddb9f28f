#!/usr/bin/env python
"""Per-GPU memory plan of the paper configs: weights, gradients, AdamW state, activations and the
peak of one training step, per engine (DDP; ZeRO-2-like sharding of gradients and optimizer state
over N GPUs; full sharding, weights too), activation checkpointing off / on and batch per GPU, and
whether it fits 80 GB (H100) and 96 GB (H20).

* Weights and trainable parameters: the model at its true sizes on the ``meta`` device (exact; the
  LLM's vocabulary padded to Qwen3's tokenizer length, as Table 9 counts).
* Activations: one float32 training step on the CPU of the config at its true widths, token
  lengths and 1024² image, depths cut (``--llm-layers``, ``--vision-layers``, ``--sam-depth``);
  ``tools/bench/memplan.py`` counts the bytes saved for backward per block kind and extrapolates
  them by true depth and batch; what the step needed beyond them (backward's temporaries) is
  taken as depth-independent. A bfloat16 GPU run saves fewer bytes than this float32
  measurement (matmul outputs in bf16, norms and softmax in float32): the plan is an upper bound
  there, plus autocast's cached bf16 copy of every trained float32 weight.
* The engine's own buffers: DDP's gradient buckets (a second gradient copy); a fully sharded
  engine gathers at least the largest parameter at a time.

* ``--loader``: samples per second of one worker for each paper config's training mapper on data
  written in the real formats (``tools/bench/loader.py``; ``--loader-images`` JPEGs of
  ``--loader-image-size``), and the workers 8 GPUs need at ``--step-s`` seconds a step.

    python tools/memory_plan.py --configs configs/flowseg_refcoco.yaml --output plan.json
    python tools/memory_plan.py --loader --configs    # the data loader only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench import memplan  # noqa: E402
from bench.dry_checks import _pick, _with_instances, check_prompts  # noqa: E402
from bench.models import QWEN3_TOKENIZER_LEN, build, pad_vocabulary  # noqa: E402
from bench.paper import (  # noqa: E402
    IMAGE_SIZE,
    MODEL_CONFIGS,
    corpus_texts,
    model_files,
    paper_cfg,
    task_samples,
)

CAPACITIES_GB = (80, 96)


def true_size_files(workdir: str) -> Dict[str, str]:
    """Qwen3-4B / SigLIP-so400m configs at true depth and a tokenizer of Qwen3's length."""
    from flowseg.modeling.language.llm import load_tokenizer

    files = model_files(workdir, 0, 0, corpus_texts())
    padded = os.path.join(workdir, "tokenizer_padded")
    pad_vocabulary(load_tokenizer(files["tokenizer"]), QWEN3_TOKENIZER_LEN).save_pretrained(padded)
    return dict(files, tokenizer=padded)


def true_size_static(config_file: str, workdir: str) -> Dict[str, Any]:
    """Exact bytes / counts and block depths of ``config_file``'s model on ``meta``."""
    from flowseg.engine.freezing import apply_stage_freezing

    cfg = paper_cfg(config_file, true_size_files(workdir), "meta")
    model = build(cfg, "meta")
    apply_stage_freezing(model, cfg)
    return {"static": memplan.static_bytes(model), "depths": memplan.depths(model)}


def measured_step(config_file: str, workdir: str, cut: Dict[str, int]) -> Dict[str, Any]:
    """The float32 CPU step of ``config_file`` at depths ``cut``: saved bytes per block kind and
    the working set beyond them (activation checkpointing off, the LLM in float32)."""
    from detectron2.modeling import build_model
    from flowseg.engine.freezing import apply_stage_freezing

    files = model_files(workdir, cut["llm_layers"], cut["vision_layers"], corpus_texts())
    cfg = paper_cfg(config_file, files, "cpu", cut["sam_depth"])
    cfg.MODEL.LLM.TORCH_DTYPE = "float32"  # bf16 matmuls crawl on CPUs without native support
    for key in set(memplan.CHECKPOINTED_BY.values()):
        cfg.merge_from_list([key, False])
    samples = task_samples(cfg, torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8))
    tokens = check_prompts(cfg, samples)
    task = _pick(tokens, list(samples))
    classes = len(samples[task].get("class_names") or []) or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    torch.manual_seed(0)
    model = build_model(cfg)
    apply_stage_freezing(model, cfg)
    acts, extra = memplan.measure_step(model, cfg, [_with_instances(samples[task], classes)])
    static = memplan.static_bytes(model)
    return {
        "task": task,
        "prompt_tokens": tokens.get(task, 0),
        "acts": acts,
        "step_extra": extra,
        "working_set": memplan.working_set(acts, static, extra),
        "trainable": static["trainable"],
    }


def depth_check(
    config_file: str, workdir: str, cut: Dict[str, int], deeper: Dict[str, int]
) -> Dict[str, Any]:
    """The plan made from the step at depths ``cut`` against a measured step at depths ``deeper``:
    the RSS each step needed beyond the built model, predicted vs measured."""
    a = measured_step(config_file, workdir, cut)
    b = measured_step(config_file, workdir, deeper)
    acts = memplan.activation_bytes(a["acts"], b["acts"].measured_depths, ())
    static = {"trainable": b["trainable"], "weights_bytes": 0, "largest_param_bytes": 0}
    row = memplan.plan_row(
        static, acts, engine="zero2", gpus=1, batch=1, checkpointing=False,
        autocast_copies=False, working_set=a["working_set"],
    )  # fmt: skip
    return {"config": config_file, "cut": cut, "deeper": deeper, "predicted_saved_bytes": acts,
            "measured_saved_bytes": b["acts"].total(), "predicted_step_bytes": row.peak,
            "measured_step_bytes": b["step_extra"], "ratio": row.peak / b["step_extra"]}  # fmt: skip


def finetuning(cfg: Any) -> str:
    """How the config trains its LLM: "no LLM", "LoRA", "frozen LLM" or "full"."""
    from flowseg.config import llm_configured

    if not llm_configured(cfg):
        return "no LLM"
    if cfg.MODEL.LLM.LORA.ENABLED:
        return "LoRA"
    return "frozen LLM" if cfg.MODEL.LLM.FREEZE else "full"


def checkpointed_kinds(cfg: Any) -> List[str]:
    return [k for k, key in memplan.CHECKPOINTED_BY.items() if _get(cfg, key)]


def _get(cfg: Any, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def plan_config(config_file: str, args: argparse.Namespace, workdir: str) -> Dict[str, Any]:
    """Every row of one config (see :func:`memplan.plan_row`)."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, config_file))
    true = true_size_static(config_file, workdir)
    cut = {"llm_layers": args.llm_layers, "vision_layers": args.vision_layers, "sam_depth": args.sam_depth}
    step = measured_step(config_file, workdir, cut)
    acts = step["acts"]
    ckpt_kinds = [k for k in memplan.CHECKPOINTED_BY if k in acts.per_block]
    bf16 = bool(cfg.SOLVER.AMP.ENABLED) and cfg.SOLVER.AMP.PRECISION == "bfloat16"
    per_gpu = args.batch or [max(cfg.SOLVER.IMS_PER_BATCH // args.gpus, 1)]
    rows = []
    for engine in ("ddp", "zero2", "full"):
        for ckpt in (False, True):
            per_sample = memplan.activation_bytes(acts, true["depths"], ckpt_kinds if ckpt else ())
            for batch in per_gpu:
                row = memplan.plan_row(
                    true["static"], per_sample, engine=engine, gpus=args.gpus, batch=batch,
                    checkpointing=ckpt, autocast_copies=bf16, working_set=step["working_set"],
                )  # fmt: skip
                rows.append(dict(vars(row), fits={f"{c}GB": row.fits(c) for c in CAPACITIES_GB}))
    return {
        "config": config_file,
        "finetuning": finetuning(cfg),
        "config_checkpointing": checkpointed_kinds(cfg),
        "static": true["static"],
        "depths": true["depths"],
        "measured": {
            "cut": cut,
            "task": step["task"],
            "prompt_tokens": step["prompt_tokens"],
            "per_block_bytes": acts.per_block,
            "block_input_bytes": acts.inputs,
            "other_bytes": acts.other,
            "step_extra_bytes": step["step_extra"],
            "working_set_bytes": step["working_set"],
        },
        "rows": rows,
    }


def table(results: Sequence[Dict[str, Any]]) -> str:
    lines = [
        "| config | fine-tuning | engine | act. ckpt | batch/GPU | weights | grads | AdamW | activations | peak | 80 GB | 96 GB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|:-:|:-:|",
    ]
    for r in results:
        for row in r["rows"]:
            engine = row["engine"] if row["engine"] == "ddp" else f"{row['engine']} /{row['gpus']}"
            gb = [
                f"{row[k] / memplan.GB:.1f}" for k in ("weights", "grads", "optimizer", "activations", "peak")
            ]
            fits = ["yes" if row["fits"][f"{c}GB"] else "no" for c in CAPACITIES_GB]
            name = os.path.basename(r["config"])
            ckpt = "on" if row["checkpointing"] else "off"
            lines.append(
                f"| {name} | {r['finetuning']} | {engine} | {ckpt} | {row['batch']} | "
                + " | ".join(gb + fits)
                + " |"
            )
    return "\n".join(lines)


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="*", default=MODEL_CONFIGS)
    p.add_argument("--gpus", type=int, default=8, help="GPUs the sharded engines shard over")
    p.add_argument(
        "--batch", type=int, nargs="*", default=[], help="samples per GPU (default: IMS_PER_BATCH / --gpus)"
    )
    p.add_argument("--llm-layers", type=int, default=1, help="LLM depth of the CPU measurement")
    p.add_argument("--vision-layers", type=int, default=1)
    p.add_argument("--sam-depth", type=int, default=2)
    p.add_argument("--output", default="", help="also write the JSON here")
    p.add_argument(
        "--check-depths", type=int, nargs=3, default=None, metavar=("LLM", "VISION", "SAM"),
        help="instead of the plan: predict a step at these depths from the cut step and measure it",
    )  # fmt: skip
    p.add_argument("--loader", action="store_true", help="also measure the data loader")
    p.add_argument("--loader-images", type=int, default=16)
    p.add_argument("--loader-image-size", type=int, default=640, help="short side of the written JPEGs")
    p.add_argument("--loader-seconds", type=float, default=10.0, help="mapping time per mapper")
    p.add_argument(
        "--step-s", type=float, default=1.2, help="training step time assumed for the workers needed"
    )
    p.add_argument("--loader-root", default="", help=argparse.SUPPRESS)  # the child process's data
    return p.parse_args(argv)


def loader_report(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """Write the data, then measure in a child process whose ``DETECTRON2_DATASETS`` points at it
    (the builtin data set names are registered from it at import)."""
    import subprocess

    from bench import loader

    with tempfile.TemporaryDirectory(prefix="flowseg_loader_") as root:
        loader.write_data(root, args.loader_images, args.loader_image_size)
        out = os.path.join(root, "loader.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--configs", "--loader-root", root, "--output", out]
        cmd += ["--loader-seconds", str(args.loader_seconds)]
        subprocess.run(cmd, check=True, env=dict(os.environ, DETECTRON2_DATASETS=root))
        with open(out) as f:
            rows = json.load(f)
    print("\n| mapper | config | samples/s per worker | workers for 8 GPUs |\n|---|---|---:|---:|")
    for r in rows:
        from detectron2.config import get_cfg
        from flowseg import add_flowseg_config

        cfg = add_flowseg_config(get_cfg())
        cfg.merge_from_file(os.path.join(ROOT, r["config"]))
        per_gpu = max(cfg.SOLVER.IMS_PER_BATCH // 8, 1)
        r["workers_for_8_gpus"] = loader.workers_needed(r["samples_per_s"], 8, per_gpu, args.step_s)
        r["assumed_step_s"], r["batch_per_gpu"] = args.step_s, per_gpu
        print(f"| {r['kind']} | {r['config']} | {r['samples_per_s']:.1f} | {r['workers_for_8_gpus']} |")
    return rows


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    import flowseg  # noqa: F401  (registers the data sets the prompts list)

    args = parse_args(argv)
    if args.loader_root:
        from bench import loader

        with open(args.output, "w") as f:
            json.dump(loader.measure_all(args.loader_seconds, ROOT), f)
        return []
    results: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="flowseg_memory_plan_") as workdir:
        if args.check_depths:
            cut = {
                "llm_layers": args.llm_layers,
                "vision_layers": args.vision_layers,
                "sam_depth": args.sam_depth,
            }
            deeper = dict(zip(("llm_layers", "vision_layers", "sam_depth"), args.check_depths))
            checks = [depth_check(c, workdir, cut, deeper) for c in args.configs]
            print(json.dumps(checks, indent=2))
            return checks
        for config in args.configs:
            t0 = time.perf_counter()
            results.append(plan_config(config, args, workdir))
            print(f"[memory_plan] {config}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    if results:
        print(table(results))
    report: Dict[str, Any] = {"plan": results}
    if args.loader:
        report["loader"] = loader_report(args)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2, default=lambda o: getattr(o, "__dict__", str(o)))
    return results


if __name__ == "__main__":
    main()
