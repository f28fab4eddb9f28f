"""Mixed-task training loader (FlowSeg stage 3: referring + reasoning + panoptic + conversation).

Every batch comes from ONE dataset of ``DATASETS.TRAIN``, drawn with probabilities
``DATALOADER.TASK_RATIOS`` (normalised; empty = proportional to the dataset sizes). The draw uses
a generator seeded identically on every rank, so at step ``s`` all GPUs train the same task: the
LLM prompt templates, the answers and the loss terms differ per task, and under DDP ranks that
ran different tasks would leave different parameters unused in the same step.

Samples, seeding and resume: :mod:`flowseg.data.mixed_stream`.

Aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``) is not applied: FlowSeg's mappers
emit square LSJ crops or long-side-resized images that the model pads to a square, and grouping
would tie the schedule to image shapes.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetFromList, MetadataCatalog
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import DataLoader

from .build import MAPPER_REGISTRY, guard_mapper
from .dataset_mappers.grouping import group_expressions_by_image, split_groups_by_objects

# MixedTaskStream and set_start_step stay importable from here with the loader builders.
from .mixed_stream import Mapper, MixedTaskStream, set_start_step

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


def _identity(x: Any) -> Any:
    return x


def _worker_init(base_seed: int, worker_id: int) -> None:
    # Mappers' augmentations use the global RNGs; seed them per worker so runs repeat.
    seed_all_rng((base_seed + worker_id) % 2**31)


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


def _dataset_mapper(
    cfg: CfgNode, name: str, given: Mapping[str, Mapper], built: Dict[str, Mapper]
) -> Tuple[Mapper, str]:
    """The training mapper of dataset ``name`` and its name for the log: one given for the dataset,
    else one given for its mapper name, else the registered one (built once into ``built``)."""
    if name in given:
        return given[name], f"<given for {name}>"
    mapper_name = train_mapper_name_for_dataset(name)
    if mapper_name in given:
        return given[mapper_name], mapper_name
    if mapper_name not in built:
        if mapper_name not in MAPPER_REGISTRY:
            known = sorted(k for k, _ in MAPPER_REGISTRY)
            raise KeyError(
                f"mixed-task loader: dataset {name!r} needs mapper {mapper_name!r}, "
                f"which is not registered (known: {known})"
            )
        built[mapper_name] = guard_mapper(cfg, MAPPER_REGISTRY.get(mapper_name)(cfg, True), True)
    return built[mapper_name], mapper_name


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
    given = dict(mappers or {})
    built: Dict[str, Mapper] = {}  # one mapper per name, shared by datasets that need it
    datasets, dataset_mappers, default_tasks, mapper_names = [], [], [], []
    for name in names:
        datasets.append(_load_dataset_dicts(cfg, name))
        evaluator_type = MetadataCatalog.get(name).get("evaluator_type", None)
        default_tasks.append(EVALUATOR_TYPE_TO_TASK.get(evaluator_type))
        mapper, mapper_name = _dataset_mapper(cfg, name, given, built)
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
