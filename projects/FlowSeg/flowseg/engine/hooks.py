"""Training-loop guards: clear failure on a non-finite loss, no checkpoint of non-finite weights.

Detectron2's ``SimpleTrainer`` checks the loss only on the main process and after gathering, so
another rank with a NaN steps on and hangs in the next collective. Here every rank checks its own
losses before ``optimizer.step()`` and raises :class:`NonFiniteLossError` naming the iteration and
every loss term. Since the exception stops the loop before ``after_step``, no checkpoint is written
for that iteration; :class:`SafePeriodicCheckpointer` additionally refuses to save weights that
are already non-finite (e.g. after an infinite gradient), so the last good checkpoint is kept.
"""

from __future__ import annotations

import math
import time
from typing import Dict, Mapping, Optional

import torch
from detectron2.engine import hooks
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer

from .fsdp import sync_replicated_grads

__all__ = [
    "NonFiniteLossError",
    "check_losses_finite",
    "CheckedSimpleTrainer",
    "CheckedAMPTrainer",
    "SafePeriodicCheckpointer",
]


class NonFiniteLossError(FloatingPointError):
    """The total loss (or the weights) became NaN/inf. Subclass of Detectron2's FloatingPointError."""


def check_losses_finite(loss_dict: Mapping[str, torch.Tensor], iteration: int) -> None:
    """Raise :class:`NonFiniteLossError` naming ``iteration`` and all loss terms if any is NaN/inf."""
    if not loss_dict:
        return
    # one device->host copy for all terms (this runs every iteration)
    flat = torch.stack([v.detach().float().sum() for v in loss_dict.values()]).cpu().tolist()
    values: Dict[str, float] = dict(zip(loss_dict.keys(), flat))
    if all(math.isfinite(v) for v in values.values()):
        return
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    terms = ", ".join(f"{k}={v:.6g}" for k, v in values.items())
    raise NonFiniteLossError(
        f"Loss became infinite or NaN at iteration={iteration}: non-finite terms {bad}; "
        f"loss_dict = {{{terms}}}. The optimizer step was skipped and no checkpoint was written for "
        "this iteration. Lower SOLVER.BASE_LR, enable SOLVER.CLIP_GRADIENTS, or check the inputs."
    )


class _LossCheckMixin:
    iter: int

    def _write_metrics(  # type: ignore[override]
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: Optional[int] = None,  # Detectron2's parameter name
    ) -> None:
        # Called after backward and before optimizer.step() on every rank.
        check_losses_finite(loss_dict, self.iter if iter is None else iter)
        super()._write_metrics(loss_dict, data_time, prefix=prefix, iter=iter)  # type: ignore[misc]

    def after_backward(self) -> None:
        # the scalar parameters FSDP2 leaves replicated get DDP's averaged gradient (no-op otherwise)
        sync_replicated_grads(self.model)  # type: ignore[attr-defined]
        super().after_backward()  # type: ignore[misc]


class CheckedSimpleTrainer(_LossCheckMixin, SimpleTrainer):
    """``SimpleTrainer`` whose every rank fails clearly on a non-finite loss."""


class CheckedAMPTrainer(_LossCheckMixin, AMPTrainer):
    """``AMPTrainer`` that autocasts on the model's device type and fails clearly on a non-finite loss.

    Detectron2's ``AMPTrainer`` autocasts with ``torch.cuda.amp`` only and always scales the loss.
    Here the autocast follows ``device_type`` (CPU autocast runs the same mixed-precision path in
    the tests) and ``precision``; bfloat16 has float32's exponent range, so it gets a disabled
    ``GradScaler`` (no loss scaling, as X-SAM's DeepSpeed bf16) and float16 a real one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        data_loader,
        optimizer: torch.optim.Optimizer,
        *,
        precision: torch.dtype = torch.bfloat16,
        device_type: str = "cuda",
    ) -> None:
        if precision not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast precision must be torch.bfloat16 or torch.float16, got {precision}")
        scaler = torch.amp.GradScaler(device_type, enabled=precision == torch.float16)
        super().__init__(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
        self.device_type = device_type

    def run_step(self) -> None:
        assert self.model.training, "[CheckedAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                loss_dict = {"total_loss": loss_dict}
            losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()  # a disabled scaler returns the loss unchanged
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class SafePeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """``PeriodicCheckpointer`` that never overwrites the last checkpoint with non-finite weights."""

    def _save_due(self, iteration: int) -> bool:
        return (iteration + 1) % self.period == 0 or (
            self.max_iter is not None and iteration >= self.max_iter - 1
        )

    def after_step(self) -> None:
        iteration = self.trainer.iter
        if self._save_due(iteration):
            model = self.checkpointer.model
            bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
            if bad:
                last = self.checkpointer.get_checkpoint_file() or "none"
                raise NonFiniteLossError(
                    f"Weights became non-finite at iteration={iteration} ({len(bad)} tensors, "
                    f"e.g. {bad[:3]}); not saving. Last checkpoint kept: {last}"
                )
        super().after_step()
