"""Benchmark inputs and measurements: inference / training-step time and peak memory, and
evaluation with image features shared across expressions."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from typing import Any, Callable, Dict, List

import torch

EXPRESSIONS = [
    "the man in the red shirt on the left",
    "woman holding an umbrella",
    "second car from the right",
    "the small dog next to the bench",
    "blue bus",
    "guy wearing a white hat behind the table",
    "the pizza closest to the camera",
    "left elephant",
    "the tallest giraffe in the middle",
    "a brown teddy bear sitting on the chair",
]


def eval_inputs(k: int, image_hw, orig_hw, image_id: int = 0, seed: int = 0) -> List[Dict[str, Any]]:
    """K evaluation dicts (the referring test mapper's format) that share one image tensor."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, *image_hw), dtype=torch.uint8, generator=g)
    return [
        {
            "image": image,
            "image_id": image_id,
            "expression": EXPRESSIONS[i % len(EXPRESSIONS)],
            "task": "referring",
            "height": orig_hw[0],
            "width": orig_hw[1],
        }
        for i in range(k)
    ]


def train_inputs(n: int, image_hw) -> List[Dict[str, Any]]:
    from detectron2.structures import BitMasks, Instances

    batch = []
    for i in range(n):
        x = eval_inputs(1, image_hw, image_hw, image_id=i, seed=i)[0]
        h, w = image_hw
        mask = torch.zeros(1, h, w, dtype=torch.bool)
        mask[0, h // 4 : h // 2 + i % 8 * (h // 32), w // 5 : w // 2] = True
        inst = Instances((h, w))
        inst.gt_classes = torch.zeros(1, dtype=torch.int64)
        inst.gt_masks = mask
        inst.gt_boxes = BitMasks(mask).get_bounding_boxes()
        x.pop("height"), x.pop("width")
        batch.append({**x, "instances": inst})
    return batch


# ----------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, dtype: str):
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def measure(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int) -> Dict[str, Any]:
    """Median / min wall time (ms) of ``fn`` and, on CUDA, its peak allocated memory (bytes)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(reps, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "reps": len(times),
        "peak_memory_bytes": peak,
    }


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def train_step(model, cfg, batch, device, dtype: str, reps: int, warmup: int) -> Dict[str, Any]:
    """One optimizer step (forward, backward, AdamW) on ``batch``: time and peak memory."""
    from flowseg.engine import build_optimizer

    model.train()
    optimizer = build_optimizer(cfg, model)

    def step() -> None:
        with autocast(device, dtype):
            losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        res = measure(step, device, reps, warmup)
    except RuntimeError as e:
        if not _is_oom(e):
            raise
        res = {"oom": True, "error": str(e).splitlines()[0]}
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()  # AdamW moments: 8 bytes per trainable parameter
        model.eval()
        _free(device)
    res["batch"] = len(batch)
    return res


def shared_eval(
    model, k: int, image_hw, orig_hw, device, dtype: str, reps: int, warmup: int
) -> Dict[str, Any]:
    """ms per expression for K expressions of one image: per expression vs shared features."""
    from flowseg.engine.shared_features import SharedImageFeatureInference

    inputs = eval_inputs(k, image_hw, orig_hw, image_id=1, seed=1)
    model.eval()

    def run(fn: Callable[[], Any]) -> Dict[str, Any]:
        def go() -> None:
            with torch.no_grad(), autocast(device, dtype):
                fn()

        r = measure(go, device, reps, warmup)
        r["ms_per_expression"] = r["ms"] / k
        return r

    out: Dict[str, Any] = {"k": k}
    out["per_expression"] = run(lambda: [model([x]) for x in inputs])
    for name, prefix in (("shared_encoders", False), ("shared_encoders_and_llm_prefix", True)):
        wrapper = SharedImageFeatureInference(model, max_expressions_per_pass=k, share_llm_prefix=prefix)
        out[name] = run(lambda w=wrapper: w(inputs))
        out[name]["speedup"] = out["per_expression"]["ms"] / out[name]["ms"]
    return out
