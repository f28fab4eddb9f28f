"""Optimizer for FlowSeg: Mask2Former's AdamW recipe plus an LLM learning-rate multiplier.

Parameter groups (paper §4.1 / A.3, Mask2Former's ``build_optimizer``):

* ``backbone.*``: ``lr * SOLVER.BACKBONE_MULTIPLIER`` (the SAM encoder), except X-SAM's connector
  ``backbone.connector.*``, a new module outside X-SAM's encoder, which trains at the base rate
  as in X-SAM (its ``lr_mult`` 0.1 covers ``segmentor.encoder`` only);
* ``condition_head.llm.*``: ``lr * SOLVER.LLM_MULTIPLIER`` (LoRA and new token rows of the LLM);
* ``condition_head.vision_encoder.*``: ``lr * SOLVER.VANILLA_ENCODER_MULTIPLIER`` (SigLIP2, when
  fine-tuned: X-SAM's ``vision_encoder`` ``lr_mult`` 0.1);
* normalisation layers (any module whose class name contains "Norm", incl. RMSNorm):
  ``SOLVER.WEIGHT_DECAY_NORM``;
* embeddings (``nn.Embedding``, ``query_embed``, ``query_feat``, ``level_embed``, ``pos_embed``,
  relative-position tables ``rel_pos_*``/``relative_position*``): ``SOLVER.WEIGHT_DECAY_EMBED``;
* ``logit_scale`` (the learnable temperature): no weight decay (decaying it shrinks the logits);
* everything else: ``SOLVER.BASE_LR`` / ``SOLVER.WEIGHT_DECAY``.

Clipping: ``CLIP_TYPE: "full_model"`` clips the norm of all gradients together (Mask2Former);
other types go through Detectron2's ``maybe_add_gradient_clipping``.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional, Type

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping, reduce_param_groups

__all__ = ["build_optimizer", "get_flowseg_param_groups", "maybe_add_full_model_gradient_clipping"]

_EMBED_NAMES = ("query_embed", "query_feat", "level_embed", "pos_embed", "rel_pos", "relative_position")
_NO_DECAY_NAMES = ("logit_scale",)
_TORCH_NORMS = (
    torch.nn.BatchNorm1d,
    torch.nn.BatchNorm2d,
    torch.nn.BatchNorm3d,
    torch.nn.SyncBatchNorm,
    torch.nn.GroupNorm,
    torch.nn.InstanceNorm1d,
    torch.nn.InstanceNorm2d,
    torch.nn.InstanceNorm3d,
    torch.nn.LayerNorm,
    torch.nn.LocalResponseNorm,
)


def _is_norm(module: torch.nn.Module) -> bool:
    # Detectron2's LayerNorm (channels-first) and the LLM's RMSNorm are not torch.nn norm classes.
    return isinstance(module, _TORCH_NORMS) or "norm" in type(module).__name__.lower()


def get_flowseg_param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """Trainable parameters grouped by (lr, weight decay); see the module docstring."""
    base_lr = cfg.SOLVER.BASE_LR
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for pname, value in module.named_parameters(recurse=False):
            if not value.requires_grad or id(value) in seen:
                continue
            seen.add(id(value))  # shared parameters (tied weights) go into one group only
            full = f"{module_name}.{pname}" if module_name else pname
            lr, wd = base_lr, cfg.SOLVER.WEIGHT_DECAY
            if full.startswith("backbone.") and not full.startswith("backbone.connector."):
                lr *= cfg.SOLVER.BACKBONE_MULTIPLIER
            if full.startswith("condition_head.llm.") or ".condition_head.llm." in full:
                lr *= cfg.SOLVER.LLM_MULTIPLIER
            if full.startswith("condition_head.vision_encoder.") or ".condition_head.vision_encoder." in full:
                lr *= cfg.SOLVER.VANILLA_ENCODER_MULTIPLIER
            if _is_norm(module):
                wd = cfg.SOLVER.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or any(k in full for k in _EMBED_NAMES):
                wd = cfg.SOLVER.WEIGHT_DECAY_EMBED
            elif any(k in pname for k in _NO_DECAY_NAMES):
                wd = 0.0
            groups.append({"params": [value], "lr": lr, "weight_decay": wd})
    # One group per distinct (lr, wd): fewer groups keep the fused/foreach AdamW fast.
    return reduce_param_groups(groups)


def maybe_add_full_model_gradient_clipping(
    cfg: CfgNode, optim: Type[torch.optim.Optimizer]
) -> Type[torch.optim.Optimizer]:
    """Subclass ``optim`` so that ``step`` first clips the global gradient norm (``full_model``)."""
    clip = cfg.SOLVER.CLIP_GRADIENTS
    max_norm = clip.CLIP_VALUE
    if not (clip.ENABLED and clip.CLIP_TYPE == "full_model" and max_norm > 0.0):
        return optim
    norm_type = clip.NORM_TYPE

    class FullModelGradientClippingOptimizer(optim):  # type: ignore[misc, valid-type]
        def step(self, closure: Optional[Any] = None) -> Any:
            params = itertools.chain(*[g["params"] for g in self.param_groups])
            torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type)
            return super().step(closure=closure)

    return FullModelGradientClippingOptimizer


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """AdamW (or SGD) over :func:`get_flowseg_param_groups` with the configured gradient clipping."""
    params = get_flowseg_param_groups(cfg, model)
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        cls, kwargs = torch.optim.AdamW, {}
    elif name == "SGD":
        cls, kwargs = torch.optim.SGD, {"momentum": cfg.SOLVER.MOMENTUM, "nesterov": cfg.SOLVER.NESTEROV}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER must be 'ADAMW' or 'SGD', got {cfg.SOLVER.OPTIMIZER!r}")
    if cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE == "full_model":
        cls = maybe_add_full_model_gradient_clipping(cfg, cls)
    else:  # "value" / "norm": Detectron2's per-parameter clipping
        cls = maybe_add_gradient_clipping(cfg, cls)
    return cls(params, lr=cfg.SOLVER.BASE_LR, **kwargs)
