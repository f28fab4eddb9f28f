"""Full (unsharded) state dicts of an FSDP2-sharded model and its optimizer, in DDP's format.

A sharded model's ``state_dict()`` holds DTensor shards and its optimizer state is split the same
way. Checkpoints keep the format of a DDP run instead (plain tensors under the model's names; the
optimizer's state keyed by parameter index as ``torch.optim.Optimizer.state_dict`` writes it), so
that a file written sharded loads unsharded, in ``--eval-only`` and in
``tools/export_full_checkpoint.py``, and back. Gathering and scattering are collectives: every
rank must call them.

* :class:`FullStateView` — what :class:`~flowseg.checkpoint.FlowSegCheckpointer` holds for a
  sharded model: ``state_dict`` gathers the full one (on the CPU), ``load_state_dict`` scatters
  a full one; everything else is the model's.
* :func:`full_optimizer_state_dict` / :func:`load_full_optimizer_state_dict`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys

__all__ = [
    "FullStateView",
    "full_optimizer_state_dict",
    "is_sharded",
    "load_full_optimizer_state_dict",
]


def is_sharded(model: Any) -> bool:
    """True for a module sharded by FSDP2's ``fully_shard`` (or a :class:`FullStateView` of one)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, (FSDPModule, FullStateView))


def _options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kwargs)


class FullStateView:
    """A sharded ``model`` whose ``state_dict`` / ``load_state_dict`` use full tensors (collectives)."""

    def __init__(self, model: nn.Module) -> None:
        self.__dict__["module"] = model  # also what the checkpointer's unwrapping looks for

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["module"], name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, torch.Tensor]:
        """Full tensors on the CPU, on every rank (loading a trainable-only checkpoint compares
        frozen tensors on all of them), gathered one tensor at a time to bound device memory."""
        from torch.distributed.tensor import DTensor

        return {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu()
            for k, v in self.module.state_dict().items()
        }

    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True
    ) -> _IncompatibleKeys:
        own = set(self.state_dict_keys())
        unexpected = [k for k in state_dict if k not in own]
        missing = [k for k in own if k not in state_dict]
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error loading a full state dict: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        self.module.load_state_dict(self._scatter(state_dict), strict=False)
        return _IncompatibleKeys(missing, unexpected)

    def _scatter(self, state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Each full tensor of ``state_dict`` as the model holds it: a DTensor shard where the
        model's is one. Done per key rather than by ``set_model_state_dict``, whose walk visits a
        shared submodule once: a second name of it (peft's ``lm_head.trainable_tokens_delta``,
        tied to the embedding's) stayed a plain tensor and failed to load into its DTensor."""
        from torch.distributed.tensor import DTensor, distribute_tensor

        own = self.module.state_dict(keep_vars=True)
        out = {}
        for k, v in state_dict.items():
            target = own.get(k)
            if target is None:
                continue
            if isinstance(target, DTensor):
                v = distribute_tensor(v.detach().to(target.device), target.device_mesh, target.placements)
            out[k] = v
        return out

    def state_dict_keys(self) -> List[str]:
        """Names of the model's state dict (no gathering)."""
        return list(self.module.state_dict().keys())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    """Names of the optimizer's parameters in the order of its groups (torch's index order)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimizer state of a sharded ``model`` gathered (on the CPU), in the format of
    ``optimizer.state_dict()`` of the same optimizer on the unsharded model."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    full = get_optimizer_state_dict(model, optimizer, options=_options())
    if not full:
        return {}  # with cpu_offload only rank 0 receives the gathered state: the one that writes
    index = {name: i for i, name in enumerate(_param_names(model, optimizer))}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in full["param_groups"]]
    return {"state": {index[n]: s for n, s in full["state"].items()}, "param_groups": groups}


def load_full_optimizer_state_dict(
    model: nn.Module, optimizer: torch.optim.Optimizer, state_dict: Mapping[str, Any]
) -> None:
    """Load ``state_dict`` (torch's index format, e.g. written by DDP or by
    :func:`full_optimizer_state_dict`) into the optimizer of a sharded ``model``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    names = _param_names(model, optimizer)
    saved = [len(g["params"]) for g in state_dict["param_groups"]]
    own = [len(g["params"]) for g in optimizer.param_groups]
    if saved != own:
        raise ValueError(
            f"optimizer state of the checkpoint has parameter groups of sizes {saved}, the optimizer {own}: "
            "it was written for another model or trainable set"
        )
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in state_dict["param_groups"]]
    state = {names[i]: s for i, s in state_dict["state"].items()}
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups}, options=_options())
