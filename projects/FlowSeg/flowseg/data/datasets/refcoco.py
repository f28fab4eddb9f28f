"""RefCOCO / RefCOCO+ / RefCOCOg in the ``refer`` layout used by LISA and X-SAM.

On disk (``$DETECTRON2_DATASETS``, default ``./datasets``)::

    refer_seg/
      refcoco/instances.json   refcoco/refs(unc).p
      refcoco+/instances.json  refcoco+/refs(unc).p
      refcocog/instances.json  refcocog/refs(umd).p
      images/mscoco/images/train2014/COCO_train2014_XXXXXXXXXXXX.jpg

The loader returns one dataset dict per expression. Two sentence protocols:

* ``refcoco_unc_val`` ...: every sentence of every ref, as written in the refs file (LISA);
* ``refcoco_unc_val_dedup`` ...: X-SAM's — each ref's sentences lower-cased and de-duplicated
  (sorted), so a ref whose annotators wrote the same sentence twice counts it once. X-SAM
  evaluates (one sentence per sample) and trains on these.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from typing import Any, Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog

from .validation import check_phrase_markers, segmentation_problem

logger = logging.getLogger(__name__)

__all__ = [
    "REFER_SPLITS",
    "load_refer_dataset",
    "refer_image_root",
    "refs_file_name",
    "register_refer_dataset",
    "register_all_refer",
]

# (dataset folder, split_by) -> splits, as published with the `refer` toolkit.
REFER_SPLITS: Dict[tuple, tuple] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
}


def refs_file_name(split_by: str) -> str:
    """Name of the refs pickle for a partition scheme, e.g. ``refs(unc).p``."""
    return f"refs({split_by}).p"


def refer_image_root(refer_root: str) -> str:
    """Default image folder of the LISA layout (COCO train2014 images)."""
    return os.path.join(refer_root, "images", "mscoco", "images", "train2014")


def read_json(path: str, what: str, name: str, expected: str) -> Any:
    """The json at ``path``; a missing file or invalid JSON is an error naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: {name} not found: {path} ({expected})")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what}: {path} is not valid JSON: {e}") from e


def _load_instances(path: str) -> Dict[str, Any]:
    data = read_json(path, "refer dataset", "instances file", "expected COCO-style json")
    for key in ("images", "annotations"):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"refer dataset: {path} has no '{key}' list (expected COCO instances json)")
    return data


def _load_refs(path: str) -> List[Dict[str, Any]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"refer dataset: refs file not found: {path} (expected a pickled list of refs)"
        )
    try:
        try:
            with open(path, "rb") as f:
                refs = pickle.load(f)
        except UnicodeDecodeError:
            # The published pickles come from Python 2; a non-ASCII py2 `str` needs an explicit codec.
            with open(path, "rb") as f:
                refs = pickle.load(f, encoding="latin1")
    except Exception as e:  # unpickling a corrupt file can raise nearly anything
        raise ValueError(f"refer dataset: cannot unpickle {path}: {e}") from e
    if not isinstance(refs, list):
        raise ValueError(f"refer dataset: {path} must hold a list of refs, got {type(refs).__name__}")
    return refs


def _sentence_text(sent: Any) -> Optional[str]:
    # `sent` is the lower-cased tokenised text that LISA / X-SAM feed the model; `raw` is the fallback.
    if not isinstance(sent, dict):
        return None
    for key in ("sent", "raw"):
        text = sent.get(key)
        if isinstance(text, str) and text.strip():
            return text.strip()
    return None


def _dedup_sentences(texts: List[tuple]) -> List[tuple]:
    # X-SAM: sorted(set(sent.lower())) per object; the first sent_id of each text is kept.
    first: Dict[str, Any] = {}
    for text, sent_id in texts:
        first.setdefault(text.lower(), sent_id)
    return [(text, first[text]) for text in sorted(first)]


def split_refs(refs: List[Dict[str, Any]], split: str, refs_path: str, what: str) -> List[Dict[str, Any]]:
    """The refs of ``split``; none is an error that lists the splits present."""
    out = [r for r in refs if isinstance(r, dict) and r.get("split") == split]
    if not out:
        present = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
        raise ValueError(f"{what}: split '{split}' has no refs in {refs_path} (splits present: {present})")
    return out


def image_record(
    images: Dict[Any, Dict[str, Any]], image_id: Any, ids: str, inst_path: str, what: str
) -> Dict:
    """The image entry a ref points to; a missing one, or one without file name or size, is an
    error naming ``inst_path`` and the ids."""
    img = images.get(image_id)
    if img is None:
        raise ValueError(f"{what}: image id={image_id} ({ids}) is not in the images of {inst_path}")
    for key in ("file_name", "height", "width"):
        if key not in img:
            raise ValueError(f"{what}: image id={image_id} in {inst_path} has no '{key}'")
    return img


def ref_texts(ref: Dict[str, Any], refs_path: str, what: str) -> List[Tuple[str, Any]]:
    """``(text, sent_id)`` of every sentence of ``ref``. A ref without sentences, a sentence
    without text or with unbalanced ``<p>`` markers is an error naming the file and the ids."""
    ref_id = ref.get("ref_id")
    sentences = ref.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"{what}: ref_id={ref_id} in {refs_path} has no sentences")
    texts = []
    for i, sent in enumerate(sentences):
        text = _sentence_text(sent)
        sent_id = sent.get("sent_id") if isinstance(sent, dict) else None
        if text is None:
            raise ValueError(
                f"{what}: sentence {i} (sent_id={sent_id}) of ref_id={ref_id} in {refs_path} has no text"
            )
        check_phrase_markers(text, f"{what}: sentence sent_id={sent_id} of ref_id={ref_id} in {refs_path}")
        texts.append((text, sent_id))
    return texts


def _ref_record(
    ref: Dict[str, Any],
    anns: Dict[Any, Dict[str, Any]],
    images: Dict[Any, Dict[str, Any]],
    image_root: str,
    split: str,
    inst_path: str,
    refs_path: str,
) -> Tuple[Dict[str, Any], List[Tuple[str, Any]]]:
    """The part of a ref's dataset dicts that its sentences share, and ``(text, sent_id)`` of each
    sentence. A dangling ann_id / image_id, an unusable segmentation or a ref whose image_id
    disagrees with its annotation's is an error naming the file and the ids."""
    ref_id = ref.get("ref_id")
    ann_id = ref.get("ann_id")
    ann = anns.get(ann_id)
    if ann is None:
        raise ValueError(
            f"refer dataset: ref_id={ref_id} in {refs_path} points to ann_id={ann_id}, "
            f"which is not in {inst_path}"
        )
    segm = ann.get("segmentation")
    image_id = ann.get("image_id", ref.get("image_id"))
    if ref.get("image_id") is not None and ref["image_id"] != image_id:
        raise ValueError(
            f"refer dataset: ref_id={ref_id} in {refs_path} has image_id={ref['image_id']} "
            f"but its ann_id={ann_id} in {inst_path} has image_id={image_id}"
        )
    img = image_record(images, image_id, f"ref_id={ref_id}, ann_id={ann_id}", inst_path, "refer dataset")
    # [[]], 2-point or zero-area polygons, empty RLE; polygons outside the image, RLE of another size
    problem = segmentation_problem(segm, int(img["height"]), int(img["width"]))
    if problem:
        raise ValueError(
            f"refer dataset: annotation id={ann_id} in {inst_path} (ref_id={ref_id}) has {problem}"
        )
    texts = ref_texts(ref, refs_path, "refer dataset")
    base = {
        "file_name": os.path.join(image_root, img["file_name"]),
        "height": int(img["height"]),
        "width": int(img["width"]),
        "image_id": image_id,
        "ref_id": ref_id,
        "ann_id": ann_id,
        "task": "referring",
        "segmentation": segm,
        "category_id": ann.get("category_id", ref.get("category_id")),
        "split": split,
    }
    return base, texts


def load_refer_dataset(
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: Optional[str] = None,
    dedup_sentences: bool = False,
) -> List[Dict[str, Any]]:
    """Load one split of a refer-format dataset as one dict per referring expression.

    Args:
        refer_root: folder holding ``{dataset}/instances.json`` and ``{dataset}/refs({split_by}).p``.
        dataset: ``"refcoco"``, ``"refcoco+"``, ``"refcocog"`` or any folder of the same format.
        split_by: partition scheme (``"unc"``, ``"umd"``, ``"google"``).
        split: ``ref["split"]`` value to keep (``"train"``, ``"val"``, ``"testA"`` ...).
        image_root: image folder; defaults to ``refer_root/images/mscoco/images/train2014``.
        dedup_sentences: X-SAM's protocol: each ref's sentences lower-cased, de-duplicated and
            sorted (a kept sentence has the ``sent_id`` of its first occurrence).

    Returns:
        dicts with ``file_name, height, width, image_id, ref_id, ann_id, sent_id, expression,
        task="referring", segmentation, category_id, split``.
    """
    image_root = image_root or refer_image_root(refer_root)
    inst_path = os.path.join(refer_root, dataset, "instances.json")
    refs_path = os.path.join(refer_root, dataset, refs_file_name(split_by))
    data = _load_instances(inst_path)
    refs = _load_refs(refs_path)
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"refer dataset: image folder not found: {image_root}")

    images = {img["id"]: img for img in data["images"] if isinstance(img, dict) and "id" in img}
    anns = {ann["id"]: ann for ann in data["annotations"] if isinstance(ann, dict) and "id" in ann}

    dataset_dicts: List[Dict[str, Any]] = []
    chosen = split_refs(refs, split, refs_path, "refer dataset")
    for ref in chosen:
        base, texts = _ref_record(ref, anns, images, image_root, split, inst_path, refs_path)
        if dedup_sentences:
            texts = _dedup_sentences(texts)
        for text, sent_id in texts:
            dataset_dicts.append({**base, "sent_id": sent_id, "expression": text})

    logger.info(
        "Loaded %d expressions (%d refs) of %s/%s(%s) from %s%s",
        len(dataset_dicts),
        len(chosen),
        dataset,
        split,
        split_by,
        refs_path,
        " (sentences lower-cased and de-duplicated per ref)" if dedup_sentences else "",
    )
    return dataset_dicts


def register_refer_dataset(
    name: str,
    refer_root: str,
    dataset: str,
    split_by: str,
    split: str,
    image_root: Optional[str] = None,
    dedup_sentences: bool = False,
) -> None:
    """Register a refer-format split under ``name``; files are read at ``DatasetCatalog.get`` time."""
    image_root = image_root or refer_image_root(refer_root)
    DatasetCatalog.register(
        name,
        lambda: load_refer_dataset(refer_root, dataset, split_by, split, image_root, dedup_sentences),
    )
    MetadataCatalog.get(name).set(
        evaluator_type="refer",
        refer_root=refer_root,
        refer_dataset=dataset,
        split_by=split_by,
        split=split,
        image_root=image_root,
        dedup_sentences=dedup_sentences,
        thing_classes=["object"],  # one condition per sample: the referred object is class 0
    )


def register_all_refer(root: str) -> List[str]:
    """Register RefCOCO/+/g builtins under ``root/refer_seg``: ``refcoco_unc_val`` ... (every
    sentence) and ``refcoco_unc_val_dedup`` ... (X-SAM's de-duplicated sentences)."""
    refer_root = os.path.join(root, "refer_seg")
    names = []
    for (dataset, split_by), splits in REFER_SPLITS.items():
        for split in splits:
            for suffix, dedup in (("", False), ("_dedup", True)):
                name = f"{dataset}_{split_by}_{split}{suffix}"
                if name not in DatasetCatalog.list():  # re-import (e.g. importlib.reload) must not fail
                    register_refer_dataset(name, refer_root, dataset, split_by, split, dedup_sentences=dedup)
                names.append(name)
    return names


_root = os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))
register_all_refer(_root)
