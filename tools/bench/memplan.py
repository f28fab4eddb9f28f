"""Per-GPU memory plan: bytes of weights, gradients, optimizer state and activations of a training
step, from exact parameter counts (the model on ``meta``) and activations measured on the CPU.

Activations are the tensors autograd saves for backward, caught with
``torch.autograd.graph.saved_tensors_hooks`` during one training forward of the model at its true
widths, token lengths and image size with its depths cut, and attributed to the innermost block
that saved them: an LLM decoder layer, a vision-tower encoder layer, a SAM-ViT block (windowed or
global), the pixel decoder, the transformer decoder; the rest (embeddings, projectors, BAR, the
losses) is ``other``. The plan extrapolates each block kind by its true depth and everything by the
batch; with activation checkpointing a block keeps only its input, plus one block's activations
recomputed during backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

#: block kinds whose depth the plan extrapolates, and the config switch that checkpoints them
CHECKPOINTED_BY = {
    "llm_layer": "MODEL.LLM.GRADIENT_CHECKPOINTING",
    "vision_layer": "MODEL.VANILLA_ENCODER.GRADIENT_CHECKPOINTING",
    "sam_window": "MODEL.SAM_VIT.USE_ACT_CHECKPOINT",
    "sam_global": "MODEL.SAM_VIT.USE_ACT_CHECKPOINT",
}
#: fixed-depth parts measured whole
UNITS = ("pixel_decoder", "decoder")
ADAMW_BYTES = 8  # two float32 moments per trainable parameter
GRAD_BYTES = 4  # float32 master gradients
GB = 1e9


def block_kind(name: str, module: nn.Module) -> Optional[str]:
    """The plan's kind of the module called ``name`` in the model, or None."""
    cls = type(module).__name__
    if name.startswith("condition_head.llm") and cls.endswith("DecoderLayer"):
        return "llm_layer"
    if name.startswith("condition_head.vision_encoder") and cls.endswith("EncoderLayer"):
        return "vision_layer"
    if name.startswith("backbone.net.blocks.") and name.count(".") == 3:
        return "sam_window" if getattr(module, "window_size", 0) else "sam_global"
    if name == "sem_seg_head.pixel_decoder":
        return "pixel_decoder"
    if name == "sem_seg_head.predictor":
        return "decoder"
    return None


def depths(model: nn.Module) -> Dict[str, int]:
    """How many modules of each kind ``model`` has (a ``meta`` model gives the true depths)."""
    out: Dict[str, int] = {}
    for name, m in model.named_modules():
        kind = block_kind(name, m)
        if kind is not None:
            out[kind] = out.get(kind, 0) + 1
    return out


def _tensor_bytes(x: Any) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_tensor_bytes(v) for v in x)
    return 0


@dataclass
class SavedActivations:
    """Bytes saved for backward per block kind (``per_block``: mean over the measured blocks),
    the mean input bytes of a block (what checkpointing keeps) and ``other``."""

    per_block: Dict[str, float] = field(default_factory=dict)
    inputs: Dict[str, float] = field(default_factory=dict)
    measured_depths: Dict[str, int] = field(default_factory=dict)
    other: int = 0

    def total(self) -> int:
        return int(self.other + sum(self.per_block[k] * self.measured_depths[k] for k in self.per_block))


@contextlib.contextmanager
def saved_tensor_meter(model: nn.Module):
    """Within: every tensor autograd saves is counted once (by storage), parameters left out,
    under the innermost block of :func:`block_kind`. Yields a :class:`SavedActivations` that is
    filled in on exit."""
    result = SavedActivations()
    stack: List[str] = []
    sums: Dict[str, int] = {}
    inputs: Dict[str, List[int]] = {}
    counts: Dict[str, int] = {}
    seen = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type != "meta"}
    handles = []

    def pre(kind: str):
        def hook(module, args, kwargs):
            stack.append(kind)
            inputs.setdefault(kind, []).append(
                _tensor_bytes(list(args)) + _tensor_bytes(kwargs.get("hidden_states"))
            )

        return hook

    def post(module, args, output):
        stack.pop()

    for name, m in model.named_modules():
        kind = block_kind(name, m)
        if kind is not None:
            counts[kind] = counts.get(kind, 0) + 1
            handles.append(m.register_forward_pre_hook(pre(kind), with_kwargs=True))
            handles.append(m.register_forward_hook(post))

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr and ptr not in seen:
            seen.add(ptr)
            key = stack[-1] if stack else "other"
            sums[key] = sums.get(key, 0) + storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield result
    finally:
        for h in handles:
            h.remove()
    result.other = sums.pop("other", 0)
    for kind, n in counts.items():
        calls = len(inputs.get(kind, []))
        if calls == 0:
            continue
        result.measured_depths[kind] = n
        result.per_block[kind] = sums.get(kind, 0) / n
        # a block called several times per step (e.g. once per image) keeps each call's input
        result.inputs[kind] = sum(inputs[kind]) / n


def measure_step(model: nn.Module, cfg: Any, batch: List[Dict[str, Any]]) -> Tuple[SavedActivations, int]:
    """One float32 training step (forward, backward, AdamW) of ``model`` on the CPU: the bytes saved
    for backward (:func:`saved_tensor_meter`) and the RSS the step needed on top of the built model
    (:class:`flowseg.utils.memory.PeakRSS`). Activation checkpointing must be off in ``cfg``."""
    from flowseg.engine import build_optimizer
    from flowseg.utils.memory import PeakRSS

    optimizer = build_optimizer(cfg, model)
    model.train()
    with PeakRSS() as mem:
        with saved_tensor_meter(model) as acts:
            losses = model(batch)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del losses, loss
        optimizer.step()
    optimizer.state.clear()
    return acts, mem.extra


# ----------------------------------------------------------------------------------- static parts
def static_bytes(model: nn.Module) -> Dict[str, int]:
    """Exact bytes of weights and counts of trainable parameters of a (``meta``) model."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "weights_bytes": weights,
        "trainable_bytes": sum(p.numel() * p.element_size() for p in trainable),
        # largest single tensor: the unit a fully sharded engine gathers at once, at least
        "largest_param_bytes": max((p.numel() * p.element_size() for p in model.parameters()), default=0),
    }


@dataclass
class PlanRow:
    engine: str
    gpus: int
    batch: int
    checkpointing: bool
    weights: float
    grads: float
    optimizer: float
    activations: float
    peak: float

    def fits(self, capacity_gb: float) -> bool:
        return self.peak <= capacity_gb * GB


def activation_bytes(
    acts: SavedActivations, true_depths: Dict[str, int], checkpointing: Sequence[str]
) -> float:
    """Saved bytes of one sample at the true depths; kinds in ``checkpointing`` keep their inputs,
    and the largest of them is recomputed whole during backward."""
    total = float(acts.other)
    recompute = 0.0
    for kind, per in acts.per_block.items():
        depth = true_depths.get(kind, acts.measured_depths[kind])
        if kind in checkpointing:
            total += depth * acts.inputs[kind]
            recompute = max(recompute, per)
        else:
            total += depth * per
    return total + recompute


def plan_row(
    static: Dict[str, int],
    acts_per_sample: float,
    *,
    engine: str,
    gpus: int,
    batch: int,
    checkpointing: bool,
    autocast_copies: bool,
    working_set: float = 0.0,
) -> PlanRow:
    """One row: ``engine`` "ddp" (all replicated), "zero2" (gradients and AdamW state sharded over
    ``gpus``) or "full" (weights too; the largest parameter gathered at a time). ``working_set``:
    per-sample bytes beyond the saved activations at the step's peak (temporaries of backward),
    from :func:`working_set`."""
    if engine not in ("ddp", "zero2", "full"):
        raise ValueError(f"engine must be ddp, zero2 or full, got {engine!r}")
    trainable = static["trainable"]
    shard = gpus if engine in ("zero2", "full") else 1
    weights = float(static["weights_bytes"])
    if engine == "full":
        weights = weights / gpus + static["largest_param_bytes"]
    grads = GRAD_BYTES * trainable / shard
    if engine == "ddp":
        grads *= 2  # DDP's reduction buckets hold a second copy (gradient_as_bucket_view off)
    optimizer = ADAMW_BYTES * trainable / shard
    # bf16 autocast caches a bfloat16 copy of every float32 weight it casts, for the whole forward
    copies = 2.0 * static["trainable"] if autocast_copies else 0.0
    activations = batch * acts_per_sample + copies
    # peak: activations alive with the gradients of backward, or the optimizer step afterwards
    peak = weights + max(activations + grads, grads + optimizer) + batch * working_set
    return PlanRow(engine, gpus, batch, checkpointing, weights, grads, optimizer, activations, peak)


def working_set(acts: SavedActivations, static: Dict[str, int], step_extra: int) -> float:
    """What one measured CPU step (batch 1, no DDP) needed beyond the saved activations, gradients
    and AdamW state: the temporaries of backward, taken as independent of depth (they are those of
    the largest block and the losses, not of the block count)."""
    trainable = static["trainable"]
    grads, optimizer = GRAD_BYTES * trainable, ADAMW_BYTES * trainable
    return step_extra - max(acts.total() + grads, grads + optimizer)
