#!/usr/bin/env python
"""Compute overhead of FlowSeg vs the baseline decoder, in the layout of the paper's Table 9.

Builds FlowSeg twice from configs, with random weights (no checkpoint is read):

* ``baseline``: the Mask2Former decoder (SR and CR off) without BAR;
* ``flowseg``: Bidirectional Semantic Flow (SR + CR) and BAR;

at the paper's sizes (``configs/flowseg_refcoco.yaml``: SAM-ViT-L at 1024 with X-SAM's connector,
200 queries, 9 decoder layers; Qwen3-4B; SigLIP2-so400m) or, with ``--tiny``, at the test sizes
(``configs/tiny/flowseg_refer_tiny.yaml``, CPU in seconds). The LLM and vision tower are built
from ``transformers`` configs written to a temporary folder; the tokenizer is a small BPE trained
on the fly (``flowseg.utils.tiny_models.make_tokenizer``), at paper sizes padded with unused
entries to the length of Qwen3's (:data:`QWEN3_TOKENIZER_LEN`, so the embedding matrix has the
paper's rows); the prompt is tokenised into whole words much like Qwen's tokenizer does for
RefCOCO expressions.

Reported for both (median of ``--reps`` after ``--warmup``, ``cuda.synchronize`` around each):

* parameters per Table 9 component (:func:`param_counts`, printed as a table with
  ``--count-only``): X-SAM's segmentor (SAM-ViT trunk + neck + pixel decoder + decoder + logit
  scale, + BSF), the total without LoRA and BAR, the BSF delta and BAR's parameters;
* inference latency per sample and its peak memory (``torch.cuda.max_memory_allocated``,
  weights included), batch 1, one 1024x768 image (a 640x480 COCO image resized to long side 1024)
  and one RefCOCO-like expression, outputs at 640x480 (the selected mask only, as evaluation
  does with ``TEST.RETURN_CANDIDATES`` off; ``tools/candidates_cost.py`` measures the candidates);
* GFLOPs of that forward with fvcore's ``FlopCountAnalysis`` (through Detectron2's tracing
  adapter), whole model and per component. fvcore counts one multiply-add as one flop. It has no
  rule for ``aten::scaled_dot_product_attention`` (LLM, SigLIP, and the decoder's
  ``nn.MultiheadAttention``) nor for ``aten::_convolution_mode``: both are added here (QK^T + AV
  multiply-adds over the full, unmasked score matrix; a convolution as fvcore counts it).
  Still not counted (fvcore's choice): element-wise ops (activations, softmax, residual adds,
  RMSNorm's pow/mean/rsqrt, rotary sin/cos), embeddings lookups, the antialiased/bicubic resizes;
  MSDeformAttn's ``grid_sampler`` is counted at 4 flops per output element;
* one training step (forward, backward, AdamW step; the config's LoRA / gradient checkpointing)
  at ``--train-batch`` samples (8 per GPU in the paper): time and peak memory; an out-of-memory
  is reported, not fatal;
* evaluation with image features shared across expressions (:mod:`flowseg.engine.shared_features`)
  vs per expression: ms per expression with K expressions per image (``--k``), sharing the image
  encoders only, and the encoders plus the LLM's prompt-prefix cache.

    python tools/benchmark.py --device cuda --dtype bfloat16 --reps 10 --output bench.json
    python tools/benchmark.py --tiny --device cpu --reps 2          # seconds, no GPU
    python tools/benchmark.py --count-only                          # paper-size parameter counts (meta device)

``bfloat16``: the LLM and vision tower hold bf16 weights (``MODEL.LLM.TORCH_DTYPE``) and every
forward runs under ``torch.autocast(bfloat16)`` (the segmentor keeps fp32 weights, as AMP
training does). Output: a markdown table, then the JSON (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.join(ROOT, "projects", "FlowSeg") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))

import torch  # noqa: E402

PAPER_CONFIG = os.path.join(ROOT, "configs", "flowseg_refcoco.yaml")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")
VARIANTS = ("baseline", "flowseg")

#: Qwen3-4B (hf.co/Qwen/Qwen3-4B config.json); tied input/output embeddings.
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
#: ``len()`` of Qwen3's tokenizer: 151,643 BPE tokens + 26 special ones. The LLM's embedding
#: matrix is padded to 151,936 rows; X-SAM resizes it to ``len(tokenizer)`` after adding
#: ``<SEG>``, ``<p>``, ``</p>``: 151,672 rows in Table 9's count.
QWEN3_TOKENIZER_LEN = 151_669
#: SigLIP2-so400m vision tower; patch 14 at 384 (27x27 = 729 tokens, fixed resolution, the
#: paper's config) or the NaFlex patch-16 variant (24x24 = 576 tokens at 384).
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)

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


# ----------------------------------------------------------------------------------- configs
def write_model_files(workdir: str, tiny: bool, vision: str) -> Dict[str, str]:
    """LLM / vision configs (json) and a tokenizer under ``workdir``; returns their paths."""
    from flowseg.utils.tiny_models import (
        CHATML_TEMPLATE,
        make_tokenizer,
        tiny_qwen3_config,
        tiny_siglip2_vision_config,
        tiny_siglip_vision_config,
    )
    from transformers import Qwen3Config, Siglip2VisionConfig, SiglipVisionConfig

    tok = make_tokenizer(CHATML_TEMPLATE)  # Qwen's chat format (ChatML)
    if not tiny:
        tok = pad_vocabulary(tok, QWEN3_TOKENIZER_LEN)
    paths = {"tokenizer": os.path.join(workdir, "tokenizer")}
    tok.save_pretrained(paths["tokenizer"])
    if tiny:
        llm = tiny_qwen3_config(len(tok))
        vis = tiny_siglip_vision_config() if vision == "patch14-384" else tiny_siglip2_vision_config()
    else:
        llm = Qwen3Config(**QWEN3_4B)
        if vision == "patch14-384":
            vis = SiglipVisionConfig(**SO400M, image_size=384, patch_size=14)
        else:
            vis = Siglip2VisionConfig(**SO400M, num_patches=(384 // 16) ** 2, patch_size=16)
    for key, config in (("llm_config", llm), ("vision_config", vis)):
        paths[key] = os.path.join(workdir, f"{key}.json")
        with open(paths[key], "w") as f:
            json.dump(config.to_dict(), f)
    return paths


def pad_vocabulary(tokenizer, size: int):
    """``tokenizer`` (a fast BPE) with filler entries appended to its vocabulary up to ``size``:
    ``len()`` of the result is ``size`` and text tokenises as before (no merge reaches a filler)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), size)})
    padded = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
    )
    padded.chat_template = tokenizer.chat_template
    return padded


def build_config(variant: str, args: argparse.Namespace, files: Dict[str, str]):
    """The Detectron2 config of ``variant`` ("baseline" / "flowseg")."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(TINY_CONFIG if args.tiny else PAPER_CONFIG)
    on = variant == "flowseg"
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", args.device,
            "MODEL.WEIGHTS", "",
            "MODEL.SAM_VIT.CHECKPOINT", "",
            "MODEL.LLM.PATH", "",
            "MODEL.LLM.CONFIG", files["llm_config"],
            "MODEL.LLM.TOKENIZER_PATH", files["tokenizer"],
            "MODEL.LLM.TORCH_DTYPE", dtype,
            "MODEL.VANILLA_ENCODER.ENABLED", True,
            "MODEL.VANILLA_ENCODER.PATH", "",
            "MODEL.VANILLA_ENCODER.CONFIG", files["vision_config"],
            "MODEL.FLOWSEG.SEMANTIC_REFINEMENT", on,
            "MODEL.FLOWSEG.CONDITION_REFINEMENT", on,
            "MODEL.FLOWSEG.BAR.ENABLED", on,
            "MODEL.SAM_VIT.USE_ACT_CHECKPOINT", args.sam_act_checkpoint,
            "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()",
        ]
    )  # fmt: skip
    if args.tiny:
        from flowseg.utils.tiny_models import TINY_IMAGE_SIZE

        cfg.MODEL.VANILLA_ENCODER.IMAGE_SIZE = TINY_IMAGE_SIZE
    elif args.vision == "patch14-384":
        # so400m-patch14-384 reads 384 px as 27x27 patches (the stride-14 conv drops 6 px);
        # VanillaEncoder wants a multiple of the patch: 378 = 27 x 14 gives the same 729 tokens.
        cfg.MODEL.VANILLA_ENCODER.IMAGE_SIZE = 378
    return cfg


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside lives on the ``meta`` device (shapes, no memory), like
    ``accelerate.init_empty_weights``: ``torch.device("meta")`` itself cannot build the model
    (Detectron2's ViT reads ``.item()`` of a tensor at construction)."""
    register = torch.nn.Module.register_parameter

    def to_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            kwargs = dict(p.__dict__, requires_grad=p.requires_grad)
            module._parameters[name] = type(p)(p.to("meta"), **kwargs)

    from torch.fx.experimental import _config as fx_config

    # Data-dependent ops at build time (boolean-mask indexing of the embedding rows) need a
    # shape on meta: any shape will do, nothing is read.
    nonzero = fx_config.meta_nonzero_assume_all_nonzero
    torch.nn.Module.register_parameter = to_meta
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        fx_config.meta_nonzero_assume_all_nonzero = nonzero


def build(cfg, device: str) -> torch.nn.Module:
    """``build_model`` with every tensor created on ``device`` directly (a random init of 4B
    parameters takes seconds on the GPU, minutes on the CPU); ``meta``: shapes only."""
    import logging

    from detectron2.modeling import build_model

    torch.manual_seed(0)
    if device == "meta":
        with parameters_on_meta():
            return build_model(cfg)  # cfg.MODEL.DEVICE "meta" moves the buffers too
    try:
        with torch.device(device):
            return build_model(cfg)
    except Exception as e:  # a build step that needs CPU tensors: build there, then move
        logging.getLogger(__name__).warning("building on %s failed (%s); building on the CPU", device, e)
        torch.manual_seed(0)
        return build_model(cfg)


#: name parts of peft's adapter tensors: LoRA and the trainable rows of the new tokens
ADAPTER_NAMES = ("lora_", "trainable_tokens_")


def count(module: Optional[torch.nn.Module], skip: Sequence[str] = ()) -> int:
    """Parameters of ``module`` (tied weights once), leaving out those whose name contains a
    string of ``skip``."""
    if module is None:
        return 0
    return sum(p.numel() for n, p in module.named_parameters() if not any(s in n for s in skip))


def _named(module: Optional[torch.nn.Module], name: str) -> Optional[torch.nn.Module]:
    return None if module is None else getattr(module, name, None)


def param_counts(model: torch.nn.Module) -> Dict[str, int]:
    """Table 9's components. ``segmentor`` is X-SAM's: SAM-ViT trunk + SAM neck (carried, unused on
    the connector path) + pixel decoder + decoder (+ BSF) + logit scale; the connector (or the
    pyramid stages other than SAM's neck), the background embedding, the condition head and BAR
    are outside it. ``total`` leaves out peft's adapters (``lora``: LoRA and the new tokens'
    trainable rows) and BAR (``bar``), both reported alone."""
    from flowseg.checkpoint.sam import sam_neck_prefix

    backbone, head = model.backbone, model.condition_head
    predictor = model.sem_seg_head.predictor
    neck_name = sam_neck_prefix(backbone) or ""
    c = {
        "sam_trunk": count(backbone.net),
        "sam_neck": count(_named(backbone, neck_name)) if neck_name else 0,
        "pixel_decoder": count(model.sem_seg_head.pixel_decoder),
        "bsf": sum(
            count(_named(predictor, m))
            for m in ("semantic_cross_attention_layers", "fusion_gates", "condition_refinement_layers")
        ),
        "background_embed": count(_named(predictor, "background_embed")),
        "bar": count(model.refiner),
        "llm": count(_named(head, "llm"), skip=ADAPTER_NAMES),
        "lora": count(_named(head, "llm")) - count(_named(head, "llm"), skip=ADAPTER_NAMES),
        "vision_tower": count(_named(head, "vision_encoder")),
        "vis_projector": count(_named(head, "vis_projector")),
        "llm_projector": count(_named(head, "llm_projector")),
        "sam_token_projector": count(_named(head, "sam_projector")),
    }
    scale = getattr(predictor, "logit_scale", None)
    c["logit_scale"] = 0 if scale is None else scale.numel()
    c["feature_path"] = count(backbone) - c["sam_trunk"] - c["sam_neck"]  # connector / pyramid
    c["decoder"] = count(predictor) - c["bsf"] - c["logit_scale"] - c["background_embed"]
    c["condition_head"] = count(head)
    named = ("llm", "lora", "vision_tower", "vis_projector", "llm_projector", "sam_token_projector")
    c["condition_head_other"] = c["condition_head"] - sum(c[k] for k in named)
    segmentor = ("sam_trunk", "sam_neck", "pixel_decoder", "decoder", "bsf", "logit_scale")
    c["segmentor"] = sum(c[k] for k in segmentor)
    c["all"] = count(model)
    c["total"] = c["all"] - c["lora"] - c["bar"]
    return c


#: Table 9's rows in the order printed by ``--count-only``.
TABLE9_ROWS = (
    ("sam_trunk", "SAM-ViT trunk"),
    ("sam_neck", "SAM neck (carried, unused on the connector path)"),
    ("pixel_decoder", "pixel decoder"),
    ("decoder", "transformer decoder (without BSF)"),
    ("bsf", "BSF (SR + CR)"),
    ("logit_scale", "logit scale"),
    ("segmentor", "= segmentor"),
    ("feature_path", "connector (feature path)"),
    ("background_embed", "background embedding"),
    ("llm", "LLM (without LoRA)"),
    ("vision_tower", "vision tower"),
    ("vis_projector", "phi_vis"),
    ("llm_projector", "phi_llm"),
    ("sam_token_projector", "SAM-token projector"),
    ("condition_head_other", "other condition-head parameters"),
    ("total", "= total (Table 9)"),
    ("lora", "LoRA + peft's token rows (not in the total)"),
    ("bar", "BAR (not in the total)"),
)


def count_table(result: Dict[str, Any]) -> str:
    """Markdown table of :func:`param_counts` for both variants."""
    b, f = result["baseline"]["params"], result["flowseg"]["params"]
    lines = ["| Parameters | Baseline (no BSF, no BAR) | FlowSeg (BSF + BAR) |", "|---|---:|---:|"]
    lines += [f"| {label} | {b[k]:,} | {f[k]:,} |" for k, label in TABLE9_ROWS]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- inputs
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


def _sdpa_flop_jit(inputs: List[Any], outputs: List[Any]):
    # q [..., L, E], k [..., S, E], v [..., S, Ev]: QK^T and AV multiply-adds (full score matrix).
    from collections import Counter

    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    length, dim, keys, dim_v = q[-2], q[-1], k[-2], v[-1]
    return Counter({"scaled_dot_product_attention": batch * length * keys * (dim + dim_v)})


def _conv_mode_flop_jit(inputs: List[Any], outputs: List[Any]):
    # aten::_convolution_mode (padding="same"/"valid"): never transposed.
    from collections import Counter

    from fvcore.nn.jit_handles import conv_flop_count, get_shape

    return Counter(
        {"conv": conv_flop_count(get_shape(inputs[0]), get_shape(inputs[1]), get_shape(outputs[0]))}
    )


COMPONENTS = {
    "segmentation encoder (SAM-ViT)": "model.backbone",
    "pixel decoder": "model.sem_seg_head.pixel_decoder",
    "transformer decoder (BSF)": "model.sem_seg_head.predictor",
    "BAR": "model.refiner",
    "vanilla encoder (SigLIP2)": "model.condition_head.vision_encoder",
    "projector phi_vis": "model.condition_head.vis_projector",
    "LLM": "model.condition_head.llm",
    "projector phi_llm": "model.condition_head.llm_projector",
}


def flop_count(model: torch.nn.Module, inputs: List[Dict[str, Any]], device, dtype: str) -> Dict[str, Any]:
    """fvcore GFLOPs (1 multiply-add = 1 flop) of ``model(inputs)``, total and per component."""
    from detectron2.utils.analysis import FlopCountAnalysis

    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle(
            "aten::scaled_dot_product_attention",
            _sdpa_flop_jit,
            "aten::_convolution_mode",
            _conv_mode_flop_jit,
        )
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = analysis.total()
        by_module = analysis.by_module()
        by_operator = analysis.by_operator()
        unsupported = dict(analysis.unsupported_ops())
    return {
        "gflops": total / 1e9,
        "by_component": {name: by_module.get(prefix, 0) / 1e9 for name, prefix in COMPONENTS.items()},
        "by_operator": {k: v / 1e9 for k, v in sorted(by_operator.items(), key=lambda kv: -kv[1])},
        "not_counted_ops": unsupported,
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


# ----------------------------------------------------------------------------------- driver
def bench_variant(variant: str, args, files, device: torch.device) -> Dict[str, Any]:
    cfg = build_config(variant, args, files)
    if args.count_only:
        cfg.MODEL.DEVICE = "meta"  # build_model moves the model there
    t0 = time.perf_counter()
    model = build(cfg, "meta" if args.count_only else args.device)
    res: Dict[str, Any] = {"build_s": time.perf_counter() - t0, "params": param_counts(model)}
    if args.count_only:
        return res
    model.eval()
    image_hw = (args.image_height, args.image_width)
    orig_hw = (args.orig_height, args.orig_width)
    x = eval_inputs(1, image_hw, orig_hw)

    def infer() -> None:
        with torch.no_grad(), autocast(device, args.dtype):
            model(x)

    res["inference"] = measure(infer, device, args.reps, args.warmup)
    if not args.skip_flops:
        try:
            res["flops"] = flop_count(model, x, device, args.dtype)
        except Exception as e:  # tracing is best effort: report, do not lose the other numbers
            res["flops"] = {"error": f"{type(e).__name__}: {e}"}
    if args.k > 0:
        res["shared_eval"] = shared_eval(
            model, args.k, image_hw, orig_hw, device, args.dtype, args.reps, args.warmup
        )
    if args.train_batch > 0:
        batch = train_inputs(args.train_batch, image_hw)
        res["train"] = train_step(model, cfg, batch, device, args.dtype, args.train_reps, 1)
    return res  # the model goes with this frame; main() frees the cache


def _m(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 1e6:.2f}M"


def _g(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}G"


def _delta(a: Optional[float], b: Optional[float], fmt: Callable[[float], str], pct: bool = True) -> str:
    if a is None or b is None:
        return "-"
    d = b - a
    s = ("+" if d >= 0 else "-") + fmt(abs(d))
    return s + (f" ({100 * d / a:+.2f}%)" if pct and a else "")


def markdown(result: Dict[str, Any]) -> str:
    b, f = result["baseline"], result["flowseg"]
    d = result["deltas"]
    rows = [("", "Baseline (SR/CR off, no BAR)", "FlowSeg (SR+CR+BAR)", "Δ")]

    def row(name: str, key: Callable[[Dict], Optional[float]], fmt: Callable[[float], str], pct: bool = True):
        vb, vf = key(b), key(f)
        rows.append(
            (name, "-" if vb is None else fmt(vb), "-" if vf is None else fmt(vf), _delta(vb, vf, fmt, pct))
        )

    def get(*path):
        def read(d: Dict) -> Optional[float]:
            for p in path:
                if not isinstance(d, dict) or p not in d:
                    return None
                d = d[p]
            return d

        return read

    row("Segmentor params", get("params", "segmentor"), _m)
    row("Total params", get("params", "total"), _m)
    rows.append(("BSF parameter delta (decoder)", "", "", f"+{_m(d['bsf_params'])} ({d['bsf_params']:,})"))
    row("BAR params", get("params", "bar"), lambda v: f"{v / 1e3:.1f}K", pct=False)
    row("Inference memory (peak)", get("inference", "peak_memory_bytes"), _g)
    row("Latency (ms/sample)", get("inference", "ms"), lambda v: f"{v:.2f}")
    row("GFLOPs (fvcore, MACs)", get("flops", "gflops"), lambda v: f"{v:.3f}")
    tb = b.get("train", {}).get("batch")
    row(f"Train step ms ({tb}/device)", get("train", "ms"), lambda v: f"{v:.1f}")
    row(f"Train peak memory ({tb}/device)", get("train", "peak_memory_bytes"), _g)
    for name, label in (
        ("per_expression", "per expression"),
        ("shared_encoders", "shared image encoders"),
        ("shared_encoders_and_llm_prefix", "shared encoders + LLM prefix"),
    ):
        k = b.get("shared_eval", {}).get("k")
        row(
            f"Eval ms/expression, K={k}, {label}",
            get("shared_eval", name, "ms_per_expression"),
            lambda v: f"{v:.2f}",
        )
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(rows[0]))
    out = "\n".join(lines)
    comps = f.get("flops", {}).get("by_component")
    if comps:
        cb = b["flops"]["by_component"]
        out += "\n\n| GFLOPs by component | Baseline | FlowSeg |\n|---|---|---|\n"
        out += "\n".join(f"| {k} | {cb.get(k, 0):.2f} | {v:.2f} |" for k, v in comps.items())
    for v in VARIANTS:
        for key in ("train",):
            if result[v].get(key, {}).get("oom"):
                out += f"\n\n{v}: training step out of memory: {result[v][key]['error']}"
        if "error" in result[v].get("flops", {}):
            out += f"\n\n{v}: FLOP count failed: {result[v]['flops']['error']}"
    return out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 on CUDA, fp32 on CPU"
    )
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="test-size models (CPU, seconds)")
    p.add_argument("--count-only", action="store_true", help="parameter counts only (models built on 'meta')")
    p.add_argument("--vision", default="patch14-384", choices=["patch14-384", "patch16-naflex"])
    p.add_argument(
        "--k", type=int, default=10, help="expressions per image for the shared-feature eval (0: skip)"
    )
    p.add_argument(
        "--train-batch", type=int, default=8, help="samples per device of the training step (0: skip)"
    )
    p.add_argument("--train-reps", type=int, default=3)
    p.add_argument("--sam-act-checkpoint", action="store_true", help="MODEL.SAM_VIT.USE_ACT_CHECKPOINT")
    p.add_argument("--skip-flops", action="store_true")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="model input")
    p.add_argument(
        "--orig-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"), help="output size"
    )
    p.add_argument("--output", default="", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.image_size is None:  # long side = INPUT.IMAGE_SIZE (1024; tiny config: 128)
        args.image_size = (96, 128) if args.tiny else (768, 1024)
    args.image_height, args.image_width = args.image_size
    args.orig_height, args.orig_width = args.orig_size
    return args


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    import flowseg  # noqa: F401  (registers FlowSeg's components)

    device = torch.device(args.device)
    result: Dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("image_size", "orig_size")},
        "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    with tempfile.TemporaryDirectory(prefix="flowseg_bench_") as workdir:
        files = write_model_files(workdir, args.tiny, args.vision)
        for variant in VARIANTS:
            result[variant] = bench_variant(variant, args, files, device)
            _free(device)
    pb, pf = result["baseline"]["params"], result["flowseg"]["params"]
    result["deltas"] = {
        "bsf_params": pf["bsf"] - pb["bsf"],
        "bar_params": pf["bar"] - pb["bar"],
        "segmentor_params": pf["segmentor"] - pb["segmentor"],
        "total_params": pf["total"] - pb["total"],
    }
    if args.count_only:
        print(count_table(result))
        print("\nJSON:")
        print(json.dumps({k: result[k] for k in ("baseline", "flowseg", "deltas")}, indent=2))
    else:
        print(markdown(result))
        print("\nJSON:")
        print(json.dumps(result, indent=2))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
