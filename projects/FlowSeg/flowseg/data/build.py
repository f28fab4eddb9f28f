"""Dataset-mapper selection by name (``INPUT.DATASET_MAPPER_NAME``).

Every mapper family registers a *factory* in :data:`MAPPER_REGISTRY`; it is called as
``factory(cfg, is_train)`` and returns a callable ``dataset_dict -> model input``. A class
decorated with ``@configurable`` whose ``from_config(cls, cfg, is_train=True)`` takes those
arguments is such a factory, and so is a plain function (used when training and testing need
different mapper classes, as for COCO-panoptic).

The training and test loaders wrap these mappers in :class:`GuardedMapper` (:func:`guard_mapper`):
an ``OSError`` / ``ValueError`` of a sample then names it (file, ids), and
``DATALOADER.ON_BAD_SAMPLE "skip"`` leaves it out instead (:mod:`flowseg.utils.bad_samples`).

Names in use: ``"coco_panoptic_lsj"`` (this package), ``"referring"``, ``"reasoning"``
(registered by the referring / reasoning data modules). Register your own with::

    @MAPPER_REGISTRY.register("my_mapper")
    class MyMapper: ...
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional, Union

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.utils.registry import Registry

from ..utils.bad_samples import BAD_INPUT_ERRORS, annotate_error, check_policy, describe_sample, record_skip

__all__ = [
    "GuardedMapper",
    "MAPPER_REGISTRY",
    "guard_mapper",
    "build_train_mapper",
    "build_test_mapper",
    "mapper_name_for_dataset",
]


class _NamedRegistry(Registry):
    """Detectron2's Registry, plus ``register("name")`` so mappers get short config names."""

    def register(self, obj: Union[str, Any, None] = None) -> Any:  # type: ignore[override]
        if isinstance(obj, str):
            name = obj

            def deco(func_or_class: Any) -> Any:
                self._do_register(name, func_or_class)
                return func_or_class

            return deco
        return super().register(obj)


MAPPER_REGISTRY = _NamedRegistry("FLOWSEG_DATASET_MAPPER")
MAPPER_REGISTRY.__doc__ = "Dataset-mapper factories, called as factory(cfg, is_train) -> mapper."

# Test datasets can differ in kind from the training mapper (stage-3 trains on mixed data but
# evaluates RefCOCO with the referring mapper, COCO with the panoptic one): the evaluator type a
# dataset registers with says which mapper reads it.
_EVALUATOR_TYPE_TO_MAPPER = {
    "coco_panoptic_seg": "coco_panoptic_lsj",
    "refer": "referring",
    "gres": "referring",
    "reason_seg": "reasoning",
}


def _get(name: str) -> Callable[..., Callable[[dict], Any]]:
    if name not in MAPPER_REGISTRY:
        known = sorted(k for k, _ in MAPPER_REGISTRY)
        raise KeyError(
            f"INPUT.DATASET_MAPPER_NAME {name!r} is not a registered dataset mapper; known: {known}. "
            "Import the module that registers it (``import flowseg`` registers FlowSeg's)."
        )
    return MAPPER_REGISTRY.get(name)


class GuardedMapper:
    """A mapper whose bad-input errors name the sample, or skip it (``DATALOADER.ON_BAD_SAMPLE``).

    Skipping returns ``None`` in training (the loader draws a replacement) and, at test time, a
    placeholder ``{"bad_sample": {...ids, "cause"}}`` that the evaluation loop leaves out and counts
    (test loaders must keep one output per sample).
    """

    def __init__(
        self, mapper: Callable[[dict], Any], policy: str, is_train: bool, log_file: Optional[str] = None
    ) -> None:
        self.mapper, self.policy, self.is_train = mapper, check_policy(policy), bool(is_train)
        self.log_file = log_file

    def __call__(self, dataset_dict: Dict[str, Any]) -> Any:
        try:
            return self.mapper(dataset_dict)
        except BAD_INPUT_ERRORS as e:
            if self.policy == "error":
                annotate_error(e, describe_sample(dataset_dict))
                raise
            rec = record_skip(dataset_dict, e, self.log_file)
            return None if self.is_train else {"bad_sample": rec}


def guard_mapper(cfg: CfgNode, mapper: Callable[[dict], Any], is_train: bool) -> GuardedMapper:
    """``mapper`` under ``cfg.DATALOADER.ON_BAD_SAMPLE`` (training skips are listed in
    ``OUTPUT_DIR/skipped_samples_train.jsonl``)."""
    log = os.path.join(cfg.OUTPUT_DIR, "skipped_samples_train.jsonl") if is_train and cfg.OUTPUT_DIR else None
    return GuardedMapper(mapper, cfg.DATALOADER.ON_BAD_SAMPLE, is_train, log)


def build_train_mapper(cfg: CfgNode) -> Callable[[dict], Any]:
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    return _get(cfg.INPUT.DATASET_MAPPER_NAME)(cfg, True)


def mapper_name_for_dataset(cfg: CfgNode, dataset_name: str) -> str:
    """Mapper name for evaluating ``dataset_name``.

    Order: the dataset's metadata ``dataset_mapper_name`` (if its registration set one), then the
    mapper that matches its ``evaluator_type`` (if registered), then ``INPUT.DATASET_MAPPER_NAME``.
    """
    meta = MetadataCatalog.get(dataset_name)
    explicit: Optional[str] = meta.get("dataset_mapper_name", None)
    if explicit:
        return explicit
    by_type = _EVALUATOR_TYPE_TO_MAPPER.get(meta.get("evaluator_type", None))
    if by_type is not None and by_type in MAPPER_REGISTRY:
        return by_type
    return cfg.INPUT.DATASET_MAPPER_NAME


def build_test_mapper(cfg: CfgNode, dataset_name: str) -> Callable[[dict], Any]:
    """The inference mapper for ``dataset_name`` (see :func:`mapper_name_for_dataset`)."""
    return _get(mapper_name_for_dataset(cfg, dataset_name))(cfg, False)
