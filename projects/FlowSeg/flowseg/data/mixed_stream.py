"""The mixed-task training stream: which dataset and which samples each step reads, and their mapping.

Samples come from one infinite stream per dataset: Detectron2's :class:`TrainingSampler` (the
same seeded permutation on every rank, rank ``r`` takes every ``world_size``-th index), so ranks
see disjoint samples of the same dataset within an epoch.

Determinism: the task of step ``s`` and the sample indices of its batch depend only on the seed,
the rank and the world size, not on ``DATALOADER.NUM_WORKERS``: each worker walks the whole
(cheap, index-only) schedule and maps only its share of the steps, in the order torch's DataLoader
collects them. Mappers' augmentations draw from the global RNGs, seeded from (seed, rank, step)
for each batch and put back afterwards (:func:`flowseg.utils.rng.step_seeded_rngs`): a batch does
not depend on the worker count or the process's history, and 0 workers leave the training loop's
RNGs untouched. :func:`set_start_step` starts the stream at step ``s`` (resume): earlier steps are
replayed index-only, so the batches from ``s`` on are an uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.data.samplers import TrainingSampler
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..utils.rng import step_seeded_rngs

__all__ = ["Mapper", "MixedTaskStream", "set_start_step"]

logger = logging.getLogger(__name__)

Mapper = Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]

_TASK_DRAW_CHUNK = 1024  # tasks are drawn in chunks; fixed so the sequence never depends on it
_MAX_MAPPER_RETRIES = 100


class _RankTrainingSampler(TrainingSampler):
    """Detectron2's TrainingSampler with an explicit rank / world size (tests simulate ranks)."""

    def __init__(self, size: int, *, seed: int, rank: int, world_size: int) -> None:
        super().__init__(size, shuffle=True, seed=seed)
        self._rank, self._world_size = int(rank), int(world_size)


class MixedTaskStream(IterableDataset):
    """Infinite stream of single-dataset batches (lists of mapped dicts); see the module docstring.

    Args:
        datasets: map-style datasets of raw dataset dicts (e.g. ``DatasetFromList``).
        mappers: one callable per dataset; may return ``None`` to skip a sample (Detectron2's
            convention), which is then replaced by a seeded random sample of the same dataset.
        probs: sampling probability of each dataset (see :func:`resolve_task_ratios`).
        batch_size: samples per batch on this rank.
        seed: shared by all ranks; fixes the task sequence and the per-dataset permutations.
        rank, world_size: this process's shard.
        names: dataset names (logs, errors, ``dataset_name`` of the outputs).
        default_tasks: ``task`` set on outputs that lack one (``None``: leave as is).
        start_step: first step yielded (the earlier ones are replayed index-only and skipped).
    """

    def __init__(
        self,
        datasets: Sequence[Dataset],
        mappers: Sequence[Mapper],
        probs: Sequence[float],
        *,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        names: Optional[Sequence[str]] = None,
        default_tasks: Optional[Sequence[Optional[str]]] = None,
        start_step: int = 0,
    ) -> None:
        n = len(datasets)
        if n == 0:
            raise ValueError("mixed-task loader: no datasets given")
        if not (len(mappers) == len(probs) == n):
            raise ValueError(
                f"mixed-task loader: {n} datasets but {len(mappers)} mappers and {len(probs)} probabilities"
            )
        if batch_size <= 0:
            raise ValueError(f"mixed-task loader: batch size per rank must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"mixed-task loader: rank {rank} is not in [0, {world_size})")
        self.names = list(names) if names is not None else [f"dataset{i}" for i in range(n)]
        for name, ds in zip(self.names, datasets):
            if len(ds) == 0:
                raise ValueError(f"mixed-task loader: dataset {name!r} is empty")
        self.datasets = list(datasets)
        self.mappers = list(mappers)
        self.probs = torch.tensor([float(p) for p in probs], dtype=torch.float64)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.default_tasks = list(default_tasks) if default_tasks is not None else [None] * n
        self.start_step = int(start_step)

    def task_indices(self) -> Iterator[int]:
        """Infinite sequence of dataset indices, one per step; identical on every rank."""
        g = torch.Generator()
        g.manual_seed(self.seed)
        while True:
            yield from torch.multinomial(self.probs, _TASK_DRAW_CHUNK, replacement=True, generator=g).tolist()

    def _dataset_seed(self, i: int) -> int:
        # Distinct permutations per dataset (two datasets of equal size must not be read in lockstep).
        return (self.seed * 1_000_003 + 7919 * (i + 1)) % 2**63

    def schedule(self) -> Iterator[Tuple[int, List[int]]]:
        """Infinite ``(dataset index, sample indices)`` per step for this rank (no mapping)."""
        streams = [
            iter(
                _RankTrainingSampler(
                    len(ds), seed=self._dataset_seed(i), rank=self.rank, world_size=self.world_size
                )
            )
            for i, ds in enumerate(self.datasets)
        ]
        for d in self.task_indices():
            stream = streams[d]
            yield d, [next(stream) for _ in range(self.batch_size)]

    def _map(self, d: int, index: int, step: int, slot: int) -> Dict[str, Any]:
        dataset, mapper = self.datasets[d], self.mappers[d]
        rng: Optional[random.Random] = None
        for attempt in range(_MAX_MAPPER_RETRIES):
            out = mapper(dataset[index])
            if out is not None:
                break
            if attempt == 2:
                logger.warning("mapper of %r skipped 3 samples in a row (step %d)", self.names[d], step)
            if rng is None:  # seeded by position, so the replacement is reproducible
                rng = random.Random(f"{self.seed}-{self.rank}-{step}-{slot}")
            index = rng.randrange(len(dataset))
        else:
            raise RuntimeError(
                f"mixed-task loader: the mapper of dataset {self.names[d]!r} returned None "
                f"for {_MAX_MAPPER_RETRIES} samples in a row"
            )
        for x in out if isinstance(out, list) else [out]:
            if isinstance(x, dict):
                if self.default_tasks[d] is not None:
                    x.setdefault("task", self.default_tasks[d])
                x.setdefault("dataset_name", self.names[d])
        return out

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        info = get_worker_info()
        num_workers, worker_id = (1, 0) if info is None else (info.num_workers, info.id)
        for step, (d, indices) in enumerate(self.schedule()):
            if step < self.start_step or (step - self.start_step) % num_workers != worker_id:
                continue  # skipped on resume, or another worker's step (collected round-robin)
            batch: List[Dict[str, Any]] = []
            with step_seeded_rngs(self.seed, self.rank, step):
                for slot, i in enumerate(indices):
                    out = self._map(d, i, step, slot)
                    # several samples per item (an image's expressions) stay consecutive: shared encoding
                    batch.extend(out if isinstance(out, list) else [out])
            yield batch


def set_start_step(loader: DataLoader, step: int) -> None:
    """Make a mixed-task ``loader`` start at ``step`` (resume); call it before ``iter(loader)``."""
    if not isinstance(loader.dataset, MixedTaskStream):
        raise TypeError(f"set_start_step needs a mixed-task loader, got a loader of {type(loader.dataset)}")
    loader.dataset.start_step = int(step)
