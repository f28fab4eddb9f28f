"""Training-efficiency helpers: frozen parts without autograd, DDP arguments.

* :func:`no_grad_when_frozen` / :func:`apply_no_grad_to_frozen` — run a submodule whose parameters
  are all frozen under ``torch.no_grad()`` (forward pre/post hooks: parameter names, checkpoints
  and ``state_dict`` are unchanged).

  What this saves, precisely: autograd records an op only if one of its inputs requires grad. A
  frozen module fed with tensors that do not require grad (SAM-ViT or the vision tower reading the
  image) is therefore already recorded by nothing and keeps no activations, hook or not; the hook
  then only guarantees that property (e.g. against a trainable token row or a hook that makes the
  input require grad) and skips autograd's per-op checks. Activations of a frozen module *are*
  kept when its input requires grad (a frozen LLM behind the trainable ``φ_vis``) — and there they
  are needed for the gradient upstream, so by default the hook leaves such calls alone
  (``cut_input_grad=False``). ``cut_input_grad=True`` runs them without grad too, which stops the
  gradient at the module: only for a frozen branch whose upstream must not learn from it.

* :func:`ddp_kwargs` — ``DistributedDataParallel`` arguments for a FlowSeg config:
  ``broadcast_buffers=False`` (Detectron2's default: FlowSeg has no BatchNorm statistics to
  sync), ``find_unused_parameters`` only when some trainable parameter can miss the graph of a
  step, ``device_ids=None`` on CPU (gloo; DDP rejects device ids for CPU modules).
* :func:`unused_parameters` — the trainable parameters that get no gradient from one batch
  (what ``find_unused_parameters`` is about; for tests and debugging a config).
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from torch import nn

__all__ = [
    "DEFAULT_FROZEN_CANDIDATES",
    "FrozenNoGradHandle",
    "apply_no_grad_to_frozen",
    "ddp_kwargs",
    "is_frozen",
    "NEVER_USED_SUBMODULES",
    "needs_find_unused_parameters",
    "no_grad_when_frozen",
    "unused_parameters",
]

logger = logging.getLogger(__name__)

#: FlowSeg submodules that are frozen in some configurations (SAM_VIT.FREEZE, VANILLA_ENCODER.FREEZE,
#: LLM.FREEZE without LoRA); the hook checks frozenness at every call, so listing them is harmless.
DEFAULT_FROZEN_CANDIDATES = (
    "backbone",
    "backbone.net",
    "condition_head.vision_encoder",
    "condition_head.llm",
)


def is_frozen(module: nn.Module) -> bool:
    """True when ``module`` has parameters and none of them requires grad."""
    found = False
    for p in module.parameters():
        if p.requires_grad:
            return False
        found = True
    return found


def _any_requires_grad(obj: Any) -> bool:
    if isinstance(obj, torch.Tensor):
        return obj.requires_grad
    if isinstance(obj, (list, tuple)):
        return any(_any_requires_grad(x) for x in obj)
    if isinstance(obj, Mapping):
        return any(_any_requires_grad(x) for x in obj.values())
    return False


class FrozenNoGradHandle:
    """Hooks that run one module under ``no_grad`` while it is frozen; ``remove()`` undoes them."""

    def __init__(self, module: nn.Module, cut_input_grad: bool = False) -> None:
        self.module = module
        self.cut_input_grad = cut_input_grad
        self.calls_without_grad = 0
        # One entry per active call (re-entrant / recursive calls nest): the grad mode to restore.
        self._saved: List[Optional[bool]] = []
        self._frozen_cache: Optional[bool] = None
        self._handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            # always_call: restore the grad mode even when forward raises.
            module.register_forward_hook(self._post, always_call=True),
        ]

    def _pre(self, module: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> None:
        enabled = torch.is_grad_enabled()
        # Frozenness is re-checked per call: training stages unfreeze parts of the model.
        disable = (
            enabled
            and is_frozen(module)
            and (self.cut_input_grad or not (_any_requires_grad(args) or _any_requires_grad(kwargs)))
        )
        self._saved.append(enabled if disable else None)
        if disable:
            torch.set_grad_enabled(False)
            self.calls_without_grad += 1

    def _post(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not self._saved:
            return  # the pre-hook did not run (hooks added during a forward)
        prev = self._saved.pop()
        if prev is not None:
            torch.set_grad_enabled(prev)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def no_grad_when_frozen(module: nn.Module, *, cut_input_grad: bool = False) -> FrozenNoGradHandle:
    """Run ``module`` under ``torch.no_grad()`` whenever all its parameters are frozen and (unless
    ``cut_input_grad``) none of its tensor inputs requires grad. See the module docstring."""
    return FrozenNoGradHandle(module, cut_input_grad=cut_input_grad)


def apply_no_grad_to_frozen(
    model: nn.Module,
    names: Iterable[str] = DEFAULT_FROZEN_CANDIDATES,
    *,
    cut_input_grad: bool = False,
) -> Dict[str, FrozenNoGradHandle]:
    """Hook every submodule of ``model`` named in ``names`` that exists (a DDP wrapper is unwrapped).

    Meant for ``FlowSeg.__init__`` (or ``build_model``): the hooks check frozenness at call time,
    so they can be added before the freezing decisions of a stage are applied.
    """
    root = getattr(model, "module", model)
    modules = dict(root.named_modules())
    return {
        name: no_grad_when_frozen(modules[name], cut_input_grad=cut_input_grad)
        for name in names
        if modules.get(name) is not None
    }


# ----------------------------------------------------------------------------------- DDP
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
