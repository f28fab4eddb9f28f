"""Write a ReasonSeg split folder (LISA layout): ``NAME.jpg`` + ``NAME.json`` (labelme shapes).

The output is what ``flowseg.data.datasets.reasonseg.load_reasonseg_dataset`` reads.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from .refer import mask_to_polygons, write_image

__all__ = ["write_reasonseg_dataset"]


def _points(polygon: Any) -> List[List[float]]:
    # accept [[x, y], ...] and flat [x0, y0, x1, y1, ...]
    return np.asarray(polygon, dtype=np.float64).reshape(-1, 2).tolist()


def _shape(label: str, polygon: Any) -> Dict[str, Any]:
    return {
        "label": label,
        "points": _points(polygon),
        "group_id": None,
        "shape_type": "polygon",
        "flags": {},
    }


def write_reasonseg_dataset(folder: str, samples: Sequence[Dict[str, Any]]) -> List[Tuple[str, str]]:
    """Write ReasonSeg samples into ``folder``.

    Args:
        samples: ``{"name": str, "image": RGB uint8 HxWx3, "texts": [str], "is_sentence": bool,
            "target_polygons": [polygon] | "target_mask": HxW bool, "ignore_polygons"?: [polygon],
            "ignore_mask"?: HxW bool}``; a polygon is ``[[x, y], ...]`` or flat ``[x0, y0, ...]``.
            Masks are traced to polygons with cv2.findContours.

    Returns:
        ``[(image_path, json_path)]`` in the order of ``samples``.
    """
    os.makedirs(folder, exist_ok=True)
    written = []
    for s in samples:
        name = s["name"]
        image = np.asarray(s["image"])
        h, w = image.shape[:2]
        targets = list(s.get("target_polygons") or [])
        if "target_mask" in s:
            targets += mask_to_polygons(s["target_mask"])
        ignores = list(s.get("ignore_polygons") or [])
        if "ignore_mask" in s:
            ignores += mask_to_polygons(s["ignore_mask"])
        img_path = os.path.join(folder, f"{name}.jpg")
        json_path = os.path.join(folder, f"{name}.json")
        write_image(img_path, image)
        anno = {
            "version": "4.5.6",
            "flags": {},
            "shapes": [_shape("target", p) for p in targets] + [_shape("ignore", p) for p in ignores],
            "imagePath": f"{name}.jpg",
            "imageData": None,
            "imageHeight": int(h),
            "imageWidth": int(w),
            "text": list(s["texts"]),
            "is_sentence": bool(s["is_sentence"]),
        }
        with open(json_path, "w", encoding="utf-8") as f:
            json.dump(anno, f)
        written.append((img_path, json_path))
    return written
