"""The sharded engine: PyTorch FSDP2 (``fully_shard``), selected by ``MODEL.DISTRIBUTED.ENGINE``.

* :func:`shard_model` — ``fully_shard`` on every LLM decoder layer, SigLIP encoder layer, SAM
  block (and the pixel decoder's encoder layers), then on the root. Parameters, their gradients
  and the optimizer state are split over the ranks; ``MODEL.DISTRIBUTED.RESHARD_AFTER_FORWARD``
  False keeps the gathered weights from forward to backward (ZeRO-2-like: less communication),
  True frees them after each unit's forward (ZeRO-3-like: less memory).
* Scalar parameters (``logit_scale``, BAR's ``alpha``) are refused by ``fully_shard``: they stay
  replicated (``ignored_params``) and :func:`sync_replicated_grads` averages their gradients
  after backward, as DDP would.
* The optimizer must be built after :func:`shard_model` (its parameters become DTensors).

Checkpoints stay in the DDP format: :mod:`flowseg.checkpoint.full_state` gathers the full state
dict on every rank and the main process writes it.
"""

from __future__ import annotations

import logging
from typing import List

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from torch import nn

__all__ = [
    "ENGINES",
    "distributed_engine",
    "replicated_params",
    "shard_model",
    "shard_units",
    "sync_replicated_grads",
]

logger = logging.getLogger(__name__)

ENGINES = ("ddp", "fsdp")

#: class-name endings of the repeated blocks that become one FSDP unit each (all-gathered together)
UNIT_SUFFIXES = ("DecoderLayer", "EncoderLayer", "Block")

_REPLICATED_ATTR = "_flowseg_replicated_params"


def distributed_engine(cfg: CfgNode) -> str:
    """``MODEL.DISTRIBUTED.ENGINE`` in lower case (ValueError naming the key if unknown)."""
    name = str(cfg.MODEL.DISTRIBUTED.ENGINE).lower()
    if name not in ENGINES:
        raise ValueError(f"MODEL.DISTRIBUTED.ENGINE must be one of {list(ENGINES)}, got {name!r}")
    return name


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The repeated blocks of ``model`` that get their own ``fully_shard``, deepest first."""
    depth = {m: name.count(".") for name, m in model.named_modules() if name}
    units = [m for m in depth if type(m).__name__.endswith(UNIT_SUFFIXES)]
    return sorted(units, key=lambda m: -depth[m])  # children are sharded before their parents


def shard_model(cfg: CfgNode, model: nn.Module) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks of the default process group; returns it.

    Weights must be loaded and parts frozen before (frozen parameters are sharded too, without
    gradients); build the optimizer after.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "MODEL.DISTRIBUTED.ENGINE 'fsdp' needs torch.distributed (launch the run with train_net.py)"
        )
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    reshard = bool(cfg.MODEL.DISTRIBUTED.RESHARD_AFTER_FORWARD)
    # every rank starts from rank 0's weights, as DDP's constructor makes it (ranks are seeded
    # differently, so randomly initialised parts would otherwise differ shard by shard)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    scalars = {p for p in model.parameters() if p.dim() == 0}
    units = shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard, ignored_params=scalars)
    setattr(model, _REPLICATED_ATTR, [p for p in scalars if p.requires_grad])
    logger.info(
        "FSDP2 over %d ranks: %d units + root, reshard_after_forward=%s, %d scalar parameters replicated",
        dist.get_world_size(),
        len(units),
        reshard,
        len(scalars),
    )
    return model


def replicated_params(model: nn.Module) -> List[nn.Parameter]:
    """The trainable parameters :func:`shard_model` left replicated (empty for other models)."""
    return list(getattr(model, _REPLICATED_ATTR, []))


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of :func:`replicated_params` over the ranks (a no-op elsewhere).

    A parameter that got a gradient on some rank only gets zeros on the others, so that every
    rank sends the same tensors; one that got none anywhere keeps ``None`` (as under DDP).
    """
    params = replicated_params(model)
    if not params:
        return
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=params[0].device)
    dist.all_reduce(has)
    world = dist.get_world_size()
    for p, anywhere in zip(params, has.tolist()):
        if not anywhere:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)
        p.grad /= world
