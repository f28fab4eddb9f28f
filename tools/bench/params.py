"""Parameter counts of a built model per Table 9 component."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

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
