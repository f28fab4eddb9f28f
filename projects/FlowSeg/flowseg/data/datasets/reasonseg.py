"""ReasonSeg (LISA) in its published layout.

On disk (``$DETECTRON2_DATASETS``, default ``./datasets``)::

    reason_seg/ReasonSeg/{train,val,test}/NAME.jpg
    reason_seg/ReasonSeg/{train,val,test}/NAME.json   # labelme: text, is_sentence, shapes

Each json holds ``text`` (a list of queries for the image), ``is_sentence`` (long query) and
labelme ``shapes``. Following LISA, a shape labelled ``"flag"`` is skipped, one whose label
contains ``"ignore"`` marks pixels left out of evaluation, and every other label is target.
LISA evaluates the first query of each image; ``all_queries=True`` gives one sample per query.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from .validation import check_phrase_markers, outside_image_problem, read_text_file

logger = logging.getLogger(__name__)

__all__ = [
    "REASONSEG_SPLITS",
    "IMAGE_EXTENSIONS",
    "load_reasonseg_dataset",
    "parse_reasonseg_json",
    "register_reasonseg_dataset",
    "register_all_reasonseg",
]

REASONSEG_SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
_EXIF_ORIENTATION = 0x0112


def _image_size(path: str) -> Tuple[int, int]:
    """(height, width) as `detectron2.data.detection_utils.read_image` will return the image.

    Only the header is read. EXIF orientations 5-8 rotate by 90 degrees, and read_image applies them.
    """
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            except Exception:  # broken EXIF blocks are ignored by read_image too
                orientation = 1
    except OSError as e:
        raise ValueError(f"ReasonSeg: cannot read image {path}: {e}") from e
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def _read_json(path: str) -> Any:
    # UTF-8 (BOM allowed), else cp1252 with a warning: some published ReasonSeg files are cp1252
    text = read_text_file(path, "ReasonSeg")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"ReasonSeg: {path} is not valid JSON: {e}") from e


def _shape_polygon(shape: Dict[str, Any], path: str, index: int) -> List[float]:
    points = shape.get("points")
    label = shape.get("label")
    try:
        if shape.get("shape_type") == "rectangle" and len(points) == 2:
            # labelme stores rectangles by two corners
            (x0, y0), (x1, y1) = points
            points = [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]
        flat = [float(v) for p in points for v in p]
        ok = all(len(p) == 2 for p in points)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"ReasonSeg: shape {index} (label '{label}') in {path} has malformed points "
            "(expected [[x, y], ...])"
        )
    if len(points) < 3:
        raise ValueError(
            f"ReasonSeg: shape {index} (label '{label}') in {path} has {len(points)} points; "
            "a polygon needs at least 3"
        )
    return flat


def parse_reasonseg_json(path: str) -> Dict[str, Any]:
    """Read and validate one ReasonSeg json.

    Returns:
        ``{"texts": [str], "is_sentence": bool, "target_polygons": [[x0, y0, x1, y1, ...]],
        "ignore_polygons": [...]}`` with polygons flattened like COCO polygons.
    """
    anno = _read_json(path)
    if not isinstance(anno, dict):
        raise ValueError(f"ReasonSeg: {path} must hold a json object")
    if "text" not in anno:
        raise ValueError(f"ReasonSeg: {path} has no 'text' (expected a list of queries)")
    texts = anno["text"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise ValueError(f"ReasonSeg: {path} has an empty 'text' list (expected at least one query)")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"ReasonSeg: query {i} in {path} is not a non-empty string")
        check_phrase_markers(t, f"ReasonSeg: query {i} in {path}")
    is_sentence = anno.get("is_sentence")
    if not isinstance(is_sentence, bool):
        raise ValueError(f"ReasonSeg: {path} has no boolean 'is_sentence' (got {is_sentence!r})")
    shapes = anno.get("shapes")
    if not isinstance(shapes, list):
        raise ValueError(f"ReasonSeg: {path} has no 'shapes' list (expected labelme polygons)")

    target, ignore = [], []
    for i, shape in enumerate(shapes):
        if not isinstance(shape, dict):
            raise ValueError(f"ReasonSeg: shape {i} in {path} is not an object")
        label = str(shape.get("label", ""))
        if label.lower() == "flag":  # deprecated, meaningless annotations (LISA skips them)
            continue
        poly = _shape_polygon(shape, path, i)
        (ignore if "ignore" in label.lower() else target).append(poly)
    if not target:
        raise ValueError(f"ReasonSeg: {path} has no target polygon")
    return {
        "texts": [t.strip() for t in texts],
        "is_sentence": is_sentence,
        "target_polygons": target,
        "ignore_polygons": ignore,
    }


def load_reasonseg_dataset(folder: str, all_queries: bool = False) -> List[Dict[str, Any]]:
    """Load one ReasonSeg split folder (``NAME.jpg`` + ``NAME.json`` pairs).

    Args:
        folder: e.g. ``datasets/reason_seg/ReasonSeg/val``.
        all_queries: one sample per query instead of LISA's first query per image.

    Returns:
        dicts with ``file_name, height, width, image_id (NAME), expression, is_sentence,
        task="reasoning", target_polygons, ignore_polygons, query_index``.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ReasonSeg: folder not found: {folder}")
    images: Dict[str, str] = {}
    jsons: Dict[str, str] = {}
    for fname in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(fname)
        path = os.path.join(folder, fname)
        if ext.lower() in IMAGE_EXTENSIONS:
            if stem in images:
                raise ValueError(f"ReasonSeg: two images named '{stem}' in {folder}: {images[stem]}, {path}")
            images[stem] = path
        elif ext.lower() == ".json":
            jsons[stem] = path
    for stem, path in jsons.items():
        if stem not in images:
            raise ValueError(f"ReasonSeg: {path} has no image ({stem}.jpg expected in {folder})")
    for stem, path in images.items():
        if stem not in jsons:
            raise ValueError(
                f"ReasonSeg: image {path} has no annotation ({os.path.join(folder, stem + '.json')} expected)"
            )
    if not images:
        raise ValueError(f"ReasonSeg: no NAME.jpg + NAME.json pairs in {folder}")

    dataset_dicts: List[Dict[str, Any]] = []
    for stem in sorted(images):
        anno = parse_reasonseg_json(jsons[stem])
        height, width = _image_size(images[stem])
        problem = outside_image_problem(anno["target_polygons"], height, width)
        if problem:
            raise ValueError(f"ReasonSeg: the target of {jsons[stem]} (image {images[stem]}) is {problem}")
        texts = anno["texts"] if all_queries else anno["texts"][:1]
        for q, text in enumerate(texts):
            dataset_dicts.append(
                {
                    "file_name": images[stem],
                    "height": height,
                    "width": width,
                    "image_id": stem,
                    "expression": text,
                    "is_sentence": anno["is_sentence"],
                    "task": "reasoning",
                    "target_polygons": anno["target_polygons"],
                    "ignore_polygons": anno["ignore_polygons"],
                    "query_index": q,
                }
            )
    logger.info("Loaded %d ReasonSeg samples (%d images) from %s", len(dataset_dicts), len(images), folder)
    return dataset_dicts


def register_reasonseg_dataset(name: str, folder: str, all_queries: bool = False) -> None:
    """Register a ReasonSeg split folder under ``name``; files are read at ``DatasetCatalog.get`` time."""
    DatasetCatalog.register(name, lambda: load_reasonseg_dataset(folder, all_queries))
    MetadataCatalog.get(name).set(
        evaluator_type="reason_seg",
        folder=folder,
        all_queries=all_queries,
        thing_classes=["object"],
    )


def register_all_reasonseg(root: str) -> List[str]:
    """Register ``reasonseg_{train,val,test}`` and ``reasonseg_{split}_all`` under ``root/reason_seg``."""
    names = []
    for split in REASONSEG_SPLITS:
        folder = os.path.join(root, "reason_seg", "ReasonSeg", split)
        for name, all_queries in ((f"reasonseg_{split}", False), (f"reasonseg_{split}_all", True)):
            if name not in DatasetCatalog.list():
                register_reasonseg_dataset(name, folder, all_queries)
            names.append(name)
    return names


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_reasonseg(_root)
