#!/usr/bin/env python
"""Write the variant synthetic scenes in the builtin RefCOCO and COCO-panoptic layouts.

The scenes use :data:`flowseg.data.synthetic.vocabulary.VARIANT_VOCABULARY`: shapes, colours,
sizes, superlatives, relations and object noun that the built-in benchmark never uses. With
``DETECTRON2_DATASETS=ROOT`` the project's builtin names read them as a user's download::

    ROOT/refer_seg/refcoco/instances.json, refs(unc).p   refcoco_unc_{train,val,testA,testB}
    ROOT/refer_seg/images/mscoco/images/train2014/*.jpg  (the builtin image folder)
    ROOT/coco/{train,val}2017, panoptic_{train,val}2017, coco_2017_{train,val}_panoptic_with_sem_seg
    panoptic_semseg_{train,val}2017, annotations/
    ROOT/coco/annotations/panoptic_categories.json       the variant's categories for those names

Splits: refer train = panoptic train (``--num-train`` scenes); refer val = panoptic val and refer
testA / testB (``--num-eval`` scenes each) come from their own random streams. Referring masks are
RLE (pixel-exact under occlusion); categories are the variant's "colour shape" pairs plus a
background stuff. ``ROOT/variant_manifest.json`` records the parameters and counts.

    python tools/make_variant_data.py --root datasets/variant [--num-train 2000 --num-eval 200 --seed 0]
"""

import argparse
import json
import os
import sys
from typing import Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))

# refcoco split -> random stream of its scenes (the built-in benchmark uses 0-2 for train/val/test)
REFER_STREAMS = {"train": 10, "val": 11, "testA": 12, "testB": 13}
PANOPTIC_SPLITS = {"train": "train", "val": "val"}  # COCO split -> refcoco split of its scenes


def write_variant_data(
    root: str, num_train: int = 2000, num_eval: int = 200, seed: int = 0, image_size: int = 128
) -> Dict:
    """Generate and write everything under ``root``; returns the manifest (parameters, counts)."""
    from flowseg.data.datasets.coco_panoptic import BUILTIN_CATEGORIES_FILE
    from flowseg.data.datasets.refcoco import refer_image_root
    from flowseg.data.synthetic.generate import (
        generate_split,
        panoptic_categories,
        panoptic_segments,
        refer_records,
    )
    from flowseg.data.synthetic.vocabulary import VARIANT_VOCABULARY
    from flowseg.data.writers import write_coco_panoptic_dataset, write_refer_dataset

    if num_train < 1 or num_eval < 1:
        raise ValueError(f"--num-train ({num_train}) and --num-eval ({num_eval}) must be at least 1")
    vocab = VARIANT_VOCABULARY
    categories = panoptic_categories(vocab)
    sizes = {s: num_train if s == "train" else num_eval for s in REFER_STREAMS}
    scenes = {
        s: generate_split("train", n, seed, image_size, vocabulary=vocab, stream=REFER_STREAMS[s])
        for s, n in sizes.items()
    }
    refer_root = os.path.join(root, "refer_seg")
    images, annotations, refs = refer_records(scenes, categories, prefix="variant")
    write_refer_dataset(
        refer_root,
        "refcoco",
        "unc",
        images,
        annotations,
        refs,
        categories=categories[:-1],
        image_root=refer_image_root(refer_root),
    )
    coco_root = os.path.join(root, "coco")
    for coco_split, refer_split in PANOPTIC_SPLITS.items():
        split_scenes = scenes[refer_split]
        segments = [panoptic_segments(sc, categories) for sc in split_scenes]
        write_coco_panoptic_dataset(
            coco_root, [sc.image for sc in split_scenes], segments, categories, split=coco_split
        )
    # the builtin COCO names read their categories from here instead of COCO's 133
    with open(os.path.join(root, BUILTIN_CATEGORIES_FILE), "w") as f:
        json.dump({"categories": [dict(c, color=list(c["color"])) for c in categories]}, f, indent=1)
    manifest = {
        "vocabulary": vocab.name,
        "params": {"num_train": num_train, "num_eval": num_eval, "seed": seed, "image_size": image_size},
        "counts": {s: _counts(v) for s, v in scenes.items()},
        "categories": len(categories),
    }
    with open(os.path.join(root, "variant_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def _counts(scenes: List) -> Dict[str, int]:
    exprs = [e for sc in scenes for e in sc.expressions]
    out = {"images": len(scenes), "objects": sum(len(sc.objects) for sc in scenes), "expressions": len(exprs)}
    out.update({k: sum(1 for e in exprs if e.kind == k) for k in ("attribute", "superlative", "relation")})
    out["refs"] = sum(len({e.target for e in sc.expressions}) for sc in scenes)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root ($DETECTRON2_DATASETS of the runs that read it)")
    p.add_argument("--num-train", type=int, default=2000, help="training scenes (refer + panoptic)")
    p.add_argument("--num-eval", type=int, default=200, help="scenes of each of val / testA / testB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=128)
    args = p.parse_args()
    manifest = write_variant_data(args.root, args.num_train, args.num_eval, args.seed, args.image_size)
    print(json.dumps(manifest["counts"]))
    print(
        f"written under {args.root}; read it with DETECTRON2_DATASETS={args.root} "
        "(refcoco_unc_*, coco_2017_*_panoptic_with_sem_seg)"
    )


if __name__ == "__main__":
    main()
