"""DistributedDataParallel arguments for a FlowSeg config.

* :func:`ddp_kwargs` — ``DistributedDataParallel`` arguments for a FlowSeg config:
  ``broadcast_buffers=False`` (Detectron2's default: FlowSeg has no BatchNorm statistics to
  sync), ``find_unused_parameters`` only when some trainable parameter can miss the graph of a
  step, ``device_ids=None`` on CPU (gloo; DDP rejects device ids for CPU modules).
* :func:`unused_parameters` — the trainable parameters that get no gradient from one batch
  (what ``find_unused_parameters`` is about; for debugging a config).

Frozen parts need no ``torch.no_grad()`` wrapper: autograd records an op only if one of its
inputs requires grad, so a frozen SAM-ViT or vision tower reading the image keeps no activations.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from torch import nn

__all__ = ["NEVER_USED_SUBMODULES", "ddp_kwargs", "needs_find_unused_parameters", "unused_parameters"]

logger = logging.getLogger(__name__)


def _evaluator_type(name: str) -> Optional[str]:
    return MetadataCatalog.get(name).get("evaluator_type", None)


#: Submodules that exist in the model but whose output FlowSeg never uses: trainable, they get
#: no gradient in any step. SigLIP's attention-pooling head (``pooler_output``; FlowSeg reads
#: ``last_hidden_state``) is trainable when ``MODEL.VANILLA_ENCODER.FREEZE`` is off.
NEVER_USED_SUBMODULES = ("condition_head.vision_encoder.tower.head", "backbone.sam_neck")


def needs_find_unused_parameters(cfg: CfgNode, model: Optional[nn.Module] = None) -> List[str]:
    """Reasons why a trainable parameter may be left out of some step's graph (empty: none).

    * a conversation data set in ``DATASETS.TRAIN`` (stage 2, or mixed stage 3): a conversation-
      only batch has no segmentation target, so the segmentor (SAM-ViT, pixel decoder, decoder,
      BAR) and the LLM projector ``φ_llm`` get no gradient in that step (the mixed loader makes
      all ranks draw the same task per step, but the task changes between steps);
    * (``model`` given) a trainable submodule of :data:`NEVER_USED_SUBMODULES`.

    Checked and *not* a reason (every trainable parameter gets a gradient, see
    ``tests/test_distributed.py``): ``MODEL.FLOWSEG.VISUAL_CROSS_ATTN_CONTROL`` (SR reads pixel
    features, CR is off and not built, C still feeds the matching logits),
    ``ADD_SEG_EMBED_TO_QUERIES=False``, LoRA on a frozen LLM, and BAR on batches without matched
    targets (the criterion calls the refiner with empty indices to keep it in the graph).
    """
    reasons = []
    conv = [n for n in cfg.DATASETS.TRAIN if _evaluator_type(n) == "conversation"]
    if conv:
        reasons.append(
            f"conversation data in DATASETS.TRAIN ({', '.join(conv)}): no segmentation loss in those steps"
        )
    if model is not None:
        root = getattr(model, "module", model)
        modules = dict(root.named_modules())
        for name in NEVER_USED_SUBMODULES:
            sub = modules.get(name)
            if sub is not None and any(p.requires_grad for p in sub.parameters()):
                reasons.append(f"{name} is trainable but its output is never used (freeze it)")
    return reasons


def ddp_kwargs(
    cfg: CfgNode, model: nn.Module, *, find_unused_parameters: Optional[bool] = None
) -> Dict[str, Any]:
    """Keyword arguments of Detectron2's ``create_ddp_model`` / ``DistributedDataParallel``.

    ``find_unused_parameters`` is decided by :func:`needs_find_unused_parameters` unless given
    (it costs a graph traversal per step, so it stays off where every parameter is always used).
    """
    reasons = needs_find_unused_parameters(cfg, model)
    if find_unused_parameters is None:
        find_unused_parameters = bool(reasons)
    if reasons and find_unused_parameters:
        logger.info("DDP find_unused_parameters=True: %s", "; ".join(reasons))
    kwargs: Dict[str, Any] = {
        "broadcast_buffers": False,
        "find_unused_parameters": bool(find_unused_parameters),
    }
    root = getattr(model, "module", model)
    param = next(root.parameters(), None)
    if param is not None and param.device.type == "cpu":
        kwargs["device_ids"] = None  # gloo on CPU: DDP refuses device ids for CPU modules
    return kwargs


def unused_parameters(model: nn.Module, batched_inputs: Sequence[Dict[str, Any]]) -> List[str]:
    """Names of the trainable parameters that receive no gradient from one training step on
    ``batched_inputs`` (the model is put in training mode; gradients are cleared before and after)."""
    root = getattr(model, "module", model)
    root.train()
    root.zero_grad(set_to_none=True)
    losses = root(list(batched_inputs))
    sum(losses.values()).backward()
    names = [n for n, p in root.named_parameters() if p.requires_grad and p.grad is None]
    root.zero_grad(set_to_none=True)
    return names
