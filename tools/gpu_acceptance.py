#!/usr/bin/env python
"""GPU acceptance run (one GPU, about 8 minutes on an H100): what the CPU cannot check, in one JSON.

1. The CUDA-only tests (the test files that look for a GPU; ``pytest -k cuda``).
2. One training step of each paper config at its true sizes (Qwen3-4B, SigLIP2-so400m, SAM-ViT-L,
   1024² images, the longest prompt of the config's tasks; random weights) under bf16 autocast,
   wrapped by the engine of ``--engine``: ``ddp`` (a one-process DistributedDataParallel) or
   ``fsdp`` (``MODEL.DISTRIBUTED.ENGINE fsdp``: the trainer's FSDP2 sharding, over one process).
   Time, loss and peak allocated memory.
3. Table 9's latency and peak memory, baseline vs FlowSeg (``tools/benchmark.py``).
4. Each step's peak against the memory plan (``--plan``: the JSON of ``tools/memory_plan.py
   --gpus 1 --batch 1``), its row for the engine, one GPU, batch 1 and the config's
   activation checkpointing.

``--dry``: the same path on the CPU at the tiny test sizes (the tiny configs, CUDA tests only
collected, the benchmark with ``--tiny``), for the test suite.

    python tools/gpu_acceptance.py --plan plan.json --output acceptance.json
    python tools/gpu_acceptance.py --dry --output acceptance_dry.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from bench.paper import MODEL_CONFIGS  # noqa: E402

DRY_CONFIGS = ["configs/tiny/flowseg_refer_tiny.yaml", "configs/tiny/stage3_tiny.yaml"]
ENGINE_KEY = "MODEL.DISTRIBUTED.ENGINE"


def cuda_tests(dry: bool) -> Dict[str, Any]:
    """``pytest -k cuda`` over the test files that ask for a GPU (``--collect-only`` when dry)."""
    tests = os.path.join(ROOT, "tests")
    files = sorted(
        os.path.join(tests, f)
        for f in os.listdir(tests)
        if f.startswith("test_") and f.endswith(".py") and "cuda" in _read(os.path.join(tests, f))
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-k", "cuda", *files] + (
        ["--collect-only"] if dry else []
    )
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    return {"files": [os.path.relpath(f, ROOT) for f in files], "returncode": proc.returncode,
            "summary": tail[0] if tail else proc.stderr[-500:], "s": time.perf_counter() - t0}  # fmt: skip


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _engine_cfg(cfg: Any, engine: str) -> None:
    cfg.merge_from_list([ENGINE_KEY, engine])


def _process_group(device: torch.device) -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        port = 29500 + os.getpid() % 1000
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def wrap(model: torch.nn.Module, cfg: Any, engine: str, device: torch.device) -> torch.nn.Module:
    """The model under the training engine: DDP, or FSDP2 sharding as the trainer does it."""
    _process_group(device)
    if engine == "ddp":
        from flowseg.engine.ddp import ddp_kwargs
        from torch.nn.parallel import DistributedDataParallel

        kwargs = ddp_kwargs(cfg, model)
        if device.type == "cuda":
            kwargs["device_ids"] = [device.index or 0]
        return DistributedDataParallel(model, **kwargs)
    from flowseg.engine.fsdp import shard_model

    return shard_model(cfg, model)  # the trainer's own sharding, over this one process


def train_step(cfg: Any, batch: List[Dict[str, Any]], engine: str, device: torch.device) -> Dict[str, Any]:
    """One bf16-autocast training step of ``cfg``'s model with random weights, built on ``device``."""
    from bench.models import build
    from flowseg.engine import build_optimizer
    from flowseg.engine.freezing import apply_stage_freezing

    model = build(cfg, device.type)
    apply_stage_freezing(model, cfg)
    model = wrap(model, cfg, engine, device)
    optimizer = build_optimizer(cfg, getattr(model, "module", model))
    model.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        losses = model(batch)
    loss = sum(losses.values())
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    out = {"s": time.perf_counter() - t0, "loss": float(loss), "finite": bool(torch.isfinite(loss))}
    out["peak_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    out["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    del model, optimizer, losses, loss
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def step_inputs(cfg: Any, dry: bool) -> List[Dict[str, Any]]:
    if dry:
        from bench.measure import train_inputs

        return train_inputs(1, (cfg.INPUT.IMAGE_SIZE, cfg.INPUT.IMAGE_SIZE))
    from bench.dry_checks import _pick, _with_instances, check_prompts
    from bench.paper import task_samples

    samples = task_samples(cfg)
    task = _pick(check_prompts(cfg, samples), list(samples))
    classes = len(samples[task].get("class_names") or []) or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    return [_with_instances(samples[task], classes)]


def config_of(config_file: str, workdir: str, dry: bool, device: torch.device) -> Any:
    if dry:
        from detectron2.config import get_cfg
        from flowseg import add_flowseg_config
        from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

        paths = make_tiny_llm_dir(os.path.join(workdir, "tiny_llm"))
        cfg = add_flowseg_config(get_cfg())
        cfg.merge_from_file(os.path.join(ROOT, config_file))
        cfg.merge_from_list(
            tiny_llm_cfg_overrides(paths) + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device.type]
        )
        return cfg
    from bench.paper import paper_cfg
    from memory_plan import true_size_files

    # Qwen3's vocabulary length: the embedding (and its gradients, AdamW state) at true size
    return paper_cfg(config_file, true_size_files(workdir), device.type)


def plan_peak(plan: Optional[Dict[str, Any]], config_file: str, cfg: Any, engine: str) -> Optional[float]:
    """The plan's peak for one GPU, batch 1, ``engine`` and the config's checkpointing."""
    if not plan:
        return None
    from memory_plan import checkpointed_kinds

    ckpt = bool(checkpointed_kinds(cfg))
    want = "ddp" if engine == "ddp" else "zero2"
    for r in plan.get("plan", []):
        if r["config"] == config_file:
            for row in r["rows"]:
                if (row["engine"], row["gpus"], row["batch"], row["checkpointing"]) == (want, 1, 1, ckpt):
                    return row["peak"]
    return None


def benchmark(dry: bool, device: torch.device) -> Dict[str, Any]:
    """Table 9's inference latency and peak memory, baseline vs FlowSeg."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", os.path.join(ROOT, "tools", "benchmark.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    args = ["--device", device.type, "--train-batch", "0", "--k", "0", "--skip-flops"]
    args += ["--tiny", "--reps", "1", "--warmup", "0"] if dry else ["--dtype", "bfloat16", "--reps", "10"]
    res = tool.main(args)
    return {v: res[v]["inference"] for v in ("baseline", "flowseg")}


def run(args: argparse.Namespace) -> Dict[str, Any]:
    import flowseg  # noqa: F401  (registers FlowSeg's components and data sets)

    device = torch.device("cpu" if args.dry else "cuda")
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("gpu_acceptance: no CUDA device (use --dry for the CPU version)")
    plan = None
    if args.plan:
        with open(args.plan) as f:
            plan = json.load(f)
    out: Dict[str, Any] = {"dry": args.dry, "engine": args.engine, "torch": torch.__version__}
    out["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    t0 = time.perf_counter()
    out["cuda_tests"] = cuda_tests(args.dry) if not args.skip_tests else None
    out["train_steps"] = {}
    with tempfile.TemporaryDirectory(prefix="flowseg_acceptance_") as workdir:
        for config in args.configs or (DRY_CONFIGS if args.dry else MODEL_CONFIGS):
            cfg = config_of(config, workdir, args.dry, device)
            planned = plan_peak(plan, config, cfg, args.engine)
            try:
                _engine_cfg(cfg, args.engine)
                res = train_step(cfg, step_inputs(cfg, args.dry), args.engine, device)
            except torch.cuda.OutOfMemoryError as e:
                # expected where the plan says the step does not fit this GPU
                capacity = torch.cuda.get_device_properties(device).total_memory
                res = {"oom": True, "error": str(e).splitlines()[0]}
                res["oom_expected_by_plan"] = bool(planned and planned > capacity)
            except Exception as e:  # report every config: one failure must not hide the others
                res = {"error": f"{type(e).__name__}: {e}"}
            if planned and res.get("peak_bytes"):
                res["plan_peak_bytes"], res["measured_over_plan"] = planned, res["peak_bytes"] / planned
            out["train_steps"][config] = res
            print(f"[gpu_acceptance] {config}: {res}", file=sys.stderr, flush=True)
    out["table9"] = benchmark(args.dry, device) if not args.skip_benchmark else None
    out["total_s"] = time.perf_counter() - t0
    steps = out["train_steps"].values()
    out["ok"] = all(r.get("oom_expected_by_plan") or ("error" not in r and r["finite"]) for r in steps) and (
        out["cuda_tests"] is None or out["cuda_tests"]["returncode"] in (0, 5)  # 5: nothing selected
    )
    return out


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="CPU, tiny sizes (the test suite's version)")
    p.add_argument("--engine", default="ddp", choices=["ddp", "fsdp"])
    p.add_argument("--configs", nargs="*", default=[])
    p.add_argument("--plan", default="", help="tools/memory_plan.py --gpus 1 --batch 1 --output JSON")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--skip-benchmark", action="store_true")
    p.add_argument("--output", default="acceptance.json")
    args = p.parse_args(argv)
    out = run(args)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=2, default=str)
    print(json.dumps({k: out[k] for k in ("ok", "total_s")}))
    return out


if __name__ == "__main__":
    main()
