"""The dry run's checks: prompt lengths, true-size counts on the meta device, a CPU step."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Dict, List, Sequence

import torch

from . import ROOT
from .models import build
from .paper import IMAGE_SIZE
from .params import param_counts


def check_prompts(cfg: Any, samples: Dict[str, Dict[str, Any]]) -> Dict[str, int]:
    """Text tokens of each task's longest prompt; raises ``ValueError`` (the condition head's own
    error) when one exceeds ``MODEL.LLM.MAX_LENGTH``. ``{}`` for a model without an LLM."""
    from flowseg.config import llm_configured
    from flowseg.modeling.language.llm import load_tokenizer
    from flowseg.modeling.language.prompts import encode_sample
    from flowseg.modeling.language.tokens import SpecialTokenIds, add_special_tokens

    if not llm_configured(cfg):
        return {}
    tok = load_tokenizer(cfg.MODEL.LLM.TOKENIZER_PATH or cfg.MODEL.LLM.PATH)
    add_special_tokens(tok)
    ids = SpecialTokenIds.from_tokenizer(tok)
    with_image = bool(cfg.MODEL.VANILLA_ENCODER.ENABLED)
    out = {}
    for task, x in samples.items():
        enc = encode_sample(tok, x, ids, with_image=with_image, max_length=cfg.MODEL.LLM.MAX_LENGTH)
        out[task] = len(enc.input_ids)
    return out


def count_on_meta(cfg: Any, base_weights: str = "") -> Dict[str, Any]:
    """Parameter counts and checkpoint bytes of the true-size model (built on ``meta``).
    ``base_weights``: the config's ``MODEL.WEIGHTS``; its frozen tensors then count as restored
    from it (a stage-1 file holds the segmentor)."""
    from flowseg.checkpoint.trainable import checkpoint_bytes
    from flowseg.engine.freezing import apply_stage_freezing

    cfg = cfg.clone()
    cfg.MODEL.DEVICE = "meta"
    model = build(cfg, "meta")
    apply_stage_freezing(model, cfg)
    sources = cfg.clone()  # the paper configs read the LLM and the tower from folders
    if sources.MODEL.LLM.CONFIG:
        sources.MODEL.LLM.PATH = "<MODEL.LLM.PATH>"
        sources.MODEL.VANILLA_ENCODER.PATH = "<MODEL.VANILLA_ENCODER.PATH>"
    loaded = None
    if base_weights:
        from flowseg.checkpoint import component_of

        own = [k for k in model.state_dict() if not component_of(k).startswith("condition_head")]
        loaded = {"file": base_weights, "own_keys": own}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "params": param_counts(model),
        "trainable_params": trainable,
        "checkpoint_bytes": checkpoint_bytes(model, sources, loaded),
    }


def _with_instances(x: Dict[str, Any], num_classes: int, size: int = IMAGE_SIZE) -> Dict[str, Any]:
    """``x`` with ground truth: one target (referring / reasoning) or 8 segments of distinct classes."""
    from detectron2.structures import BitMasks, Instances

    n = 1 if x["task"] in ("referring", "reasoning") else min(8, max(num_classes, 1))
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    step = size // n
    for i in range(n):
        masks[i, i * step : (i + 1) * step, size // 8 : size // 2 + i * 16] = True
    inst = Instances((size, size))
    inst.gt_masks = BitMasks(masks)
    inst.gt_classes = (
        torch.arange(n) * max(num_classes // n, 1) if n > 1 else torch.zeros(1, dtype=torch.long)
    )
    inst.gt_boxes = inst.gt_masks.get_bounding_boxes()
    return {k: v for k, v in x.items() if k not in ("height", "width")} | {"instances": inst}


def _pick(tokens: Dict[str, int], tasks: Sequence[str]) -> str:
    """The segmentation task with the longest prompt (conversation only when there is no other)."""
    seg = [t for t in tasks if t != "conversation"]
    pool = seg or list(tasks)
    return max(pool, key=lambda t: (tokens.get(t, 0), t))


def run_on_cpu(cfg: Any, samples: Dict[str, Dict[str, Any]], tokens: Dict[str, int]) -> Dict[str, Any]:
    """One training step and one inference on the CPU: time (s) and peak RSS (bytes) of each.
    Without autocast (the segmentor in fp32; ``train_net.py`` would autocast to
    ``SOLVER.AMP.PRECISION`` on the CPU too, ~1 hour a step on CPUs without native bf16), the LLM /
    tower in ``MODEL.LLM.TORCH_DTYPE``."""
    from detectron2.modeling import build_model
    from flowseg.engine import build_optimizer
    from flowseg.engine.freezing import apply_stage_freezing
    from flowseg.utils.memory import PeakRSS

    out: Dict[str, Any] = {}
    _progress(f"{cfg.OUTPUT_DIR}: building the model")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        torch.manual_seed(0)
        model = build_model(cfg)
        apply_stage_freezing(model, cfg)
        out["build_s"] = time.perf_counter() - t0
    out["build_peak_rss"] = mem.peak
    train_tasks = [t for t in _tasks_of(cfg, cfg.DATASETS.TRAIN) if t in samples] or list(samples)
    task = _pick(tokens, train_tasks)
    num_classes = len(samples[task].get("class_names") or []) or cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    batch = [_with_instances(samples[task], num_classes)]
    optimizer = build_optimizer(cfg, model)
    model.train()
    _progress(
        f"training step ({task}, {tokens.get(task, 0)} prompt tokens) after {out['build_s']:.0f} s of build"
    )
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        out["train"] = {"task": task, "s": time.perf_counter() - t0, "loss": float(loss)}
    out["train"].update(peak_rss=mem.peak, extra_rss=mem.extra, loss_terms=sorted(losses))
    del losses, loss, optimizer, batch
    test_tasks = [t for t in _tasks_of(cfg, cfg.DATASETS.TEST) if t in samples and t != "conversation"]
    task = _pick(tokens, test_tasks or [t for t in samples if t != "conversation"])
    model.eval()
    _progress(f"inference ({task}) after a {out['train']['s']:.0f} s training step")
    with PeakRSS() as mem, torch.no_grad():
        t0 = time.perf_counter()
        result = model([samples[task]])[0]
        out["inference"] = {"task": task, "s": time.perf_counter() - t0, "outputs": sorted(result)}
    out["inference"].update(peak_rss=mem.peak, extra_rss=mem.extra)
    return out


def _progress(msg: str) -> None:
    print(f"[dry_run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _tasks_of(cfg: Any, names: Sequence[str]) -> List[str]:
    from detectron2.data import MetadataCatalog
    from flowseg.data.mixed import EVALUATOR_TYPE_TO_TASK

    tasks = [EVALUATOR_TYPE_TO_TASK.get(MetadataCatalog.get(n).get("evaluator_type", None)) for n in names]
    return [t for t in dict.fromkeys(tasks) if t is not None]


def _config_weights(config_file: str) -> str:
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(os.path.join(ROOT, config_file))
    return cfg.MODEL.WEIGHTS
