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
import importlib.util
import os
import sys
import time
from typing import Sequence

if importlib.util.find_spec("flowseg") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects", "FlowSeg"))

from flowseg.data.writers.coco_panoptic import write_semantic_pngs  # noqa: E402


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
        n = write_semantic_pngs(pan_json, pan_root, out, workers=args.workers)
        print(f"{out}: {n} semantic PNGs in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main(sys.argv[1:])
