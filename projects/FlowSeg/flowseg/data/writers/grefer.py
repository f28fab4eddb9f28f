"""Write a dataset in the gRefCOCO (GRES) layout, as ``flowseg.data.datasets.grefcoco`` reads it::

    root/{dataset_name}/instances.json
    root/{dataset_name}/grefs({split_by}).json
    root/images/mscoco/images/train2014/*.jpg

A gRefCOCO ref lists every object its sentences denote: ``ann_id`` and ``category_id`` are
lists, and a ref whose sentences denote nothing in the image has ``ann_id == [-1]``,
``category_id == [-1]`` and ``no_target == True`` (the published ``grefs(unc).json`` spelling).
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional, Sequence

from .refer import coco_annotations, coco_images_written

__all__ = ["grefs_file_name", "write_grefcoco_dataset"]

NO_TARGET_ID = -1


def grefs_file_name(split_by: str) -> str:
    """Name of the refs json of a partition scheme, e.g. ``grefs(unc).json``."""
    return f"grefs({split_by}).json"


def write_grefcoco_dataset(
    root: str,
    dataset_name: str,
    split_by: str,
    images: Sequence[Dict[str, Any]],
    annotations: Sequence[Dict[str, Any]],
    refs: Sequence[Dict[str, Any]],
    categories: Optional[Sequence[Dict[str, Any]]] = None,
    image_root: Optional[str] = None,
) -> Dict[str, str]:
    """Write a gRefCOCO-format dataset.

    Args:
        root: the ``refer_seg`` folder.
        dataset_name: sub-folder (``"grefcoco"`` or any name).
        split_by: partition name; the refs go to ``grefs({split_by}).json``.
        images, annotations, categories, image_root: as for
            :func:`flowseg.data.writers.refer.write_refer_dataset`.
        refs: ``{"ann_indices": [int] (empty = no target), "image_index": int, "split": str,
            "sentences": [str], "ref_id"?: int}``; ``image_index`` is needed for a no-target ref
            and must agree with the annotations' image otherwise.

    Returns:
        ``{"refer_root", "instances", "refs", "image_root"}`` paths.
    """
    image_root = image_root or os.path.join(root, "images", "mscoco", "images", "train2014")
    categories = list(categories) if categories else [{"id": 1, "name": "object", "supercategory": "object"}]
    ds_dir = os.path.join(root, dataset_name)
    os.makedirs(ds_dir, exist_ok=True)
    os.makedirs(image_root, exist_ok=True)
    coco_images = coco_images_written(images, image_root)
    coco_anns = coco_annotations(annotations, coco_images, categories)

    grefs = []
    sent_id = 0
    for k, ref in enumerate(refs):
        anns = [coco_anns[i] for i in ref["ann_indices"]]
        img = coco_images[ref["image_index"]]
        if any(a["image_id"] != img["id"] for a in anns):
            raise ValueError(
                f"ref {k}: its annotations lie in another image than image_index {ref['image_index']}"
            )
        sentences = []
        for text in ref["sentences"]:
            sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
            sent_id += 1
        grefs.append(
            {
                "ref_id": int(ref.get("ref_id", k)),
                "image_id": img["id"],
                "ann_id": [a["id"] for a in anns] or [NO_TARGET_ID],
                "category_id": [a["category_id"] for a in anns] or [NO_TARGET_ID],
                "no_target": not anns,
                "split": ref["split"],
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "file_name": img["file_name"],
            }
        )

    inst_path = os.path.join(ds_dir, "instances.json")
    with open(inst_path, "w", encoding="utf-8") as f:
        json.dump({"images": coco_images, "annotations": coco_anns, "categories": categories}, f)
    refs_path = os.path.join(ds_dir, grefs_file_name(split_by))
    with open(refs_path, "w", encoding="utf-8") as f:
        json.dump(grefs, f)
    return {"refer_root": root, "instances": inst_path, "refs": refs_path, "image_root": image_root}
