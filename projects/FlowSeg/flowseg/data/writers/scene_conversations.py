"""LLaVA-format conversations about the scenes of a referring data set (stage 2 in miniature).

A pretrained LLM arrives at stage 3 knowing what its words mean and, after the paper's stage 2,
how the image tokens relate to them. A language model trained from scratch knows neither. This
module writes the text a small model can learn both from, using only what a RefCOCO-style folder
holds (the referred objects' masks, categories and expressions), so any such folder works:

* a caption per image listing every referred object, left to right: ``"a small red circle at the
  top left, a large blue star in the centre"``;
* one question per expression: ``"Where is the leftmost star?"`` -> ``"a small red star at the
  top left"``: the answer names the object's category, size and place, so the model must find
  the object the expression denotes in the image tokens to produce it.

Size is ``small`` below :data:`SMALL_AREA_FRACTION` of the image, else ``large``; the place is the
cell of a 3x3 grid holding the centre of its box. Each sample is one human/gpt pair (the
conversation mapper's default keeps one pair).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from typing import Any, Dict, List, Sequence, Tuple

from pycocotools import mask as mask_utils

from ..dataset_mappers.referring_masks import segmentation_to_rle

__all__ = [
    "SMALL_AREA_FRACTION",
    "describe_object",
    "place_phrase",
    "scene_conversations",
    "write_scene_conversations",
]

#: Objects covering less than this fraction of the image are called "small".
SMALL_AREA_FRACTION = 0.03
_ROWS = ("top", "middle", "bottom")
_COLS = ("left", "centre", "right")


def place_phrase(cx: float, cy: float) -> str:
    """Where a point in [0, 1]² lies on a 3x3 grid: ``"at the top left"``, ``"in the centre"``."""
    row, col = _ROWS[min(int(cy * 3), 2)], _COLS[min(int(cx * 3), 2)]
    if row == "middle":
        return "in the centre" if col == "centre" else f"on the {col}"
    return f"at the {row}" if col == "centre" else f"at the {row} {col}"


def describe_object(category: str, segm: Any, height: int, width: int) -> Tuple[float, str]:
    """(x of the box centre in [0, 1], ``"a small red circle at the top left"``) of an object's
    COCO segmentation (polygons, compressed or uncompressed RLE) in a ``height`` x ``width`` image."""
    rle = segmentation_to_rle(segm, height, width)
    area = float(mask_utils.area(rle))
    if area <= 0:
        raise ValueError(f"cannot describe an object of category {category!r} with an empty mask")
    x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
    cx, cy = (x + w / 2) / width, (y + h / 2) / height
    size = "small" if area < SMALL_AREA_FRACTION * height * width else "large"
    return cx, f"a {size} {category} {place_phrase(cx, cy)}"


def scene_conversations(
    dataset_dicts: Sequence[Dict], category_names: Dict[int, str], image_root: str
) -> List[Dict]:
    """LLaVA samples (``id``, ``image`` relative to ``image_root``, ``conversations``).

    ``dataset_dicts`` are a referring data set's records (one per expression, with
    ``file_name``, ``height``, ``width``, ``ann_id``, ``category_id``, ``segmentation`` (polygons
    or RLE), ``expression``), as the refer loader returns them; ``category_names`` maps category ids to names.
    """
    by_image: Dict[str, Dict[int, Dict]] = defaultdict(dict)
    for d in dataset_dicts:
        obj = by_image[d["file_name"]].setdefault(d["ann_id"], {"record": d, "expressions": []})
        obj["expressions"].append(d["expression"])
    samples: List[Dict] = []
    for file_name in sorted(by_image):
        image = os.path.relpath(file_name, image_root)
        described = []
        for obj in by_image[file_name].values():
            rec = obj["record"]
            if rec["category_id"] not in category_names:
                raise ValueError(
                    f"{file_name}: ann_id {rec['ann_id']} has category {rec['category_id']}, "
                    "which the data set's instances.json does not list"
                )
            name = category_names[rec["category_id"]]
            cx, text = describe_object(name, rec["segmentation"], rec["height"], rec["width"])
            described.append((cx, text, obj["expressions"]))
        described.sort(key=lambda t: t[0])
        caption = ", ".join(text for _, text, _ in described)
        turns = [("Describe the image.", caption)]
        turns += [(f"Where is {e}?", text) for _, text, exprs in described for e in exprs]
        for question, answer in turns:
            samples.append(
                {
                    "id": f"{len(samples):08d}",
                    "image": image,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{question}"},
                        {"from": "gpt", "value": answer},
                    ],
                }
            )
    return samples


def write_scene_conversations(dataset_name: str, root: str) -> str:
    """Write :func:`scene_conversations` of the registered referring data set ``dataset_name``
    to ``root/scene_conversations/{dataset_name}.json`` and register it as
    ``{dataset_name}_conversations`` (as importing ``flowseg`` does for files already there).

    The category names come from the folder's ``instances.json``; images stay where they are
    (the json's ``image`` paths are relative to ``root``). Returns the json's path.
    """
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from ..datasets.conversation import SCENE_CONVERSATIONS_DIR, register_llava_dataset

    meta = MetadataCatalog.get(dataset_name)
    instances = os.path.join(meta.refer_root, meta.refer_dataset, "instances.json")
    with open(instances, encoding="utf-8") as f:
        names = {int(c["id"]): str(c["name"]) for c in json.load(f).get("categories", [])}
    samples = scene_conversations(DatasetCatalog.get(dataset_name), names, root)
    json_file = os.path.join(root, SCENE_CONVERSATIONS_DIR, f"{dataset_name}.json")
    os.makedirs(os.path.dirname(json_file), exist_ok=True)
    with open(json_file, "w", encoding="utf-8") as f:
        json.dump(samples, f)
    register_llava_dataset(f"{dataset_name}_conversations", json_file, root, overwrite=True)
    return json_file
