#!/usr/bin/env python
"""Make Mask2Former's semantic PNGs (``panoptic_semseg_{train,val}2017``) from COCO-panoptic.

Each pixel gets the contiguous id of its segment's category (things first, then stuff, in the
order of the panoptic json's categories; for COCO this is Detectron2's ``COCO_CATEGORIES`` order,
ids 0..132), 255 where the panoptic PNG is void. Crowd segments keep their class.

    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py            # $DETECTRON2_DATASETS/coco
    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py --root /data/coco --splits val
    # any COCO-panoptic folder:
    python datasets/prepare_coco_semantic_annos_from_panoptic_annos.py \
        --panoptic-json X/annotations/panoptic_train2017.json --panoptic-root X/panoptic_train2017 \
        --output-dir X/panoptic_semseg_train2017
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import time
from multiprocessing import Pool
from typing import Any, Dict, List, Sequence

import numpy as np
from PIL import Image

if importlib.util.find_spec("flowseg") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects", "FlowSeg"))

from flowseg.data.datasets.coco_panoptic import (  # noqa: E402
    contiguous_id_map,
    panoptic_to_semantic,
    read_annotation_json,
)
from panopticapi.utils import rgb2id  # noqa: E402


def _convert_one(item: Dict[str, Any], panoptic_root: str, output_dir: str, id_map: Dict[int, int]) -> None:
    src = os.path.join(panoptic_root, item["file_name"])
    if not os.path.isfile(src):
        raise FileNotFoundError(f"{src} not found (listed for image_id={item.get('image_id')!r})")
    pan = rgb2id(np.asarray(Image.open(src).convert("RGB"), dtype=np.uint32))
    sem = panoptic_to_semantic(pan, item["segments_info"], id_map)
    Image.fromarray(sem).save(os.path.join(output_dir, item["file_name"]))


def convert(panoptic_json: str, panoptic_root: str, output_dir: str, workers: int = 4) -> int:
    """Write one semantic PNG per annotation of ``panoptic_json``; returns how many."""
    info = read_annotation_json(panoptic_json)
    if not isinstance(info, dict) or "annotations" not in info or "categories" not in info:
        raise ValueError(f"{panoptic_json}: expected a COCO-panoptic json with 'annotations', 'categories'")
    if not os.path.isdir(panoptic_root):
        raise FileNotFoundError(f"Panoptic PNG folder not found: {panoptic_root}")
    id_map = contiguous_id_map(info["categories"])
    known = set(id_map)
    for ann in info["annotations"]:
        for seg in ann.get("segments_info", []):
            if seg["category_id"] not in known:
                raise ValueError(
                    f"{panoptic_json}: image_id={ann.get('image_id')!r}, segment {seg.get('id')}: "
                    f"category_id {seg['category_id']} is not in 'categories'"
                )
    os.makedirs(output_dir, exist_ok=True)
    fn = functools.partial(_convert_one, panoptic_root=panoptic_root, output_dir=output_dir, id_map=id_map)
    anns: List[Dict[str, Any]] = info["annotations"]
    if workers <= 1 or len(anns) < 64:
        for ann in anns:
            fn(ann)
    else:
        with Pool(processes=workers) as pool:
            pool.map(fn, anns, chunksize=100)
    return len(anns)


def main(argv: Sequence[str] = ()) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_root = os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "coco")
    parser.add_argument("--root", default=default_root, help="COCO folder ($DETECTRON2_DATASETS/coco)")
    parser.add_argument("--splits", nargs="+", default=["train", "val"])
    parser.add_argument("--panoptic-json", help="convert this json instead of the --root splits")
    parser.add_argument("--panoptic-root")
    parser.add_argument("--output-dir")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(list(argv) or None)

    if args.panoptic_json:
        if not (args.panoptic_root and args.output_dir):
            parser.error("--panoptic-json needs --panoptic-root and --output-dir")
        jobs = [(args.panoptic_json, args.panoptic_root, args.output_dir)]
    else:
        jobs = [
            (
                os.path.join(args.root, "annotations", f"panoptic_{s}2017.json"),
                os.path.join(args.root, f"panoptic_{s}2017"),
                os.path.join(args.root, f"panoptic_semseg_{s}2017"),
            )
            for s in args.splits
        ]
    for pan_json, pan_root, out in jobs:
        start = time.time()
        n = convert(pan_json, pan_root, out, workers=args.workers)
        print(f"{out}: {n} semantic PNGs in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
