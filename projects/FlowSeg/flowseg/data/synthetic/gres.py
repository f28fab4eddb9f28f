"""Synthetic expressions with several targets or none, written in the gRefCOCO layout.

The scenes are those of the synthetic referring benchmark (same seed, same splits, same images);
each gets, besides two of its single-target expressions,

* multi-target expressions: an attribute description that fits two or more objects, said with
  their number or with "all" ("the two red circles", "all stars", "all small purple shapes");
* no-target expressions: a colour + shape pair that no object has, preferably one whose colour
  and shape both occur in the scene on other objects ("the purple hexagon" beside a purple
  star and a red hexagon), so that neither word alone tells that nothing is meant.

Written to ``refer_seg/synthgref/{instances.json, grefs(synth).json}`` (images in
``refer_seg/images/synthgref``) with its own manifest and version, so the other synthetic files
are left as they are. Registered as ``synthgref_{train,val,test}``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..datasets.grefcoco import register_grefcoco_dataset
from ..writers.grefer import write_grefcoco_dataset
from .generate import SPLITS, THING_CATEGORIES, category_id, default_root, generate_split
from .scenes import COLOURS, SHAPES, Scene, _attr_subsets, resolve

logger = logging.getLogger(__name__)

__all__ = [
    "GroupExpression",
    "generate_synthgref_datasets",
    "gres_expressions",
    "register_synthgref_datasets",
    "render_group",
]

GRES_GENERATOR_VERSION = 1  # bump when the written GRES data change
GREF_DATASET, GREF_SPLIT_BY = "synthgref", "synth"
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}


@dataclass
class GroupExpression:
    text: str
    targets: List[int]  # object indices; [] = no target
    kind: str  # "single" | "multi" | "no_target"
    program: Dict


def render_group(attrs: Dict[str, Optional[str]], count: int, with_count: bool) -> str:
    """ "the two red circles" (``with_count``) or "all red circles"."""
    noun = f"{attrs['shape']}s" if attrs.get("shape") else "shapes"
    words = " ".join(w for w in (attrs.get("size"), attrs.get("colour"), noun) if w)
    return f"the {COUNT_WORDS[count]} {words}" if with_count else f"all {words}"


def _multi_target(scene: Scene, rng: np.random.Generator, margin: float, n: int) -> List[GroupExpression]:
    by_targets: Dict[tuple, Dict] = {}
    for obj in scene.objects:
        for attrs in _attr_subsets(obj):
            program = {"kind": "attribute", "attrs": attrs}
            targets = tuple(resolve(program, scene.objects, margin))
            if len(targets) >= 2 and targets not in by_targets:  # the shortest description of a set
                by_targets[targets] = program
    keys = list(by_targets)
    out = []
    for i in rng.permutation(len(keys))[:n]:
        targets, program = list(keys[i]), by_targets[keys[i]]
        text = render_group(program["attrs"], len(targets), with_count=bool(rng.random() < 0.5))
        out.append(GroupExpression(text, targets, "multi", program))
    return out


def _no_target(scene: Scene, rng: np.random.Generator, margin: float, n: int) -> List[GroupExpression]:
    shapes = {o.shape for o in scene.objects}
    colours = {o.colour for o in scene.objects}
    absent = [
        (s, c)
        for s in SHAPES
        for c in COLOURS
        if not resolve({"kind": "attribute", "attrs": {"shape": s, "colour": c}}, scene.objects, margin)
    ]
    hard = [(s, c) for s, c in absent if s in shapes and c in colours]
    pool = hard or absent
    out = []
    for i in rng.permutation(len(pool))[:n]:
        shape, colour = pool[i]
        program = {"kind": "attribute", "attrs": {"shape": shape, "colour": colour, "size": None}}
        out.append(GroupExpression(f"the {colour} {shape}", [], "no_target", program))
    return out


def gres_expressions(
    scene: Scene, rng: np.random.Generator, margin: float, multi: int = 2, single: int = 2, empty: int = 1
) -> List[GroupExpression]:
    """Up to ``multi`` multi-target, ``single`` single-target and ``empty`` no-target expressions."""
    singles = [
        GroupExpression(
            scene.expressions[i].text, [scene.expressions[i].target], "single", scene.expressions[i].program
        )
        for i in sorted(rng.permutation(len(scene.expressions))[:single])
    ]
    return _multi_target(scene, rng, margin, multi) + singles + _no_target(scene, rng, margin, empty)


def _write(root: str, scenes_by_split: Dict[str, List[Scene]], seed: int, image_size: int) -> Dict[str, int]:
    refer_root = os.path.join(root, "refer_seg")
    images, annotations, refs = [], [], []
    counts = {"single": 0, "multi": 0, "no_target": 0}
    for split in SPLITS:
        rng = np.random.default_rng([seed, 200 + SPLITS.index(split)])
        for scene in scenes_by_split[split]:
            image_index = len(images)
            images.append({"image": scene.image, "file_name": f"synth_{split}_{image_index:06d}.jpg"})
            first_ann = len(annotations)
            for obj in scene.objects:
                annotations.append(
                    {
                        "image_index": image_index,
                        "mask": obj.mask,
                        "category_id": category_id(obj),
                        "format": "rle",
                    }
                )
            for e in gres_expressions(scene, rng, 0.08 * image_size):
                counts[e.kind] += 1
                refs.append(
                    {
                        "ann_indices": [first_ann + t for t in e.targets],
                        "image_index": image_index,
                        "split": split,
                        "sentences": [e.text],
                    }
                )
    write_grefcoco_dataset(
        refer_root,
        GREF_DATASET,
        GREF_SPLIT_BY,
        images,
        annotations,
        refs,
        categories=THING_CATEGORIES,
        image_root=os.path.join(refer_root, "images", GREF_DATASET),
    )
    return counts


def generate_synthgref_datasets(
    root: str,
    num_images: Optional[Dict[str, int]] = None,
    seed: int = 0,
    image_size: int = 128,
    force: bool = False,
) -> str:
    """Write the GRES expressions of the synthetic scenes under ``root`` (if missing or changed);
    returns the manifest path. Same ``num_images`` / ``seed`` / ``image_size`` as
    :func:`~flowseg.data.synthetic.generate.generate_synthetic_datasets` give the same scenes."""
    num_images = dict(num_images or {"train": 2000, "val": 200, "test": 200})
    params = {
        "version": GRES_GENERATOR_VERSION,
        "seed": seed,
        "image_size": image_size,
        "num_images": num_images,
    }
    manifest = os.path.join(root, "synthgref_manifest.json")
    if not force and os.path.isfile(manifest):
        with open(manifest) as f:
            if json.load(f).get("params") == params:
                return manifest
    logger.info("Generating synthetic GRES data under %s: %s", root, num_images)
    scenes = {s: generate_split(s, num_images.get(s, 0), seed, image_size) for s in SPLITS}
    counts = _write(root, scenes, seed, image_size)
    with open(manifest, "w") as f:
        json.dump({"params": params, "counts": counts}, f, indent=2)
    return manifest


def register_synthgref_datasets(root: Optional[str] = None) -> List[str]:
    """Register ``synthgref_{train,val,test}`` under ``root`` (default: the synthetic data root)."""
    refer_root = os.path.join(root or default_root(), "refer_seg")
    names = []
    for split in SPLITS:
        name = f"synthgref_{split}"
        if name in DatasetCatalog.list():  # re-registration under another root
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        register_grefcoco_dataset(
            name,
            refer_root,
            GREF_DATASET,
            GREF_SPLIT_BY,
            split,
            image_root=os.path.join(refer_root, "images", GREF_DATASET),
        )
        names.append(name)
    return names


register_synthgref_datasets()
