"""Evaluator wiring by dataset ``evaluator_type`` and the metrics-JSON files.

* ``coco_panoptic_seg``: Detectron2's ``COCOPanopticEvaluator`` (PQ), ``COCOEvaluator`` (mask AP,
  when the metadata's instances ``json_file`` exists) and ``SemSegEvaluator`` (mIoU, when the
  ``sem_seg_root`` folder exists), each only if the model produces that output
  (``MODEL.MASK_FORMER.TEST.{PANOPTIC,INSTANCE,SEMANTIC}_ON``);
* ``refer`` / ``reason_seg``: FlowSeg's ``ReferringEvaluator`` / ``ReasoningEvaluator``;
* ``gres`` (gRefCOCO): FlowSeg's ``GRESEvaluator`` (cIoU, gIoU, N-acc, T-acc);
* ``sem_seg`` / ``coco``: Detectron2's ``SemSegEvaluator`` / ``COCOEvaluator``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.evaluation import (
    COCOEvaluator,
    COCOPanopticEvaluator,
    DatasetEvaluator,
    DatasetEvaluators,
    SemSegEvaluator,
)

from ..utils.jsonable import to_jsonable
from .provenance import same_run

__all__ = [
    "ALL_METRICS_FILE",
    "build_evaluator",
    "check_evaluation_categories",
    "check_num_classes",
    "metrics_json_path",
    "write_metrics_json",
]

logger = logging.getLogger(__name__)


def check_num_classes(cfg: CfgNode, dataset_names: Sequence[str]) -> None:
    """Fail early when a generic-mode model without an LLM has another class count than the data.

    Its classifier has ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` outputs indexed by contiguous id; a
    mismatch otherwise shows up much later as an index error in the loss or a reshape error in
    ``SemSegEvaluator``. With an LLM the classes are the category names, so any count works.
    """
    if cfg.MODEL.FLOWSEG.MODE != "generic" or cfg.MODEL.LLM.PATH or cfg.MODEL.LLM.CONFIG:
        return
    n = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    for name in dataset_names:
        meta = MetadataCatalog.get(name)
        if meta.get("evaluator_type", None) != "coco_panoptic_seg":
            continue
        classes = meta.get("stuff_classes", None)  # every category (Mask2Former's convention)
        if classes is not None and len(classes) != n:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {n} but data set {name!r} has {len(classes)} "
                f"categories ({list(classes)[:5]}...) from {_source(meta)}: set "
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES {len(classes)}, or give the data set its own "
                "categories (datasets/README.md, 'Your own panoptic data')"
            )


def _source(meta: Any) -> str:
    return meta.get("categories_source", None) or f"the metadata of {meta.name!r}"


def check_evaluation_categories(dataset_name: str, coco_evaluator: Optional[COCOEvaluator] = None) -> None:
    """Raise ``ValueError`` when the categories that the panoptic json (PQ) or the instances json
    (AP, read by ``coco_evaluator``) lists are not the data set's: Detectron2's evaluators would
    otherwise end in a ``KeyError`` or a bare ``AssertionError`` after the whole inference."""
    from ..data.datasets.panoptic_categories import json_categories

    meta = MetadataCatalog.get(dataset_name)
    mine = set(meta.stuff_dataset_id_to_contiguous_id)
    pan_json = meta.get("panoptic_json", None)
    listed = json_categories(pan_json) if pan_json and os.path.isfile(pan_json) else None
    if listed is not None and {int(c["id"]) for c in listed} != mine:
        raise ValueError(
            f"{dataset_name}: {pan_json} lists category ids {sorted(int(c['id']) for c in listed)[:10]}... "
            f"but the data set's categories (from {_source(meta)}) have ids {sorted(mine)[:10]}...; "
            "PQ needs the same categories"
        )
    api = getattr(coco_evaluator, "_coco_api", None)
    things = set(meta.thing_dataset_id_to_contiguous_id)
    if api is not None and set(api.getCatIds()) != things:
        raise ValueError(
            f"{dataset_name}: {meta.json_file} lists thing category ids {sorted(api.getCatIds())[:10]}... "
            f"but the data set's things (from {_source(meta)}) have ids {sorted(things)[:10]}...; "
            "mask AP needs the same categories"
        )


def build_evaluator(cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None) -> DatasetEvaluator:
    """The evaluator(s) for ``dataset_name``, chosen by its metadata ``evaluator_type``."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    meta = MetadataCatalog.get(dataset_name)
    etype = meta.get("evaluator_type", None)
    evaluators: List[DatasetEvaluator] = []
    if etype == "coco_panoptic_seg":
        test = cfg.MODEL.MASK_FORMER.TEST
        if test.PANOPTIC_ON:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
        json_file = meta.get("json_file", None)
        coco = None
        if test.INSTANCE_ON and json_file and os.path.isfile(json_file):
            # masks only: the paper reports mask AP; box AP of mask-derived boxes adds time, not insight
            coco = COCOEvaluator(dataset_name, tasks=("segm",), distributed=True, output_dir=output_folder)
            evaluators.append(coco)
        check_evaluation_categories(dataset_name, coco)
        sem_seg_root = meta.get("sem_seg_root", None)
        if test.SEMANTIC_ON and sem_seg_root and os.path.isdir(sem_seg_root):
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif etype == "refer":
        from ..evaluation import ReferringEvaluator  # local: optional module, heavy deps

        evaluators.append(ReferringEvaluator(dataset_name, output_dir=output_folder, distributed=True))
    elif etype == "gres":
        from ..evaluation import GRESEvaluator

        evaluators.append(GRESEvaluator(dataset_name, output_dir=output_folder, distributed=True))
    elif etype == "reason_seg":
        from ..evaluation import ReasoningEvaluator

        evaluators.append(ReasoningEvaluator(dataset_name, output_dir=output_folder, distributed=True))
    elif etype == "sem_seg":
        evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
    elif etype == "coco":
        evaluators.append(COCOEvaluator(dataset_name, output_dir=output_folder))
    if not evaluators:
        raise NotImplementedError(
            f"no evaluator for dataset {dataset_name!r} with evaluator_type {etype!r} "
            "(or every output it supports is switched off in MODEL.MASK_FORMER.TEST)"
        )
    return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)


# Not "metrics.json": Detectron2's JSONWriter already appends the training log (json lines) there.
ALL_METRICS_FILE = "metrics_all.json"


def metrics_json_path(output_dir: str, dataset_name: Optional[str] = None) -> str:
    """``OUTPUT_DIR/metrics_all.json`` (all data sets) or ``OUTPUT_DIR/metrics_<dataset>.json``."""
    if dataset_name is None:
        return os.path.join(output_dir, ALL_METRICS_FILE)
    return os.path.join(output_dir, f"metrics_{re.sub(r'[^A-Za-z0-9_.+-]', '_', dataset_name)}.json")


def _run_tag(run: Optional[Mapping[str, Any]]) -> str:
    """A file-name tag for an evaluation: weights checksum prefix (or "unsaved") and iteration."""
    if not run:
        return "unknown-weights"
    sha = run.get("weights_sha256")
    it = run.get("iteration")
    return f"{sha[:12] if sha else 'unsaved-weights'}_{'eval' if it is None else f'iter{it}'}"


def _keep_other_run(path: str, run: Optional[Mapping[str, Any]]) -> Optional[Dict[str, Any]]:
    """The content of ``path`` when it holds an evaluation of the same run (to merge into);
    otherwise move it aside as ``<name>.<its weights and iteration>.json`` and return None."""
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, json.JSONDecodeError):
        old = None
    if isinstance(old, dict) and same_run(old.get("run"), run):
        return old
    stem = path[: -len(".json")]
    tag = _run_tag(old.get("run") if isinstance(old, dict) else None)
    dest, k = f"{stem}.{tag}.json", 1
    while os.path.exists(dest):
        k += 1
        dest = f"{stem}.{tag}-{k}.json"
    os.replace(path, dest)
    logger.warning("%s held another model's evaluation: kept as %s (not merged)", path, dest)
    return None


def write_metrics_json(
    output_dir: str,
    results: Mapping[str, Mapping[str, Any]],
    iteration: Optional[int] = None,
    run: Optional[Mapping[str, Any]] = None,
) -> Dict[str, str]:
    """Write ``metrics_<dataset>.json`` per data set and ``metrics_all.json`` with all; return paths.

    ``results`` maps data set -> the evaluator's result dict (e.g. ``{"panoptic_seg": {"PQ": ..}}``);
    ``run`` is :func:`flowseg.engine.provenance.evaluation_record` (weights, checksum, iteration,
    config hash), written into every file. ``metrics_all.json`` is merged with an existing one of
    the same run (evaluating data sets one by one keeps all); a file of another run (other weights,
    iteration or config) is moved aside under a name with its weights' checksum, never merged.
    """
    os.makedirs(output_dir, exist_ok=True)
    run = to_jsonable(dict(run)) if run else None
    paths = {}
    for name, res in results.items():
        payload = {"dataset": name, "iteration": iteration, "run": run, "metrics": to_jsonable(res)}
        paths[name] = metrics_json_path(output_dir, name)
        _keep_other_run(paths[name], run)
        with open(paths[name], "w") as f:
            json.dump(payload, f, indent=2)
    all_path = metrics_json_path(output_dir)
    old = _keep_other_run(all_path, run)
    merged: Dict[str, Any] = dict(old.get("metrics", {})) if old else {}
    merged.update({name: to_jsonable(res) for name, res in results.items()})
    if old and run:  # the same model evaluated data set by data set: keep every set's seconds
        run = {**run, "seconds": {**old["run"].get("seconds", {}), **run.get("seconds", {})}}
    with open(all_path, "w") as f:
        json.dump({"iteration": iteration, "run": run, "metrics": merged}, f, indent=2)
    paths["all"] = all_path
    return paths
