"""gRefCOCO (GRES, Liu et al. 2023): referring expressions with several targets or none.

On disk (``$DETECTRON2_DATASETS``, default ``./datasets``), next to RefCOCO in the LISA layout::

    refer_seg/
      grefcoco/instances.json   grefcoco/grefs(unc).json
      images/mscoco/images/train2014/COCO_train2014_XXXXXXXXXXXX.jpg

A ref's ``ann_id`` is a list of annotation ids (or one id); ``[-1]`` (with ``no_target: true``)
means the sentences denote nothing in the image. Every sentence is its own sample, as for
RefCOCO. Registered: ``grefcoco_unc_{train,val,testA,testB}``.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

from .refcoco import _load_instances, image_record, read_json, ref_texts, refer_image_root, split_refs
from .validation import outside_image_problem

logger = logging.getLogger(__name__)

__all__ = [
    "GREFCOCO_SPLITS",
    "grefs_path",
    "load_grefcoco_dataset",
    "register_grefcoco_dataset",
    "register_all_grefcoco",
]

GREFCOCO_SPLITS = {("grefcoco", "unc"): ("train", "val", "testA", "testB")}
_NO_TARGET_ID = -1


def grefs_path(refer_root: str, dataset: str, split_by: str) -> str:
    """``refer_root/{dataset}/grefs({split_by}).json``."""
    return os.path.join(refer_root, dataset, f"grefs({split_by}).json")


def _load_grefs(path: str) -> List[Dict[str, Any]]:
    refs = read_json(path, "gRefCOCO", "refs file", "expected a json list of refs")
    if not isinstance(refs, list):
        raise ValueError(f"gRefCOCO: {path} must hold a list of refs, got {type(refs).__name__}")
    return refs


def _target_ann_ids(ref: Dict[str, Any], refs_path: str) -> List[Any]:
    """The ref's annotation ids; [] for a no-target ref. ``no_target`` and ``ann_id`` must agree."""
    ref_id = ref.get("ref_id")
    if "ann_id" not in ref:
        raise ValueError(f"gRefCOCO: ref_id={ref_id} in {refs_path} has no 'ann_id'")
    raw = ref["ann_id"]
    ids = [i for i in (raw if isinstance(raw, list) else [raw]) if i != _NO_TARGET_ID]
    if len(set(ids)) != len(ids):
        raise ValueError(f"gRefCOCO: ref_id={ref_id} in {refs_path} lists an ann_id twice: {raw}")
    flag = ref.get("no_target")
    if flag is not None and bool(flag) == bool(ids):
        raise ValueError(f"gRefCOCO: ref_id={ref_id} in {refs_path} has no_target={flag} but ann_id={raw}")
    return ids


def _targets(ref, ann_ids, anns, inst_path, refs_path) -> List[Dict[str, Any]]:
    ref_id, out = ref.get("ref_id"), []
    for ann_id in ann_ids:
        ann = anns.get(ann_id)
        if ann is None:
            raise ValueError(
                f"gRefCOCO: ref_id={ref_id} in {refs_path} points to ann_id={ann_id}, "
                f"which is not in {inst_path}"
            )
        if not ann.get("segmentation"):
            raise ValueError(
                f"gRefCOCO: annotation id={ann_id} in {inst_path} (ref_id={ref_id}) has no segmentation"
            )
        if ann.get("image_id") != ref.get("image_id"):
            raise ValueError(
                f"gRefCOCO: ref_id={ref_id} in {refs_path} has image_id={ref.get('image_id')} "
                f"but its ann_id={ann_id} in {inst_path} has image_id={ann.get('image_id')}"
            )
        out.append(ann)
    return out


def _ref_dicts(ref, anns, images, image_root, inst_path, refs_path) -> List[Dict[str, Any]]:
    """One dataset dict per sentence of ``ref``."""
    ref_id = ref.get("ref_id")
    ann_ids = _target_ann_ids(ref, refs_path)
    targets = _targets(ref, ann_ids, anns, inst_path, refs_path)
    img = image_record(images, ref.get("image_id"), f"ref_id={ref_id}", inst_path, "gRefCOCO")
    for ann in targets:  # a target outside the image would silently drop out of the union
        segm = ann["segmentation"]
        problem = (
            None
            if isinstance(segm, dict)
            else outside_image_problem(segm, int(img["height"]), int(img["width"]))
        )
        if problem:
            raise ValueError(
                f"gRefCOCO: annotation id={ann.get('id')} in {inst_path} (ref_id={ref_id}) has {problem}"
            )
    texts = ref_texts(ref, refs_path, "gRefCOCO")
    base = {
        "file_name": os.path.join(image_root, img["file_name"]),
        "height": int(img["height"]),
        "width": int(img["width"]),
        "image_id": img["id"],
        "ref_id": ref_id,
        "ann_ids": list(ann_ids),
        "task": "referring",
        # one segmentation per target object: training supervises each with its own query
        "segmentations": [a["segmentation"] for a in targets],
        "category_ids": [a.get("category_id") for a in targets],
        "no_target": not targets,
        "multi_target": True,  # GRES data: answer with every target, or none (flowseg.modeling.gres)
        "split": ref.get("split"),
    }
    return [{**base, "sent_id": sent_id, "expression": text} for text, sent_id in texts]


def load_grefcoco_dataset(
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Load one split of a gRefCOCO-format dataset as one dict per sentence.

    Returns:
        dicts with ``file_name, height, width, image_id, ref_id, ann_ids, sent_id, expression,
        task="referring", segmentations`` (one per target; ``[]`` for no target),
        ``category_ids, no_target, multi_target=True, split``.
    """
    image_root = image_root or refer_image_root(refer_root)
    inst_path = os.path.join(refer_root, dataset, "instances.json")
    refs_path = grefs_path(refer_root, dataset, split_by)
    data = _load_instances(inst_path)
    refs = _load_grefs(refs_path)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"gRefCOCO: image folder not found: {image_root}")
    images = {img["id"]: img for img in data["images"] if isinstance(img, dict) and "id" in img}
    anns = {ann["id"]: ann for ann in data["annotations"] if isinstance(ann, dict) and "id" in ann}
    dicts: List[Dict[str, Any]] = []
    for ref in split_refs(refs, split, refs_path, "gRefCOCO"):
        dicts += _ref_dicts(ref, anns, images, image_root, inst_path, refs_path)
    n_empty = sum(d["no_target"] for d in dicts)
    n_multi = sum(len(d["segmentations"]) > 1 for d in dicts)
    logger.info(
        "Loaded %d expressions (%d no-target, %d multi-target) of %s/%s(%s) from %s",
        len(dicts),
        n_empty,
        n_multi,
        dataset,
        split,
        split_by,
        refs_path,
    )
    return dicts


def register_grefcoco_dataset(
    name: str,
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: Optional[str] = None,
) -> None:
    """Register a gRefCOCO-format split under ``name`` (``evaluator_type="gres"``)."""
    image_root = image_root or refer_image_root(refer_root)
    DatasetCatalog.register(
        name, lambda: load_grefcoco_dataset(refer_root, dataset, split_by, split, image_root)
    )
    MetadataCatalog.get(name).set(
        evaluator_type="gres",
        refer_root=refer_root,
        refer_dataset=dataset,
        split_by=split_by,
        split=split,
        image_root=image_root,
        thing_classes=["object"],
    )


def register_all_grefcoco(root: str) -> List[str]:
    """Register ``grefcoco_unc_{train,val,testA,testB}`` under ``root/refer_seg``."""
    refer_root = os.path.join(root, "refer_seg")
    names = []
    for (dataset, split_by), splits in GREFCOCO_SPLITS.items():
        for split in splits:
            name = f"{dataset}_{split_by}_{split}"
            if name not in DatasetCatalog.list():
                register_grefcoco_dataset(name, refer_root, dataset, split_by, split)
            names.append(name)
    return names


register_all_grefcoco(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")))
