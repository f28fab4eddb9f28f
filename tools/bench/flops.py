"""FLOP counts of a forward.

* :func:`flop_count`: fvcore's (1 multiply-add = 1 flop) while the model runs, with the rules fvcore
  lacks (SDPA, ``_convolution_mode``);
* :func:`meta_flop_count`: ``torch.utils.flop_counter.FlopCounterMode`` (2 flops per multiply-add)
  without running the big parts: the model is built on the ``meta`` device (shapes only), so the
  paper-size count fits a small CPU. The segmentation head (pixel decoder, decoder, BAR) reads
  tensor values on the host (spatial shapes, the selected query), so it alone is given random
  float32 weights on the CPU and runs for real (tens of GFLOPs, seconds); the encoders' and the
  condition head's outputs cross over as random CPU tensors of their shapes.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from .measure import autocast


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


#: FlopCounterMode's module names of the components (its root is the model's class name)
META_COMPONENTS = {
    "segmentation encoder (SAM-ViT + connector)": "backbone",
    "vanilla encoder (SigLIP2)": "condition_head.vision_encoder",
    "projector phi_vis": "condition_head.vis_projector",
    "SAM-token projector": "condition_head.sam_projector",
    "LLM": "condition_head.llm",
    "projector phi_llm": "condition_head.llm_projector",
    "pixel decoder": "sem_seg_head.pixel_decoder",
    "transformer decoder (BSF)": "sem_seg_head.predictor",
    "BAR": "refiner",
}
OUTSIDE = "outside the components (BAR's F.conv2d)"
#: the decoder's per-layer modules of a Mask2Former layer and of BSF's additions
_M2F_LAYER = (
    "transformer_self_attention_layers",
    "transformer_cross_attention_layers",
    "transformer_ffn_layers",
)
_BSF_LAYER = ("semantic_cross_attention_layers", "fusion_gates", "condition_refinement_layers")


class _MetaScalars(TorchDispatchMode):
    """``.item()`` / ``bool()`` of a meta tensor answers 1 / True: the checks on values (every
    sample has a condition, no padding in the attention mask) take their usual branch."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
            return True if args[0].dtype == torch.bool else 1
        return func(*args, **(kwargs or {}))


def _to_cpu(x: Any, gen: torch.Generator) -> Any:
    """Meta tensors (also inside dicts, lists, tuples) → CPU tensors of their shape and dtype:
    masks all True, floats random, integers 0."""
    if isinstance(x, torch.Tensor) and x.device.type == "meta":
        if x.dtype == torch.bool:
            return torch.ones(x.shape, dtype=torch.bool)
        if x.is_floating_point():
            return torch.randn(x.shape, generator=gen).to(x.dtype)
        return torch.zeros(x.shape, dtype=x.dtype)
    if isinstance(x, dict):
        return {k: _to_cpu(v, gen) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v, gen) for v in x)
    return x


def _materialize(module: torch.nn.Module, gen: torch.Generator) -> None:
    module.to_empty(device="cpu")
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.02, generator=gen)
        for b in module.buffers():
            b.zero_()


def _by_name(counts: Dict[str, Dict[Any, int]], root: str, name: str) -> int:
    """FLOPs under module ``name``: the outermost recorded modules at or below it (a module whose
    own ``forward`` is bypassed, like the LLM's wrapper, is recorded only through its children)."""
    prefix = f"{root}.{name}"
    keys = [k for k in counts if k == prefix or k.startswith(prefix + ".")]
    outer = [k for k in keys if not any(k.startswith(o + ".") for o in keys if o != k)]
    return sum(sum(counts[k].values()) for k in outer)


def _first_decoder_layer(llm: torch.nn.Module) -> torch.nn.Module:
    for m in llm.modules():
        if type(m).__name__.endswith("DecoderLayer"):
            return m
    raise ValueError(f"no *DecoderLayer module in {type(llm).__name__}")


def _record_length(seq: List[int]):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seq.append(int(hidden.shape[1]))

    return hook


def meta_flop_count(model: torch.nn.Module, inputs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """FLOPs (2 per multiply-add) of ``model(inputs)`` for a FlowSeg model built on ``meta``: total,
    per component, the decoder per layer (Mask2Former's three blocks and BSF's additions), and the
    LLM's sequence length. See the module docstring; ``model`` is changed (head moved to the CPU)."""
    gen = torch.Generator().manual_seed(0)
    for head in (model.sem_seg_head, getattr(model, "refiner", None)):
        if head is not None:
            _materialize(head, gen)
    seq: List[int] = []
    hooks = [
        model.backbone.register_forward_hook(
            lambda m, a, out: {k: v if k == "sam_tokens" else _to_cpu(v, gen) for k, v in out.items()}
        ),
        model.condition_head.register_forward_hook(lambda m, a, out: _to_cpu(out, gen)),
        _first_decoder_layer(model.condition_head.llm).register_forward_pre_hook(
            _record_length(seq), with_kwargs=True
        ),
    ]
    counter = FlopCounterMode(display=False, depth=None)
    model.eval()
    try:
        # math SDPA on the CPU head: FlopCounterMode has no rule for the CPU's fused kernel and would
        # count its attention as 0 (on meta, SDPA decomposes into matrix products either way)
        with torch.no_grad(), counter, _MetaScalars(), sdpa_kernel(SDPBackend.MATH):
            model(inputs)
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    pred = model.sem_seg_head.predictor
    layers = [
        {
            "mask2former": sum(_by_name(counts, root, f"sem_seg_head.predictor.{m}.{i}") for m in _M2F_LAYER),
            "bsf": sum(_by_name(counts, root, f"sem_seg_head.predictor.{m}.{i}") for m in _BSF_LAYER),
        }
        for i in range(pred.num_layers)
    ]
    by_component = {k: _by_name(counts, root, v) / 1e9 for k, v in META_COMPONENTS.items()}
    total = counter.get_total_flops() / 1e9
    # ops of no component's modules: BAR's functional convolutions (refine_selected runs its
    # first convolution's weights through F.conv2d in the meta-architecture's call)
    by_component[OUTSIDE] = total - sum(by_component.values())
    return {
        "gflops": total,
        "by_component": by_component,
        "decoder_layers_gflops": [{k: v / 1e9 for k, v in layer.items()} for layer in layers],
        "llm_sequence_length": seq[0] if seq else None,
        "convention": "FlopCounterMode: 2 flops per multiply-add; meta device, head on the CPU",
    }


def decoder_flops_by_conditions(
    model: torch.nn.Module, counts: List[int], image_size: int
) -> Dict[int, float]:
    """GFLOPs of BSF's additions (SR, fusion gates, CR over all layers) in ``model``'s decoder with
    ``K`` condition embeddings, for each ``K`` of ``counts`` (decoder alone on the CPU, random
    multi-scale features of a square ``image_size`` input). How BSF's cost grows with ``K``: one
    ``<p>`` span per referring expression, up to the LLM's whole sequence."""
    gen = torch.Generator().manual_seed(0)
    pred = model.sem_seg_head.predictor
    _materialize(pred, gen)
    pred.eval()
    dim = pred.query_feat.weight.shape[1]
    feats = [torch.randn(1, dim, image_size // s, image_size // s, generator=gen) for s in (32, 16, 8)]
    out: Dict[int, float] = {}
    for k in counts:
        counter = FlopCounterMode(display=False, depth=None)
        with torch.no_grad(), counter, sdpa_kernel(SDPBackend.MATH):
            pred(feats, feats[-1], conditions=torch.randn(1, k, dim, generator=gen))
        flops = counter.get_flop_counts()
        root = type(pred).__name__
        names = [f"{m}.{i}" for m in _BSF_LAYER for i in range(pred.num_layers)]
        out[k] = sum(_by_name(flops, root, n) for n in names) / 1e9
    return out
