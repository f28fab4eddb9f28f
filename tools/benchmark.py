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
    python tools/benchmark.py --flops-on-meta                       # paper-size GFLOPs on a CPU (~1 min)

``--flops-on-meta``: Table 9's GFLOPs row counted with ``FlopCounterMode`` (2 flops per
multiply-add, the convention the paper's ~18.5 TFLOPs implies) on models built on the ``meta``
device, the segmentation head run on the CPU (:func:`bench.flops.meta_flop_count`); input: one
1024x768 image (SAM: padded to 1024², 1,024 SAM tokens; SigLIP2: 729 tokens) and one RefCOCO-like
expression in X-SAM's prompt, batch 1, inference.

``bfloat16``: the LLM and vision tower hold bf16 weights (``MODEL.LLM.TORCH_DTYPE``) and every
forward runs under ``torch.autocast(bfloat16)`` (the segmentor keeps fp32 weights, as AMP
training does). Output: a markdown table, then the JSON (also written to ``--output``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (os.path.join(ROOT, "projects", "FlowSeg"), os.path.join(ROOT, "tools")):
    if _path not in sys.path:  # the helpers in tools/bench, and flowseg without an install
        sys.path.insert(0, _path)

import torch  # noqa: E402
from bench.flops import decoder_flops_by_conditions, flop_count, meta_flop_count  # noqa: E402
from bench.measure import (  # noqa: E402
    _free,
    autocast,
    eval_inputs,
    measure,
    shared_eval,
    train_inputs,
    train_step,
)
from bench.models import (  # noqa: E402
    QWEN3_4B,  # noqa: F401  (this tool's names, imported from here by others)
    QWEN3_TOKENIZER_LEN,  # noqa: F401
    SO400M,  # noqa: F401
    VARIANTS,
    build,
    build_config,
    pad_vocabulary,  # noqa: F401
    write_model_files,
)
from bench.params import param_counts  # noqa: E402
from bench.report import count_table, flops_table, markdown  # noqa: E402


def bench_variant(variant: str, args, files, device: torch.device) -> Dict[str, Any]:
    cfg = build_config(variant, args, files)
    on_meta = args.count_only or args.flops_on_meta
    if on_meta:
        cfg.MODEL.DEVICE = "meta"  # build_model moves the model there
    t0 = time.perf_counter()
    model = build(cfg, "meta" if on_meta else args.device)
    res: Dict[str, Any] = {"build_s": time.perf_counter() - t0, "params": param_counts(model)}
    image_hw = (args.image_height, args.image_width)
    orig_hw = (args.orig_height, args.orig_width)
    x = eval_inputs(1, image_hw, orig_hw)
    if args.flops_on_meta:
        res["flops"] = meta_flop_count(model, x)
        if variant == "flowseg" and args.bsf_conditions:
            sizes = sorted(set(args.bsf_conditions + [res["flops"]["llm_sequence_length"]]))
            res["flops"]["bsf_gflops_by_conditions"] = decoder_flops_by_conditions(
                model, sizes, cfg.INPUT.IMAGE_SIZE
            )
    if on_meta:
        return res
    model.eval()

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
    p.add_argument(
        "--flops-on-meta", action="store_true", help="GFLOPs only, models on 'meta' (paper size on a CPU)"
    )
    p.add_argument(
        "--bsf-conditions",
        type=int,
        nargs="*",
        default=[1, 8, 100],
        help="with --flops-on-meta: BSF's GFLOPs for these condition counts K (and K = the LLM's sequence)",
    )
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
    if args.flops_on_meta:
        result["deltas"]["gflops"] = (
            result["flowseg"]["flops"]["gflops"] - result["baseline"]["flops"]["gflops"]
        )
        print(flops_table(result))
        print("\nJSON:")
        print(json.dumps({k: result[k] for k in ("baseline", "flowseg", "deltas")}, indent=2))
    elif args.count_only:
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
