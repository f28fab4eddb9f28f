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
IMAGE_SIZE = 1024
# Long ends of the data: RefCOCOg expressions run to ~50 words, ReasonSeg long queries to ~80,
# LLaVA-Instruct answers to several hundred (conversations are cut at MAX_LENGTH by design).
LONG_EXPRESSION = (
    "the woman in the dark blue jacket with a white scarf who is standing on the left side of the "
    "picture next to the man holding a red umbrella and looking down at the small brown dog sitting "
    "on the wet pavement in front of the old wooden bench near the lamp post"
)
LONG_QUERY = (
    "When people spend a whole afternoon in a park like this one and the weather suddenly turns, "
    "they usually look for something that keeps them dry without having to go back home; in this "
    "picture there are several objects that could serve that purpose, but only one of them is "
    "already open and being held above someone's head by the man who walks behind the bench. "
    "Which object in the image would protect a person from the rain right now, and why?"
)
LONG_ANSWER = " ".join([LONG_QUERY] * 12)


# ----------------------------------------------------------------------------------- config
def _write_json(path: str, config: Any) -> str:
    with open(path, "w") as f:
        json.dump(config.to_dict(), f)
    return path


def model_files(workdir: str, llm_layers: int, vision_layers: int, texts: Sequence[str]) -> Dict[str, str]:
    """Qwen3-4B / SigLIP-so400m configs at their true widths (depth given) and a tokenizer."""
    from benchmark import QWEN3_4B, SO400M
    from flowseg.utils.tiny_models import CHATML_TEMPLATE, make_tokenizer
    from transformers import Qwen3Config, SiglipVisionConfig

    corpus = [t for t in texts for _ in range(3)]
    tok = make_tokenizer(CHATML_TEMPLATE, vocab_size=6000, corpus=corpus)
    files = {"tokenizer": os.path.join(workdir, "tokenizer")}
    tok.save_pretrained(files["tokenizer"])
    llm = Qwen3Config(**dict(QWEN3_4B, num_hidden_layers=llm_layers or QWEN3_4B["num_hidden_layers"]))
    vision = SiglipVisionConfig(
        **dict(SO400M, num_hidden_layers=vision_layers or SO400M["num_hidden_layers"]),
        image_size=384,
        patch_size=14,
    )
    files["llm_config"] = _write_json(os.path.join(workdir, f"llm_{llm_layers}.json"), llm)
    files["vision_config"] = _write_json(os.path.join(workdir, f"vision_{vision_layers}.json"), vision)
    return files


def _cut_indexes(values: Sequence[int], depth: int, full: int) -> List[int]:
    # block i of `full` -> the block at the same relative depth of `depth` (order kept)
    return [max(0, min(depth - 1, (int(v) + 1) * depth // full - 1)) for v in values]


def cut_sam_depth(cfg: Any, depth: int) -> None:
    """Cut the SAM-ViT to ``depth`` blocks: ``MODEL.SAM_VIT.DEPTH``, the last block global, and every
    other list of block indexes under ``MODEL.SAM_VIT`` (the connector's 1-indexed blocks too)
    moved to the same relative depth."""
    from flowseg.modeling.backbone.sam_vit import SAM_VIT_PRESETS

    c = cfg.MODEL.SAM_VIT
    full = c.DEPTH or SAM_VIT_PRESETS[c.PRESET]["depth"]
    if depth <= 0 or depth >= full:
        return
    for key, value in c.items():
        if key != "GLOBAL_ATTN_INDEXES" and key.endswith(("INDEXES", "INDICES")) and value:
            c[key] = _cut_indexes(value, depth, full)
    if c.CONNECTOR.LAYERS:
        c.CONNECTOR.LAYERS = [i + 1 for i in _cut_indexes([v - 1 for v in c.CONNECTOR.LAYERS], depth, full)]
    c.DEPTH = depth
    c.GLOBAL_ATTN_INDEXES = [depth - 1]


def paper_cfg(config_file: str, files: Dict[str, str], device: str = "cpu", sam_depth: int = 0) -> Any:
    """The config of ``config_file`` with the LLM / vision tower built from ``files`` (no weight
    file is read: MODEL.WEIGHTS and the SAM checkpoint are emptied), on ``device``."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config
    from flowseg.config import llm_configured

    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, config_file))
    opts: List[Any] = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "MODEL.SAM_VIT.CHECKPOINT", ""]
    if llm_configured(cfg):
        opts += ["MODEL.LLM.PATH", "", "MODEL.LLM.CONFIG", files["llm_config"]]
        opts += ["MODEL.LLM.TOKENIZER_PATH", files["tokenizer"]]
        opts += ["MODEL.VANILLA_ENCODER.PATH", "", "MODEL.VANILLA_ENCODER.CONFIG", files["vision_config"]]
        # so400m-patch14-384 reads 27x27 patches (the stride-14 conv drops 6 px): 378 gives its 729 tokens
        opts += ["MODEL.VANILLA_ENCODER.IMAGE_SIZE", 378]
    cfg.merge_from_list(opts)
    cut_sam_depth(cfg, sam_depth)
    return cfg


# ----------------------------------------------------------------------------------- inputs
def _tasks(cfg: Any) -> Dict[str, str]:
    """task -> one data set of the config that has it (training sets first, then test sets)."""
    from detectron2.data import MetadataCatalog
    from flowseg.data.mixed import EVALUATOR_TYPE_TO_TASK

    out: Dict[str, str] = {}
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        task = EVALUATOR_TYPE_TO_TASK.get(MetadataCatalog.get(name).get("evaluator_type", None))
        if task is not None:
            out.setdefault(task, name)
    if cfg.MODEL.FLOWSEG.MODE == "referring":
        out.setdefault("referring", "")  # a referring model is always asked referring questions
    return out


def class_names(dataset_name: str) -> List[str]:
    from detectron2.data import MetadataCatalog

    meta = MetadataCatalog.get(dataset_name)
    return list(meta.get("stuff_classes", None) or meta.get("thing_classes", None) or [])


def task_samples(cfg: Any, image: Optional[torch.Tensor] = None) -> Dict[str, Dict[str, Any]]:
    """The longest sample of each task of ``cfg`` (model input dicts without ``instances``)."""
    image = torch.zeros(3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8) if image is None else image
    base = {"image": image, "height": IMAGE_SIZE, "width": IMAGE_SIZE, "image_id": 0}
    samples: Dict[str, Dict[str, Any]] = {}
    for task, dataset in _tasks(cfg).items():
        x: Dict[str, Any] = dict(base, task=task)
        if task == "generic":
            x.update(dataset_name=dataset, class_names=class_names(dataset))
        elif task == "referring":
            x.update(expression=LONG_EXPRESSION)
        elif task == "reasoning":
            x.update(expression=LONG_QUERY)
        elif task == "conversation":
            x["conversations"] = [
                {"from": "human", "value": LONG_QUERY},
                {"from": "gpt", "value": LONG_ANSWER},
            ]
        samples[task] = x
    return samples


def corpus_texts() -> List[str]:
    """What the dry-run tokenizer is trained on: every prompt text it will see."""
    from detectron2.data import MetadataCatalog

    names = sorted({n for d in MetadataCatalog.list() if "panoptic" in d for n in class_names(d)})
    # names as they appear in a class-list prompt: right after "<p>", no leading space
    return [LONG_EXPRESSION, LONG_QUERY, " ".join(names), *names, "Sure, it is the segmentation mask."]


# ----------------------------------------------------------------------------------- checks
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
    from benchmark import build, param_counts
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


def _with_instances(x: Dict[str, Any], num_classes: int) -> Dict[str, Any]:
    """``x`` with ground truth: one target (referring / reasoning) or 8 segments of distinct classes."""
    from detectron2.structures import BitMasks, Instances

    n = 1 if x["task"] in ("referring", "reasoning") else min(8, max(num_classes, 1))
    masks = torch.zeros(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    step = IMAGE_SIZE // n
    for i in range(n):
        masks[i, i * step : (i + 1) * step, IMAGE_SIZE // 8 : IMAGE_SIZE // 2 + i * 16] = True
    inst = Instances((IMAGE_SIZE, IMAGE_SIZE))
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
    As ``train_net.py`` on a CPU: AMP off (the segmentor in fp32), the LLM / tower in
    ``MODEL.LLM.TORCH_DTYPE``."""
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


# ----------------------------------------------------------------------------------- driver
def dry_run(
    config_file: str,
    checks: Sequence[str] = ("prompts", "meta", "cpu"),
    *,
    workdir: str,
    llm_layers: int = 1,
    vision_layers: int = 1,
    sam_depth: int = 2,
) -> Dict[str, Any]:
    """Run ``checks`` on one config; returns the numbers (raises on the first failing check)."""
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
        samples = task_samples(cfg, torch.randint(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8))
        tokens = check_prompts(cfg, samples)
        t0 = time.perf_counter()
        res["cpu"] = run_on_cpu(cfg, samples, tokens)
        res["cpu"]["total_s"] = time.perf_counter() - t0
        res["cpu"]["cut"] = {"llm_layers": llm_layers, "vision_layers": vision_layers, "sam_depth": sam_depth}
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
