"""Write a COCO-panoptic data set to disk in the real layout (Mask2Former's ``_with_sem_seg``).

Used by the tests and by synthetic-data generators: what it writes is read by exactly the same
code as real COCO (:mod:`flowseg.data.datasets.coco_panoptic`) and scored by Detectron2's own
evaluators. Layout under ``root`` (``root = $DETECTRON2_DATASETS/coco`` gives the builtin one)::

    {split}2017/000000000001.jpg                  images (JPEG)
    panoptic_{split}2017/000000000001.png         panoptic PNGs (segment id = R + 256 G + 256^2 B)
    panoptic_semseg_{split}2017/000000000001.png  semantic PNGs (contiguous ids, 255 = void)
    annotations/panoptic_{split}2017.json         COCO-panoptic json
    annotations/instances_{split}2017.json        COCO instances json of the things (RLE), for AP
"""

from __future__ import annotations

import functools
import json
import os
from multiprocessing import Pool
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image
from pycocotools import mask as mask_utils

from ..datasets.coco_panoptic import (
    coco_panoptic_metadata,
    contiguous_id_map,
    panoptic_to_semantic,
    read_annotation_json,
    register_coco_panoptic_dataset,
)

__all__ = [
    "coco_panoptic_paths",
    "register_coco_panoptic_folder",
    "write_coco_panoptic_dataset",
    "write_semantic_pngs",
]


def coco_panoptic_paths(root: str, split: str = "train") -> Dict[str, str]:
    """The paths of a ``split`` in the layout above (nothing is created)."""
    return {
        "root": root,
        "image_root": os.path.join(root, f"{split}2017"),
        "panoptic_root": os.path.join(root, f"panoptic_{split}2017"),
        "sem_seg_root": os.path.join(root, f"panoptic_semseg_{split}2017"),
        "panoptic_json": os.path.join(root, "annotations", f"panoptic_{split}2017.json"),
        "instances_json": os.path.join(root, "annotations", f"instances_{split}2017.json"),
    }


def _bbox_xywh(mask: np.ndarray) -> List[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def _encode_segments(
    image_id: int,
    shape: Tuple[int, int],
    segs: Sequence[Dict[str, Any]],
    cats: Dict[int, Dict[str, Any]],
    inst_anns: List[Dict[str, Any]],
) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """The panoptic id map and ``segments_info`` of one image; appends its things to ``inst_anns``
    (numbered on from the annotations already there)."""
    h, w = shape
    pan = np.zeros((h, w), dtype=np.uint32)  # 0 = void
    infos = []
    for k, seg in enumerate(segs):
        mask = np.asarray(seg["mask"], dtype=bool)
        cat = int(seg["category_id"])
        if mask.shape != (h, w):
            raise ValueError(f"image {image_id}, segment {k}: mask {mask.shape} != image {(h, w)}")
        if cat not in cats:
            raise ValueError(f"image {image_id}, segment {k}: category_id {cat} not in categories")
        if not mask.any():
            raise ValueError(f"image {image_id}, segment {k}: empty mask")
        if (pan[mask] != 0).any():
            raise ValueError(f"image {image_id}, segment {k}: overlaps an earlier segment")
        # Readable ids (category * 1000 + k + 1); any unique non-zero 24-bit id is valid.
        seg_id = cat * 1000 + k + 1
        pan[mask] = seg_id
        iscrowd = int(seg.get("iscrowd", 0))
        bbox, area = _bbox_xywh(mask), int(mask.sum())
        infos.append({"id": seg_id, "category_id": cat, "iscrowd": iscrowd, "bbox": bbox, "area": area})
        if cats[cat].get("isthing", 0):
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            inst_anns.append(
                {
                    "id": len(inst_anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "segmentation": rle,
                    "area": area,
                    "bbox": bbox,
                    "iscrowd": iscrowd,
                }
            )
    return pan, infos


def _category_list(categories: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [
        {
            "id": int(c["id"]),
            "name": c["name"],
            "supercategory": c.get("supercategory", c["name"]),
            "isthing": int(c.get("isthing", 0)),
            "color": list(c.get("color", [0, 0, 0])),
        }
        for c in categories
    ]


def _write_jsons(
    paths: Dict[str, str],
    images: List[Dict[str, Any]],
    pan_anns: List[Dict[str, Any]],
    inst_anns: List[Dict[str, Any]],
    cat_list: List[Dict[str, Any]],
) -> None:
    info = {"description": "written by flowseg.data.writers", "version": "1.0"}
    with open(paths["panoptic_json"], "w") as f:
        json.dump(
            {"info": info, "licenses": [], "images": images, "annotations": pan_anns, "categories": cat_list},
            f,
        )
    things = [{k: c[k] for k in ("id", "name", "supercategory")} for c in cat_list if c["isthing"]]
    with open(paths["instances_json"], "w") as f:
        json.dump(
            {"info": info, "licenses": [], "images": images, "annotations": inst_anns, "categories": things},
            f,
        )


def write_coco_panoptic_dataset(
    root: str,
    images: Sequence[np.ndarray],
    segments: Sequence[Sequence[Dict[str, Any]]],
    categories: Sequence[Dict[str, Any]],
    split: str = "train",
    image_ids: Optional[Sequence[int]] = None,
    jpeg_quality: int = 95,
) -> Dict[str, Any]:
    """Write images and their panoptic segments in COCO-panoptic format.

    Args:
        images: HxWx3 uint8 RGB arrays.
        segments: per image, a list of ``dict(mask=HxW bool, category_id=int, iscrowd=0)``; masks of
            one image must not overlap (panoptic) and must not be empty.
        categories: ``[dict(id, name, isthing, color)]`` with dataset category ids.
        image_ids: COCO image ids (default ``1..N``).

    Returns:
        The paths of :func:`coco_panoptic_paths` plus ``categories`` and ``image_ids``.
    """
    if len(images) != len(segments):
        raise ValueError(f"{len(images)} images but {len(segments)} segment lists")
    image_ids = list(image_ids) if image_ids is not None else list(range(1, len(images) + 1))
    cats = {int(c["id"]): c for c in categories}
    id_map = contiguous_id_map(categories)
    paths = coco_panoptic_paths(root, split)
    for key in ("image_root", "panoptic_root", "sem_seg_root"):
        os.makedirs(paths[key], exist_ok=True)
    os.makedirs(os.path.dirname(paths["panoptic_json"]), exist_ok=True)

    pan_images, pan_anns, inst_anns = [], [], []
    for image_id, image, segs in zip(image_ids, images, segments):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image {image_id}: expected HxWx3 uint8, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        stem = f"{image_id:012d}"
        # 4:4:4 chroma: the default 4:2:0 blurs colour edges of small objects
        Image.fromarray(image).save(
            os.path.join(paths["image_root"], stem + ".jpg"), quality=jpeg_quality, subsampling=0
        )
        pan, infos = _encode_segments(image_id, (h, w), segs, cats, inst_anns)
        Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], stem + ".png"))
        sem = panoptic_to_semantic(pan, infos, id_map)
        Image.fromarray(sem).save(os.path.join(paths["sem_seg_root"], stem + ".png"))
        pan_images.append({"id": image_id, "file_name": stem + ".jpg", "height": h, "width": w})
        pan_anns.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": infos})

    cat_list = _category_list(categories)
    _write_jsons(paths, pan_images, pan_anns, inst_anns, cat_list)
    return {**paths, "categories": cat_list, "image_ids": image_ids}


def register_coco_panoptic_folder(
    name: str,
    root: str,
    split: str = "train",
    categories: Optional[Sequence[Dict[str, Any]]] = None,
    overwrite: bool = False,
) -> Dict[str, str]:
    """Register a folder written by :func:`write_coco_panoptic_dataset` (or real COCO) as ``name``.

    ``categories`` default to those of the panoptic json. The semantic PNGs / instances json are
    used when present. Returns the paths.
    """
    paths = coco_panoptic_paths(root, split)
    source = f"the categories given to register_coco_panoptic_folder({name!r})"
    if categories is None:
        info = read_annotation_json(paths["panoptic_json"])
        categories = info.get("categories") if isinstance(info, dict) else None
        if not categories:
            raise ValueError(f"{paths['panoptic_json']}: no 'categories' list")
        source = f"the 'categories' of {paths['panoptic_json']}"
    register_coco_panoptic_dataset(
        name,
        {**coco_panoptic_metadata(categories), "categories_source": source},
        paths["image_root"],
        paths["panoptic_root"],
        paths["panoptic_json"],
        sem_seg_root=paths["sem_seg_root"] if os.path.isdir(paths["sem_seg_root"]) else None,
        instances_json=paths["instances_json"] if os.path.isfile(paths["instances_json"]) else None,
        overwrite=overwrite,
    )
    return paths


def _semantic_png(item: Dict[str, Any], panoptic_root: str, output_dir: str, id_map: Dict[int, int]) -> None:
    src = os.path.join(panoptic_root, item["file_name"])
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} not found (listed for image_id={item.get('image_id')!r})")
    pan = rgb2id(np.asarray(Image.open(src).convert("RGB"), dtype=np.uint32))
    sem = panoptic_to_semantic(pan, item["segments_info"], id_map)
    Image.fromarray(sem).save(os.path.join(output_dir, item["file_name"]))


def write_semantic_pngs(panoptic_json: str, panoptic_root: str, output_dir: str, workers: int = 1) -> int:
    """Write Mask2Former's semantic PNG of every annotation of ``panoptic_json`` to ``output_dir``
    (contiguous ids of the json's categories, things first; 255 = void; crowd segments keep their
    class); returns how many."""
    info = read_annotation_json(panoptic_json)
    if not isinstance(info, dict) or "annotations" not in info or "categories" not in info:
        raise ValueError(f"{panoptic_json}: expected a COCO-panoptic json with 'annotations', 'categories'")
    if not os.path.isdir(panoptic_root):
        raise FileNotFoundError(f"Panoptic PNG folder not found: {panoptic_root}")
    id_map = contiguous_id_map(info["categories"])
    for ann in info["annotations"]:
        for seg in ann.get("segments_info", []):
            if seg["category_id"] not in id_map:
                raise ValueError(
                    f"{panoptic_json}: image_id={ann.get('image_id')!r}, segment {seg.get('id')}: "
                    f"category_id {seg['category_id']} is not in 'categories'"
                )
    os.makedirs(output_dir, exist_ok=True)
    fn = functools.partial(_semantic_png, panoptic_root=panoptic_root, output_dir=output_dir, id_map=id_map)
    anns: List[Dict[str, Any]] = info["annotations"]
    if workers <= 1 or len(anns) < 64:
        for ann in anns:
            fn(ann)
    else:
        with Pool(processes=workers) as pool:
            pool.map(fn, anns, chunksize=100)
    return len(anns)
