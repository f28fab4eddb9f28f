"""Ground-truth masks of referring / reasoning dataset dicts, rasterised at the original resolution.

RefCOCO stores COCO segmentations (polygons or RLE), gRefCOCO a list of them (one per target,
possibly none), ReasonSeg LabelMe-style target and ignore polygons painted as LISA paints them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "IGNORE_LABEL",
    "rasterize_segmentation",
    "segmentation_to_rle",
    "reasonseg_masks",
    "gt_masks_from_dict",
]

IGNORE_LABEL = 255


def _clean_polygons(polygons: Sequence[Any]) -> List[List[float]]:
    # Flat [x0, y0, x1, y1, ...] lists; fewer than 3 points has no area, and pycocotools would
    # misread a first polygon of exactly 4 numbers as a box.
    out = []
    for p in polygons:
        flat = np.asarray(p, dtype=np.float64).reshape(-1)
        if flat.size >= 6 and flat.size % 2 == 0:
            out.append(flat.tolist())
    return out


def segmentation_to_rle(segm: Any, height: int, width: int) -> Dict[str, Any]:
    """One compressed RLE (pycocotools) of a COCO segmentation of an image of ``height`` x ``width``:
    polygons (``iscrowd`` 0), compressed or uncompressed RLE (``iscrowd`` 1), or a list of RLEs.

    Several polygons (or RLEs) are merged into one mask; an RLE of another size is an error.
    """
    if isinstance(segm, dict):
        rles = [segm]
    elif isinstance(segm, (list, tuple)) and segm and all(isinstance(s, dict) for s in segm):
        rles = list(segm)
    elif isinstance(segm, (list, tuple)):
        polygons = _clean_polygons(segm)
        if not polygons:  # an all-zero mask: pycocotools cannot merge an empty list
            return mask_util.encode(np.zeros((height, width), dtype=np.uint8, order="F"))
        return mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")

    encoded = []
    for rle in rles:
        size = rle.get("size")
        if size is not None and tuple(size) != (height, width):
            raise ValueError(f"RLE size {list(size)} does not match the image size {[height, width]}")
        counts = rle.get("counts")
        if isinstance(counts, list):  # uncompressed RLE: pycocotools compresses it
            encoded.append(mask_util.frPyObjects(rle, height, width))
        else:
            encoded.append(
                {
                    "size": [height, width],
                    "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
                }
            )
    return mask_util.merge(encoded) if len(encoded) > 1 else encoded[0]


def rasterize_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygon list, compressed or uncompressed RLE) -> HxW uint8 {0, 1} mask
    (:func:`segmentation_to_rle`, decoded)."""
    return mask_util.decode(segmentation_to_rle(segm, height, width))


def reasonseg_masks(
    target_polygons: Sequence[Any], ignore_polygons: Sequence[Any], height: int, width: int
) -> Tuple[np.ndarray, np.ndarray]:
    """ReasonSeg ground truth as LISA builds it: (target uint8 {0,1}, ignore bool), both HxW.

    LISA paints every shape in order of decreasing area (so a smaller shape wins where shapes
    overlap): targets paint 1, ignore shapes paint 255. All targets end up in one mask.
    """
    shapes = [(p, 1) for p in _clean_polygons(target_polygons)]
    shapes += [(p, IGNORE_LABEL) for p in _clean_polygons(ignore_polygons)]
    label = np.zeros((height, width), dtype=np.uint8)
    if shapes:
        masks = mask_util.decode(mask_util.frPyObjects([p for p, _ in shapes], height, width))  # HxWxN
        areas = masks.reshape(-1, masks.shape[-1]).sum(0)
        # stable sort, so shapes of equal area keep a deterministic (file) order
        for i in sorted(range(len(shapes)), key=lambda k: -int(areas[k])):
            label[masks[:, :, i] > 0] = shapes[i][1]
    return (label == 1).astype(np.uint8), label == IGNORE_LABEL


def gt_masks_from_dict(dataset_dict: Dict[str, Any]) -> Tuple[np.ndarray, np.ndarray]:
    """(target uint8 {0,1}, ignore bool) at the original resolution of a referring/reasoning dict."""
    h, w = int(dataset_dict["height"]), int(dataset_dict["width"])
    if "target_polygons" in dataset_dict:
        return reasonseg_masks(dataset_dict["target_polygons"], dataset_dict.get("ignore_polygons", []), h, w)
    if "segmentation" in dataset_dict:
        return rasterize_segmentation(dataset_dict["segmentation"], h, w), np.zeros((h, w), dtype=bool)
    if "segmentations" in dataset_dict:  # gRefCOCO: the union of every target (none: empty)
        union = np.zeros((h, w), dtype=np.uint8)
        for segm in dataset_dict["segmentations"]:
            union |= rasterize_segmentation(segm, h, w)
        return union, np.zeros((h, w), dtype=bool)
    raise KeyError(
        f"{dataset_dict.get('file_name')}: dataset dict has none of 'segmentation', "
        "'segmentations', 'target_polygons'"
    )
