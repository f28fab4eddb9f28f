"""COCO-panoptic in Mask2Former's ``_with_sem_seg`` form, and any folder in the same format.

Detectron2 already registers ``coco_2017_{train,val}_panoptic`` (and ``_separated``). Mask2Former
trains and evaluates on ``coco_2017_{train,val}_panoptic_with_sem_seg``: the panoptic json + PNGs,
plus semantic PNGs (``panoptic_semseg_{train,val}2017``, made by
``datasets/prepare_coco_semantic_annos_from_panoptic_annos.py``) for mIoU and the instances json
for AP. This module registers those two names under ``$DETECTRON2_DATASETS`` and offers
:func:`register_coco_panoptic_dataset` for any folder in that layout.

The two names take their categories from the split's own panoptic json (or an override file),
read on first use and logged when they are not COCO's: :mod:`.panoptic_categories`.

Contiguous ids: things first (in category order), then stuff. For COCO this is exactly the
order of ``COCO_CATEGORIES`` (Mask2Former's ids). Things must come first because Detectron2's
``COCOEvaluator`` requires the thing ids to be ``0..#things-1``. The semantic PNGs written by
this package use the same ids (:func:`contiguous_id_map`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from .panoptic_categories import BUILTIN_CATEGORIES_FILE, JsonCategoriesMetadata, builtin_coco_categories

logger = logging.getLogger(__name__)

__all__ = [
    "BUILTIN_CATEGORIES_FILE",
    "builtin_coco_categories",
    "coco_panoptic_metadata",
    "contiguous_id_map",
    "load_coco_panoptic_json",
    "panoptic_to_semantic",
    "read_annotation_json",
    "register_coco_panoptic_dataset",
    "register_all_coco_panoptic_with_sem_seg",
]

IGNORE_LABEL = 255
LABEL_DIVISOR = 1000

# name -> (image dir, panoptic PNG dir, panoptic json, semantic PNG dir, instances json), under root
_PREDEFINED_SPLITS_COCO_PANOPTIC_WITH_SEM_SEG = {
    "coco_2017_train_panoptic_with_sem_seg": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/panoptic_semseg_train2017",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic_with_sem_seg": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/panoptic_semseg_val2017",
        "coco/annotations/instances_val2017.json",
    ),
}


def _ordered(categories: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Stable: things keep their relative order, then stuff keeps its own.
    return [c for c in categories if c.get("isthing", 0)] + [c for c in categories if not c.get("isthing", 0)]


def contiguous_id_map(categories: Sequence[Dict[str, Any]]) -> Dict[int, int]:
    """Dataset category id -> contiguous id in ``[0, #categories)`` (things first)."""
    return {int(c["id"]): i for i, c in enumerate(_ordered(categories))}


def coco_panoptic_metadata(categories: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Mask2Former-style metadata for panoptic categories ``[{id, name, isthing, color}]``.

    ``thing_classes``/``thing_colors`` list only things; ``stuff_classes``/``stuff_colors`` list
    every category (Mask2Former's convention, so that ``SemSegEvaluator`` sees all classes);
    ``thing_dataset_id_to_contiguous_id`` maps things, ``stuff_dataset_id_to_contiguous_id`` maps all.
    """
    ordered = _ordered(categories)
    id_map = contiguous_id_map(categories)
    rng = np.random.RandomState(0)  # deterministic colours where a category has none
    colors = [
        list(c["color"]) if "color" in c else [int(v) for v in rng.randint(0, 256, size=3)] for c in ordered
    ]
    things = [i for i, c in enumerate(ordered) if c.get("isthing", 0)]
    return {
        "thing_classes": [ordered[i]["name"] for i in things],
        "thing_colors": [colors[i] for i in things],
        "stuff_classes": [c["name"] for c in ordered],
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            int(ordered[i]["id"]): id_map[int(ordered[i]["id"])] for i in things
        },
        "stuff_dataset_id_to_contiguous_id": dict(id_map),
    }


def panoptic_to_semantic(
    pan_ids: np.ndarray, segments_info: Sequence[Dict[str, Any]], id_map: Dict[int, int]
) -> np.ndarray:
    """Semantic label map (uint8, 255 = unlabeled) from a panoptic id map (``rgb2id`` output).

    ``segments_info`` carries *dataset* category ids; crowd segments keep their class, as in
    Mask2Former's semantic annotations.
    """
    sem = np.full(pan_ids.shape, IGNORE_LABEL, dtype=np.uint8)
    for seg in segments_info:
        sem[pan_ids == seg["id"]] = id_map[int(seg["category_id"])]
    return sem


class _FileIndex:
    """Existence checks by one ``listdir`` per folder: ``isfile`` on 2 x 118k COCO files is slow."""

    def __init__(self) -> None:
        self._dirs: Dict[str, frozenset] = {}

    def exists(self, path: str) -> bool:
        folder, base = os.path.split(path)
        if folder not in self._dirs:
            self._dirs[folder] = frozenset(os.listdir(folder)) if os.path.isdir(folder) else frozenset()
        return base in self._dirs[folder]


def _require_dir(path: str, what: str) -> None:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} folder not found: {path}")


def semantic_pngs_command(json_file: str, gt_dir: str, semseg_dir: str) -> str:
    """The command that makes the semantic PNGs of a panoptic json."""
    return (
        "python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py "
        f"--panoptic-json {json_file} --panoptic-root {gt_dir} --output-dir {semseg_dir}"
    )


def make_semantic_pngs(json_file: str, gt_dir: str, semseg_dir: str) -> None:
    """Write the missing semantic PNG folder ``semseg_dir`` (as :func:`semantic_pngs_command` does).

    They are written to a temporary folder renamed at the end, so that processes loading the data
    set at once (one per GPU) never read a half-written folder: the first rename wins.
    """
    from ..writers.coco_panoptic import write_semantic_pngs  # local: the writers import this module

    parent = os.path.dirname(os.path.abspath(semseg_dir))
    if not os.access(parent, os.W_OK):
        raise FileNotFoundError(
            f"Semantic PNG folder not found: {semseg_dir}, and {parent} is not writable; make them "
            f"with: {semantic_pngs_command(json_file, gt_dir, semseg_dir)}"
        )
    logger.info("Semantic PNG folder %s not found: making it from %s", semseg_dir, json_file)
    tmp = f"{semseg_dir.rstrip(os.sep)}.tmp{os.getpid()}"
    try:
        n = write_semantic_pngs(json_file, gt_dir, tmp, workers=max(1, (os.cpu_count() or 2) // 2))
    except BaseException:  # a missing panoptic PNG, a bad json: their own errors name them
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, semseg_dir)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process made them first
        if not os.path.isdir(semseg_dir):
            raise
    logger.info("Made %d semantic PNGs in %s", n, semseg_dir)


def read_annotation_json(json_file: str) -> Any:
    """``json.load`` with errors that name the file (missing -> FileNotFoundError, bad -> ValueError)."""
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"COCO-panoptic annotation file not found: {json_file}")
    try:
        with open(json_file) as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{json_file}: not a valid JSON file ({e})") from e


def _record(
    ann: Dict[str, Any], img: Optional[Dict[str, Any]], image_dir: str, gt_dir: str, semseg_dir: Optional[str]
) -> Dict[str, Any]:
    """The file names (and size, when the json's image entry ``img`` has it) of one annotation."""
    # The json's own images list names the image files; fall back to COCO's "<png stem>.jpg".
    image_name = img["file_name"] if img else os.path.splitext(ann["file_name"])[0] + ".jpg"
    record: Dict[str, Any] = {
        "file_name": os.path.join(image_dir, image_name),
        "image_id": ann["image_id"],
        "pan_seg_file_name": os.path.join(gt_dir, ann["file_name"]),
    }
    if img and "height" in img and "width" in img:
        record["height"], record["width"] = int(img["height"]), int(img["width"])
    if semseg_dir:
        record["sem_seg_file_name"] = os.path.join(semseg_dir, ann["file_name"])
    return record


def _contiguous_segments(segments_info: Any, meta: Dict[str, Any], where: str) -> List[Dict[str, Any]]:
    """``segments_info`` with contiguous ``category_id``, ``isthing`` and ``iscrowd`` (copies)."""
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    if not isinstance(segments_info, list):
        raise ValueError(f"{where}: 'segments_info' is not a list")
    segments = []
    for seg in segments_info:
        if not isinstance(seg, dict) or "id" not in seg or "category_id" not in seg:
            raise ValueError(f"{where} has a segment without 'id'/'category_id': {seg!r}")
        cat = seg["category_id"]
        seg = dict(seg)
        if cat in thing_map:
            seg["category_id"], seg["isthing"] = thing_map[cat], True
        elif cat in stuff_map:
            seg["category_id"], seg["isthing"] = stuff_map[cat], False
        else:
            raise ValueError(
                f"{where}, segment id {seg['id']}: category_id {cat!r} is not one of the "
                f"dataset's categories {sorted(stuff_map)} (from "
                f"{meta.get('categories_source') or 'its metadata'})"
            )
        seg.setdefault("iscrowd", 0)
        segments.append(seg)
    return segments


def load_coco_panoptic_json(
    json_file: str,
    image_dir: str,
    gt_dir: str,
    semseg_dir: Optional[str],
    meta: Dict[str, Any],
) -> List[Dict[str, Any]]:
    """Read a COCO-panoptic json into Detectron2 dataset dicts, validating every file it names.

    Returns dicts with ``file_name``, ``image_id``, ``pan_seg_file_name``, ``segments_info``
    (``category_id`` contiguous, ``isthing`` added), ``sem_seg_file_name`` (when ``semseg_dir``)
    and ``height``/``width`` (when the json lists them).

    Raises:
        FileNotFoundError: the json, a folder, an image or a PNG is missing (the path is named).
        ValueError: the json is not valid COCO-panoptic (the file and the image id are named).
    """
    info = read_annotation_json(json_file)
    _require_dir(image_dir, "Image")
    _require_dir(gt_dir, "Panoptic PNG")
    if semseg_dir and not os.path.isdir(semseg_dir):
        make_semantic_pngs(json_file, gt_dir, semseg_dir)

    if not isinstance(info, dict) or not isinstance(info.get("annotations"), list):
        raise ValueError(f"{json_file}: expected a COCO-panoptic json object with an 'annotations' list")

    images = {}
    for img in info.get("images", []) or []:
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            images[img["id"]] = img

    files = _FileIndex()
    ret = []
    for k, ann in enumerate(info["annotations"]):
        where = f"annotation #{k}" + (
            f" (image_id={ann['image_id']!r})" if isinstance(ann, dict) and "image_id" in ann else ""
        )
        if not isinstance(ann, dict):
            raise ValueError(f"{json_file}: {where} is not an object")
        for key in ("image_id", "file_name", "segments_info"):
            if key not in ann:
                raise ValueError(f"{json_file}: {where} has no '{key}' key")
        record = _record(ann, images.get(ann["image_id"]), image_dir, gt_dir, semseg_dir)
        for key in ("file_name", "pan_seg_file_name", "sem_seg_file_name"):
            if key in record and not files.exists(record[key]):
                hint = f"; make them with: {semantic_pngs_command(json_file, gt_dir, semseg_dir)}"
                raise FileNotFoundError(
                    f"{record[key]} not found (listed for {where} in {json_file})"
                    + (hint if key == "sem_seg_file_name" else "")
                )
        record["segments_info"] = _contiguous_segments(ann["segments_info"], meta, f"{json_file}: {where}")
        ret.append(record)
    if not ret:
        raise ValueError(f"{json_file}: 'annotations' is empty")
    return ret


def _id_maps(name: str) -> Dict[str, Any]:
    # read at load time: the builtin names' categories are only known once their json is read
    meta = MetadataCatalog.get(name)
    keys = ("thing_dataset_id_to_contiguous_id", "stuff_dataset_id_to_contiguous_id", "categories_source")
    return {k: meta.get(k, None) for k in keys}


def register_coco_panoptic_dataset(
    name: str,
    metadata: Optional[Dict[str, Any]],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str] = None,
    instances_json: Optional[str] = None,
    *,
    overwrite: bool = False,
) -> None:
    """Register a COCO-panoptic-format folder as ``name`` (Mask2Former's ``_with_sem_seg`` form).

    Args:
        metadata: from :func:`coco_panoptic_metadata` (class names, colours, id maps; a
            ``categories_source`` for messages); None: the categories are already in
            ``MetadataCatalog.get(name)`` (e.g. a :class:`JsonCategoriesMetadata`).
        sem_seg_root: semantic PNGs (contiguous ids, 255 = void) for ``SemSegEvaluator``; optional,
            made from the panoptic PNGs when the folder is missing.
        instances_json: COCO instances json of the things for ``COCOEvaluator`` (AP); optional.
        overwrite: replace an existing registration of ``name`` (tests re-register freely).

    Nothing is read until ``DatasetCatalog.get(name)``.
    """
    if overwrite and name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(
        name,
        lambda: load_coco_panoptic_json(
            panoptic_json, image_root, panoptic_root, sem_seg_root, _id_maps(name)
        ),
    )
    extra: Dict[str, Any] = dict(metadata or {})
    if metadata is not None:
        extra.setdefault(
            "categories_source", f"the categories given to register_coco_panoptic_dataset({name!r})"
        )
    if sem_seg_root:
        extra["sem_seg_root"] = sem_seg_root
    if instances_json:
        extra["json_file"] = instances_json  # COCOEvaluator reads ground truth from json_file
    MetadataCatalog.get(name).set(
        panoptic_root=panoptic_root,
        image_root=image_root,
        panoptic_json=panoptic_json,
        evaluator_type="coco_panoptic_seg",
        ignore_label=IGNORE_LABEL,
        label_divisor=LABEL_DIVISOR,
        **extra,
    )


def register_all_coco_panoptic_with_sem_seg(root: str) -> None:
    """Register ``coco_2017_{train,val}_panoptic_with_sem_seg`` under ``root`` (idempotent), with
    :func:`builtin_coco_categories` read on first use."""
    for name, (
        image_root,
        pan_root,
        pan_json,
        sem_root,
        inst_json,
    ) in _PREDEFINED_SPLITS_COCO_PANOPTIC_WITH_SEM_SEG.items():
        if name in DatasetCatalog.list():
            continue
        pan_json = os.path.join(root, pan_json)
        categories_fn = functools.partial(builtin_coco_categories, root, pan_json)
        MetadataCatalog[name] = JsonCategoriesMetadata(name=name, categories_fn=categories_fn)
        register_coco_panoptic_dataset(
            name,
            None,
            os.path.join(root, image_root),
            os.path.join(root, pan_root),
            pan_json,
            os.path.join(root, sem_root),
            os.path.join(root, inst_json),
        )


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_coco_panoptic_with_sem_seg(_root)
