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
from typing import Dict, Mapping, Optional

import torch
from detectron2.engine import hooks
from detectron2.engine.train_loop import AMPTrainer, SimpleTrainer

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


class CheckedSimpleTrainer(_LossCheckMixin, SimpleTrainer):
    """``SimpleTrainer`` whose every rank fails clearly on a non-finite loss."""


class CheckedAMPTrainer(_LossCheckMixin, AMPTrainer):
    """``AMPTrainer`` whose every rank fails clearly on a non-finite loss."""


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
