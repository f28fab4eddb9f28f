"""fvcore FLOP count of a forward, with the rules fvcore lacks (SDPA, ``_convolution_mode``)."""

from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

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
