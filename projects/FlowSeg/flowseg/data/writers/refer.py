"""Write a dataset in the ``refer`` layout (RefCOCO/+/g as LISA / X-SAM read it).

Used by the tests and by synthetic-data generators; the output is what
``flowseg.data.datasets.refcoco.load_refer_dataset`` reads::

    root/{dataset_name}/instances.json
    root/{dataset_name}/refs({split_by}).p
    root/images/mscoco/images/train2014/*.jpg
"""

from __future__ import annotations

import json
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np
import pycocotools.mask as mask_util

from ..dataset_mappers.referring_masks import segmentation_to_rle

__all__ = ["mask_to_polygons", "mask_to_rle", "write_image", "write_refer_dataset"]


def mask_to_polygons(mask: np.ndarray) -> List[List[float]]:
    """Outer contours of a binary mask as COCO polygons ``[[x0, y0, x1, y1, ...], ...]``.

    COCO polygons put pixel (x, y) on the square [x, x+1) x [y, y+1), whereas OpenCV traces
    pixel indices (centres), which would shave half a pixel off every border. Tracing at 2x and
    mapping back with (k + 0.5) / 2 puts the outline a quarter pixel inside the true border, so
    pycocotools re-rasterises the same pixels. Holes cannot be expressed (COCO merges polygons
    by union); use RLE for masks with holes.
    """
    mask = np.asarray(mask).astype(bool)
    up = np.repeat(np.repeat(mask, 2, axis=0), 2, axis=1).astype(np.uint8)
    contours, _ = cv2.findContours(up, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for c in contours:
        pts = (c.reshape(-1, 2).astype(np.float64) + 0.5) / 2.0
        if len(pts) >= 3:
            polygons.append([round(float(v), 3) for v in pts.reshape(-1)])
    return polygons


def mask_to_rle(mask: np.ndarray, compressed: bool = True) -> Dict[str, Any]:
    """COCO RLE of a binary mask: compressed (``counts`` str) or uncompressed (``counts`` list)."""
    mask = np.asarray(mask).astype(bool)
    h, w = mask.shape
    if compressed:
        rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [h, w], "counts": rle["counts"].decode("ascii")}
    # Uncompressed RLE: run lengths over the column-major pixel order, starting with a 0-run.
    flat = mask.reshape(-1, order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"size": [h, w], "counts": [int(c) for c in counts]}


def write_image(path: str, image: np.ndarray) -> None:
    """Write an RGB uint8 HxWx3 image (JPEG quality 95 for .jpg)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: expected an RGB uint8 HxWx3 image, got {image.dtype} {image.shape}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if path.lower().endswith((".jpg", ".jpeg")) else []
    if not cv2.imwrite(path, np.ascontiguousarray(image[:, :, ::-1]), params):
        raise OSError(f"could not write image {path}")


def _segmentation(ann: Dict[str, Any], h: int, w: int, index: int) -> Any:
    if "polygons" in ann:
        return [np.asarray(p, dtype=np.float64).reshape(-1).tolist() for p in ann["polygons"]]
    if "mask" not in ann:
        raise ValueError(f"annotation {index}: needs 'mask' or 'polygons'")
    mask = np.asarray(ann["mask"]).astype(bool)
    if mask.shape != (h, w):
        raise ValueError(f"annotation {index}: mask shape {mask.shape} != image shape {(h, w)}")
    fmt = ann.get("format", "polygon")
    if fmt == "polygon":
        return mask_to_polygons(mask)
    if fmt == "rle":
        return mask_to_rle(mask, compressed=True)
    if fmt == "rle_uncompressed":
        return mask_to_rle(mask, compressed=False)
    raise ValueError(f"annotation {index}: unknown format {fmt!r} (polygon, rle, rle_uncompressed)")


def coco_images_written(images: Sequence[Dict[str, Any]], image_root: str) -> List[Dict[str, Any]]:
    """Write ``images`` (``{"image", "file_name"?, "id"?}``) to ``image_root``; their COCO entries."""
    coco_images = []
    for i, img in enumerate(images):
        image_id = int(img.get("id", i + 1))
        file_name = img.get("file_name") or f"COCO_train2014_{image_id:012d}.jpg"
        array = np.asarray(img["image"])
        write_image(os.path.join(image_root, file_name), array)
        coco_images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "height": int(array.shape[0]),
                "width": int(array.shape[1]),
            }
        )
    return coco_images


def coco_annotations(
    annotations: Sequence[Dict[str, Any]],
    coco_images: Sequence[Dict[str, Any]],
    categories: Sequence[Dict[str, Any]],
) -> List[Dict[str, Any]]:
    """COCO instance entries of ``annotations`` (see :func:`write_refer_dataset`)."""
    coco_anns = []
    for j, ann in enumerate(annotations):
        img = coco_images[ann["image_index"]]
        h, w = img["height"], img["width"]
        segm = _segmentation(ann, h, w, j)
        # area / bbox from the stored segmentation, so they agree with what readers rasterise
        rle = segmentation_to_rle(segm, h, w)
        coco_anns.append(
            {
                "id": int(ann.get("id", j + 1)),
                "image_id": img["id"],
                "category_id": int(ann.get("category_id", categories[0]["id"])),
                "segmentation": segm,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    return coco_anns


def write_refer_dataset(
    root: str,
    dataset_name: str,
    split_by: str,
    images: Sequence[Dict[str, Any]],
    annotations: Sequence[Dict[str, Any]],
    refs: Sequence[Dict[str, Any]],
    categories: Optional[Sequence[Dict[str, Any]]] = None,
    image_root: Optional[str] = None,
) -> Dict[str, str]:
    """Write a refer-format dataset.

    Args:
        root: the ``refer_seg`` folder.
        dataset_name: sub-folder (``"refcoco"``, ``"refcocog"`` or any name).
        split_by: partition name; the refs go to ``refs({split_by}).p``.
        images: ``{"image": RGB uint8 HxWx3, "file_name"?: str, "id"?: int}``; ids default to
            index + 1, file names to ``COCO_train2014_{id:012d}.jpg``.
        annotations: ``{"image_index": int, "mask": HxW bool | "polygons": [[x0, y0, ...]],
            "category_id"?: int, "format"?: "polygon" | "rle" | "rle_uncompressed", "id"?: int}``;
            masks are stored as polygons (cv2.findContours) unless a RLE format is asked for.
        refs: ``{"ann_index": int, "split": str, "sentences": [str], "ref_id"?: int}``.
        categories: COCO categories; default one ``{"id": 1, "name": "object"}``.
        image_root: image folder; default ``root/images/mscoco/images/train2014``.

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

    refer_refs = []
    sent_id = 0
    for k, ref in enumerate(refs):
        ann = coco_anns[ref["ann_index"]]
        img = next(im for im in coco_images if im["id"] == ann["image_id"])
        sentences = []
        for text in ref["sentences"]:
            sentences.append({"tokens": text.split(), "raw": text, "sent_id": sent_id, "sent": text})
            sent_id += 1
        stem = os.path.splitext(img["file_name"])[0]
        refer_refs.append(
            {
                "ref_id": int(ref.get("ref_id", k)),
                "ann_id": ann["id"],
                "image_id": ann["image_id"],
                "split": ref["split"],
                "sentences": sentences,
                "sent_ids": [s["sent_id"] for s in sentences],
                "category_id": ann["category_id"],
                # like the published refs: the image name with the annotation id appended
                "file_name": f"{stem}_{ann['id']}.jpg",
            }
        )

    inst_path = os.path.join(ds_dir, "instances.json")
    with open(inst_path, "w", encoding="utf-8") as f:
        json.dump({"images": coco_images, "annotations": coco_anns, "categories": categories}, f)
    refs_path = os.path.join(ds_dir, f"refs({split_by}).p")
    with open(refs_path, "wb") as f:
        pickle.dump(refer_refs, f, protocol=2)  # the protocol of the published pickles
    return {"refer_root": root, "instances": inst_path, "refs": refs_path, "image_root": image_root}
