"""Exact resume: a checkpoint also carries the RNG states, and the data stream restarts where it was.

Detectron2's checkpoint holds the weights, the optimizer, the LR scheduler and the iteration.
:class:`ExactResumeHook` adds, under ``trainer.hooks.ExactResumeHook`` of each checkpoint:

* ``iteration``: the last finished step, and ``rng``: the global RNG states after it (Python
  ``random``, NumPy, torch CPU, CUDA where used; :mod:`flowseg.utils.rng`). They drive dropout and
  the criterion's point sampling.

On ``--resume`` the hook makes the mixed-task training stream (:mod:`flowseg.data.mixed`, which
also reads single-dataset training) start at the resumed iteration (the skipped steps are replayed
index-only, each batch's augmentation is seeded by its step) and restores the RNG states, so kill +
resume ends with the weights of an uninterrupted run, bit for bit, on one process.

Where it is not exact, it says so in the log:

* a loader that is not the mixed-task stream (``DATALOADER.SAMPLER_TRAIN`` other than
  ``TrainingSampler``) restarts its sampler from the beginning;
* with several processes under DDP, the checkpoint (written by the main process) holds the main
  process's RNG states only; the other ranks keep the states ``SEED`` gives them (the sharded
  engine saves collectively, so its checkpoints hold every rank's states, ``rng_per_rank``);
* a checkpoint written before this hook existed carries no RNG state.

Every step also starts from the RNG state the previous step ended with, even when an evaluation
(``TEST.EVAL_PERIOD``) drew random numbers in between, so an evaluation in the uninterrupted run
does not make it differ from a resumed one.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.mixed import MixedTaskStream, set_start_step
from ..utils.rng import capture_rng_state, restore_rng_state

__all__ = ["ExactResumeHook"]

logger = logging.getLogger(__name__)


class ExactResumeHook(HookBase):
    """See the module docstring. Registered first, so its ``after_step`` runs before checkpointing."""

    def __init__(self, all_ranks: bool = False) -> None:
        """``all_ranks``: checkpoints are saved collectively (sharded engine), so each one can
        carry every rank's RNG states and each rank resumes with its own."""
        self._rng: Optional[Dict[str, Any]] = None  # state after the last finished step
        self._iteration: Optional[int] = None
        self._loaded: Optional[Dict[str, Any]] = None
        self.all_ranks = all_ranks

    def state_dict(self) -> Dict[str, Any]:
        if self._rng is None:
            return {}
        ret = {"iteration": self._iteration, "rng": self._rng}
        if self.all_ranks and comm.get_world_size() > 1:
            ret["rng_per_rank"] = comm.all_gather(self._rng)
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._loaded = dict(state_dict)

    def before_train(self) -> None:
        start = int(self.trainer.start_iter)
        loader = self.trainer._trainer.data_loader
        if isinstance(getattr(loader, "dataset", None), MixedTaskStream):
            set_start_step(loader, start)
        elif start > 0:
            logger.warning(
                "Resuming at iteration %d with a training loader that cannot skip ahead (%s): its "
                "sampler restarts from the beginning, so the run will not repeat an uninterrupted one.",
                start,
                type(loader).__name__,
            )
        # Creating the loader's iterator draws from torch's RNG: do it before the states are restored.
        self.trainer._trainer._data_loader_iter  # noqa: B018  (property that creates it)
        if start == 0:
            return
        loaded = self._loaded or {}
        if "rng" not in loaded:
            logger.warning(
                "Resuming at iteration %d from a checkpoint without RNG states: the data stream "
                "continues exactly, but dropout / point sampling will draw other random numbers.",
                start,
            )
            return
        if int(loaded["iteration"]) + 1 != start:
            logger.warning(
                "Checkpoint RNG states are from iteration %s, training resumes at %d: not restored.",
                loaded["iteration"],
                start,
            )
            return
        per_rank = loaded.get("rng_per_rank") or []
        if len(per_rank) == comm.get_world_size() > 1:
            loaded = dict(loaded, rng=per_rank[comm.get_rank()])
        elif comm.get_world_size() > 1 and not comm.is_main_process():
            logger.info(
                "RNG states in the checkpoint are the main process's: rank %d keeps its own.", comm.get_rank()
            )
            return
        self._rng, self._iteration = loaded["rng"], int(loaded["iteration"])
        logger.info(
            "Restored the RNG states of iteration %d; the data stream continues at step %d.", start - 1, start
        )

    def before_step(self) -> None:
        if self._rng is not None:
            restore_rng_state(self._rng)  # undo what anything between two steps (evaluation) drew

    def after_step(self) -> None:
        self._rng, self._iteration = capture_rng_state(), int(self.trainer.iter)
