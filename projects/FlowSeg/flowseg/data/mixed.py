"""Mixed-task training loader (FlowSeg stage 3: referring + reasoning + panoptic + conversation).

Every batch comes from ONE dataset of ``DATASETS.TRAIN``, drawn with probabilities
``DATALOADER.TASK_RATIOS`` (normalised; empty = proportional to the dataset sizes). The draw uses
a generator seeded identically on every rank, so at step ``s`` all GPUs train the same task: the
LLM prompt templates, the answers and the loss terms differ per task, and under DDP ranks that
ran different tasks would leave different parameters unused in the same step.

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

Aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``) is not applied: FlowSeg's mappers
emit square LSJ crops or long-side-resized images that the model pads to a square, and grouping
would tie the schedule to image shapes.
"""

from __future__ import annotations

import functools
import logging
import math
import random
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetFromList, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.data.samplers import TrainingSampler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..utils.rng import step_seeded_rngs
from .build import MAPPER_REGISTRY, guard_mapper
from .dataset_mappers.grouping import group_expressions_by_image, split_groups_by_objects

__all__ = [
    "EVALUATOR_TYPE_TO_TRAIN_MAPPER",
    "EVALUATOR_TYPE_TO_TASK",
    "MixedTaskStream",
    "build_mixed_loader_from_datasets",
    "build_mixed_train_loader",
    "resolve_task_ratios",
    "set_start_step",
    "train_mapper_name_for_dataset",
]

logger = logging.getLogger(__name__)

Mapper = Callable[[Dict[str, Any]], Optional[Dict[str, Any]]]

#: Training mapper for each dataset ``evaluator_type`` (registration metadata).
EVALUATOR_TYPE_TO_TRAIN_MAPPER: Dict[str, str] = {
    "refer": "referring",
    "gres": "referring",
    "reason_seg": "reasoning",
    "coco_panoptic_seg": "coco_panoptic_lsj",
    "conversation": "conversation",
}
#: ``task`` given to mapped samples whose mapper does not set one (the panoptic mapper doesn't).
EVALUATOR_TYPE_TO_TASK: Dict[str, str] = {
    "refer": "referring",
    "gres": "referring",
    "reason_seg": "reasoning",
    "coco_panoptic_seg": "generic",
    "conversation": "conversation",
}

_TASK_DRAW_CHUNK = 1024  # tasks are drawn in chunks; fixed so the sequence never depends on it
_MAX_MAPPER_RETRIES = 100


def resolve_task_ratios(ratios: Sequence[float], sizes: Sequence[int]) -> List[float]:
    """Normalised sampling probabilities of the datasets.

    Args:
        ratios: one non-negative weight per dataset (``DATALOADER.TASK_RATIOS``); empty = ``sizes``.
        sizes: number of samples of each dataset.
    """
    weights = [float(r) for r in ratios] if len(ratios) else [float(s) for s in sizes]
    if len(weights) != len(sizes):
        raise ValueError(
            f"DATALOADER.TASK_RATIOS has {len(weights)} entries but DATASETS.TRAIN has "
            f"{len(sizes)} datasets; give one ratio per dataset (or [] for size-proportional)"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"DATALOADER.TASK_RATIOS must be finite and >= 0, got {list(ratios)}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"DATALOADER.TASK_RATIOS sum to 0 ({list(ratios)}): no dataset could be drawn")
    return [w / total for w in weights]


class _RankTrainingSampler(TrainingSampler):
    """Detectron2's TrainingSampler with an explicit rank / world size (tests simulate ranks)."""

    def __init__(self, size: int, *, seed: int, rank: int, world_size: int) -> None:
        super().__init__(size, shuffle=True, seed=seed)
        self._rank, self._world_size = int(rank), int(world_size)


def _identity(x: Any) -> Any:
    return x


def _worker_init(base_seed: int, worker_id: int) -> None:
    # Mappers' augmentations use the global RNGs; seed them per worker so runs repeat.
    seed_all_rng((base_seed + worker_id) % 2**31)


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


def build_mixed_loader_from_datasets(
    datasets: Sequence[Any],
    mappers: Sequence[Mapper],
    ratios: Sequence[float] = (),
    *,
    batch_size_per_rank: int,
    seed: Optional[int] = None,
    num_workers: int = 0,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    names: Optional[Sequence[str]] = None,
    default_tasks: Optional[Sequence[Optional[str]]] = None,
) -> DataLoader:
    """Mixed-task loader from already loaded datasets (lists of dicts or map-style datasets).

    ``seed=None`` draws a seed shared by all ranks (a collective call, like Detectron2's samplers);
    ``rank``/``world_size`` default to :mod:`detectron2.utils.comm`'s. Returns a DataLoader that
    yields lists of ``batch_size_per_rank`` mapped dicts, all from one dataset.
    """
    rank = comm.get_rank() if rank is None else rank
    world_size = comm.get_world_size() if world_size is None else world_size
    if seed is None:
        seed = comm.shared_random_seed()
    datasets = [DatasetFromList(ds, copy=False) if isinstance(ds, list) else ds for ds in datasets]
    probs = resolve_task_ratios(ratios, [len(ds) for ds in datasets])
    stream = MixedTaskStream(
        datasets,
        mappers,
        probs,
        batch_size=batch_size_per_rank,
        seed=seed,
        rank=rank,
        world_size=world_size,
        names=names,
        default_tasks=default_tasks,
    )
    return DataLoader(
        stream,
        batch_size=None,  # the stream yields whole batches
        collate_fn=_identity,
        num_workers=num_workers,
        worker_init_fn=functools.partial(_worker_init, (seed + 1009 * rank) % 2**31),
    )


def train_mapper_name_for_dataset(dataset_name: str) -> str:
    """Training mapper name for ``dataset_name``: metadata ``dataset_mapper_name``, else its
    ``evaluator_type`` through :data:`EVALUATOR_TYPE_TO_TRAIN_MAPPER`."""
    meta = MetadataCatalog.get(dataset_name)
    explicit = meta.get("dataset_mapper_name", None)
    if explicit:
        return explicit
    evaluator_type = meta.get("evaluator_type", None)
    if evaluator_type not in EVALUATOR_TYPE_TO_TRAIN_MAPPER:
        raise ValueError(
            f"mixed-task loader: cannot tell which mapper reads dataset {dataset_name!r} "
            f"(evaluator_type={evaluator_type!r}; known: {sorted(EVALUATOR_TYPE_TO_TRAIN_MAPPER)}). "
            "Set its metadata 'dataset_mapper_name' or pass mappers={name: mapper}."
        )
    return EVALUATOR_TYPE_TO_TRAIN_MAPPER[evaluator_type]


def _load_dataset_dicts(cfg: CfgNode, name: str) -> List[Dict[str, Any]]:
    dicts = DatasetCatalog.get(name)
    # Only instance-style dicts have "annotations"; conversation / referring dicts have none.
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and dicts and "annotations" in dicts[0]:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
    if cfg.INPUT.EXPRESSIONS_PER_IMAGE > 1 and evaluator_type in ("refer", "gres", "reason_seg"):
        dicts = group_expressions_by_image(dicts)  # one item per image; the mapper draws expressions
        if cfg.INPUT.PACK_EXPRESSIONS and cfg.INPUT.PACK_MODE == "all_objects":
            # X-SAM: chunks of at most K objects, repeated as often as X-SAM enumerates them
            dicts = split_groups_by_objects(dicts, cfg.INPUT.EXPRESSIONS_PER_IMAGE)
    if not dicts:
        raise ValueError(f"mixed-task loader: dataset {name!r} of DATASETS.TRAIN is empty")
    return dicts


def _build_mixed_train_loader(
    cfg: CfgNode,
    mappers: Optional[Mapping[str, Mapper]],
    *,
    rank: int,
    world_size: int,
) -> DataLoader:
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("mixed-task loader: DATASETS.TRAIN is empty")
    total = int(cfg.SOLVER.IMS_PER_BATCH)
    if total <= 0 or total % world_size:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({total}) must be a positive multiple of the number of "
            f"processes ({world_size})"
        )
    mappers = dict(mappers or {})
    built: Dict[str, Mapper] = {}  # one mapper per name, shared by datasets that need it
    datasets, dataset_mappers, default_tasks, mapper_names = [], [], [], []
    for name in names:
        datasets.append(_load_dataset_dicts(cfg, name))
        evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
        default_tasks.append(EVALUATOR_TYPE_TO_TASK.get(evaluator_type))
        if name in mappers:  # explicit per-dataset mapper
            dataset_mappers.append(mappers[name])
            mapper_names.append(f"<given for {name}>")
            continue
        mapper_name = train_mapper_name_for_dataset(name)
        if mapper_name in mappers:
            mapper = mappers[mapper_name]
        else:
            if mapper_name not in built:
                if mapper_name not in MAPPER_REGISTRY:
                    known = sorted(k for k, _ in MAPPER_REGISTRY)
                    raise KeyError(
                        f"mixed-task loader: dataset {name!r} needs mapper {mapper_name!r}, "
                        f"which is not registered (known: {known})"
                    )
                built[mapper_name] = guard_mapper(cfg, MAPPER_REGISTRY.get(mapper_name)(cfg, True), True)
            mapper = built[mapper_name]
        dataset_mappers.append(mapper)
        mapper_names.append(mapper_name)

    seed = int(cfg.SEED) if cfg.SEED >= 0 else comm.shared_random_seed()
    loader = build_mixed_loader_from_datasets(
        datasets,
        dataset_mappers,
        list(cfg.DATALOADER.TASK_RATIOS),
        batch_size_per_rank=total // world_size,
        seed=seed,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        rank=rank,
        world_size=world_size,
        names=names,
        default_tasks=default_tasks,
    )
    probs = loader.dataset.probs.tolist()
    for name, ds, mname, p in zip(names, datasets, mapper_names, probs):
        logger.info("mixed-task loader: %-40s %8d samples  mapper=%-20s p=%.4f", name, len(ds), mname, p)
    return loader


def build_mixed_train_loader(cfg: CfgNode, mappers: Optional[Mapping[str, Mapper]] = None) -> DataLoader:
    """Stage-3 training loader over every dataset of ``cfg.DATASETS.TRAIN`` (see module docstring).

    Args:
        cfg: uses ``DATASETS.TRAIN``, ``DATALOADER.TASK_RATIOS`` / ``NUM_WORKERS`` /
            ``FILTER_EMPTY_ANNOTATIONS``, ``SOLVER.IMS_PER_BATCH`` (total over all ranks) and ``SEED``
            (< 0: a random seed shared by all ranks).
        mappers: optional overrides, keyed by dataset name or by mapper name (``"referring"``,
            ``"reasoning"``, ``"coco_panoptic_lsj"``, ``"conversation"``); the rest are built from
            :data:`flowseg.data.build.MAPPER_REGISTRY` with ``factory(cfg, True)``.

    Returns:
        an iterable of lists of ``IMS_PER_BATCH // world_size`` mapped dicts, all from one dataset,
        like Detectron2's ``build_detection_train_loader``. With ``INPUT.EXPRESSIONS_PER_IMAGE``
        = K > 1, referring/reasoning datasets are read per image and their batches hold K
        consecutive dicts (expressions) per image, sharing the image tensor.
    """
    return _build_mixed_train_loader(cfg, mappers, rank=comm.get_rank(), world_size=comm.get_world_size())
