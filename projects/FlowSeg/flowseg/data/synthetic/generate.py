"""Write the synthetic referring benchmark in the real on-disk formats and register it.

The same scenes are written three ways, so the project's real loaders read them unchanged:

* refer layout (``refer_seg/synthref/instances.json`` + ``refs(synth).p``), one ref per object
  with all its expressions, splits ``train`` / ``val`` / ``test``;
* ReasonSeg layout (``reason_seg/SynthReason/{split}/NAME.jpg + NAME.json``), implicit queries,
  short (``is_sentence`` false) and long (true) alternating;
* COCO-panoptic layout (``synth_panoptic``), the 30 colour-shape combinations as things plus a
  background stuff.

Registered names (lazily, at import, under ``$DETECTRON2_DATASETS/synthetic`` like Detectron2's
builtin data sets): ``synthref_{train,val,test}``, ``synthreason_{train,val,test}``,
``synthpan_{train,val,test}``.

The built-in data use the default vocabulary; :func:`generate_split`, :func:`refer_records`,
:func:`panoptic_segments` and :func:`panoptic_categories` take another one
(``tools/make_variant_data.py`` writes the variant scenes with them).
"""

import json
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog

from ..datasets.reasonseg import register_reasonseg_dataset
from ..datasets.refcoco import register_refer_dataset
from ..writers import register_coco_panoptic_folder, write_coco_panoptic_dataset, write_reasonseg_dataset
from ..writers.refer import write_refer_dataset
from .scenes import Scene, SceneObject, generate_scene
from .vocabulary import DEFAULT_VOCABULARY, SceneVocabulary

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
GENERATOR_VERSION = 2  # bump when the written data change: cached data are regenerated
REFER_DATASET, REFER_SPLIT_BY = "synthref", "synth"


# Panoptic categories are colour + shape ("red circle", 30 things): as COCO's category names do for
# the paper's stage 1, they give the segmentor's queries every attribute word of the expressions
# except size and position, and stage-3 panoptic batches teach the LLM those words.
def panoptic_categories(vocabulary: SceneVocabulary = DEFAULT_VOCABULARY) -> List[Dict]:
    """A vocabulary's categories: every "colour shape" pair a thing (ids 1.., shape by shape),
    then one ``background`` stuff."""
    pairs = [(c, rgb, s) for s in vocabulary.shapes for c, rgb in vocabulary.colours.items()]
    things = [
        {"id": i + 1, "name": f"{colour} {shape}", "isthing": 1, "color": rgb, "supercategory": shape}
        for i, (colour, rgb, shape) in enumerate(pairs)
    ]
    background = {"id": len(things) + 1, "name": "background", "isthing": 0, "color": (128, 128, 128)}
    return things + [background]


CATEGORIES = panoptic_categories()
THING_CATEGORIES, BACKGROUND_CATEGORY = CATEGORIES[:-1], CATEGORIES[-1]


def category_id(obj: "SceneObject", categories: Sequence[Dict] = CATEGORIES) -> int:
    """Panoptic / refer category id of a scene object (its colour and shape) among ``categories``."""
    name = f"{obj.colour} {obj.shape}"
    for c in categories:
        if c["name"] == name:
            return int(c["id"])
    raise KeyError(f"no category {name!r} among {[c['name'] for c in categories]}")


def default_root() -> str:
    return os.path.join(os.getenv("DETECTRON2_DATASETS", "datasets"), "synthetic")


def paths(root: str) -> Dict[str, str]:
    return {
        "refer_root": os.path.join(root, "refer_seg"),
        "refer_images": os.path.join(root, "refer_seg", "images", "synthref"),
        "reason_root": os.path.join(root, "reason_seg", "SynthReason"),
        "panoptic_root": os.path.join(root, "synth_panoptic"),
        "manifest": os.path.join(root, "synthetic_manifest.json"),
    }


def generate_split(
    split: str,
    num_images: int,
    seed: int,
    image_size: int,
    vocabulary: SceneVocabulary = DEFAULT_VOCABULARY,
    stream: Optional[int] = None,
) -> List[Scene]:
    """Scenes of one split; each split has its own random stream (default: its index in
    :data:`SPLITS`) so sizes can change independently."""
    rng = np.random.default_rng([seed, SPLITS.index(split) if stream is None else stream])
    return [generate_scene(rng, image_size=image_size, vocabulary=vocabulary) for _ in range(num_images)]


def refer_records(
    scenes_by_split: Dict[str, List[Scene]], categories: Sequence[Dict] = CATEGORIES, prefix: str = "synth"
) -> Tuple[List[Dict], List[Dict], List[Dict]]:
    """``write_refer_dataset``'s images, annotations (RLE) and refs: one ref per object that has
    expressions, with all of them; images are named ``{prefix}_{split}_{index}.jpg``."""
    images: List[Dict] = []
    annotations: List[Dict] = []
    refs: List[Dict] = []
    for split, scenes in scenes_by_split.items():
        for scene in scenes:
            image_index = len(images)
            images.append({"image": scene.image, "file_name": f"{prefix}_{split}_{image_index:06d}.jpg"})
            ann_index = {}
            for k, obj in enumerate(scene.objects):
                ann_index[k] = len(annotations)
                # RLE keeps occluded shapes pixel-exact (polygons would fill cut-outs)
                annotations.append(
                    {
                        "image_index": image_index,
                        "mask": obj.mask,
                        "category_id": category_id(obj, categories),
                        "format": "rle",
                    }
                )
            for k in range(len(scene.objects)):
                sentences = [e.text for e in scene.expressions if e.target == k]
                if sentences:
                    refs.append({"ann_index": ann_index[k], "split": split, "sentences": sentences})
    return images, annotations, refs


def _write_refer(root: str, scenes_by_split: Dict[str, List[Scene]]) -> None:
    p = paths(root)
    images, annotations, refs = refer_records({s: scenes_by_split[s] for s in SPLITS})
    write_refer_dataset(
        p["refer_root"],
        REFER_DATASET,
        REFER_SPLIT_BY,
        images,
        annotations,
        refs,
        categories=THING_CATEGORIES,
        image_root=p["refer_images"],
    )


def _write_reasonseg(root: str, scenes_by_split: Dict[str, List[Scene]], seed: int) -> None:
    p = paths(root)
    for split in SPLITS:
        rng = np.random.default_rng([seed, 100 + SPLITS.index(split)])
        samples = []
        for i, scene in enumerate(scenes_by_split[split]):
            if not scene.reasoning:
                continue
            q = scene.reasoning[int(rng.integers(len(scene.reasoning)))]
            is_sentence = i % 2 == 1  # alternate short and long queries
            samples.append(
                {
                    "name": f"synth_{split}_{i:06d}",
                    "image": scene.image,
                    "texts": [q.long if is_sentence else q.short],
                    "is_sentence": is_sentence,
                    "target_mask": scene.objects[q.target].mask,
                }
            )
        write_reasonseg_dataset(os.path.join(p["reason_root"], split), samples)


def panoptic_segments(scene: Scene, categories: Sequence[Dict] = CATEGORIES) -> List[Dict]:
    """``write_coco_panoptic_dataset``'s segments of a scene: its objects, then the background
    (the last of ``categories``)."""
    segs = [
        {"mask": o.mask, "category_id": category_id(o, categories), "iscrowd": 0}
        for o in scene.objects
        if o.mask.any()
    ]
    background = ~np.any([o.mask for o in scene.objects], axis=0)
    if background.any():
        segs.append({"mask": background, "category_id": categories[-1]["id"], "iscrowd": 0})
    return segs


def _write_panoptic(root: str, scenes_by_split: Dict[str, List[Scene]]) -> None:
    p = paths(root)
    for split in SPLITS:
        scenes = scenes_by_split[split]
        segments = [panoptic_segments(scene) for scene in scenes]
        write_coco_panoptic_dataset(
            p["panoptic_root"], [s.image for s in scenes], segments, CATEGORIES, split=split
        )


def generate_synthetic_datasets(
    root: str,
    num_images: Optional[Dict[str, int]] = None,
    seed: int = 0,
    image_size: int = 128,
    force: bool = False,
) -> Dict[str, str]:
    """Generate (if missing) and write all three layouts under ``root``; returns the paths.

    A manifest records the parameters: the data are regenerated only when they change or
    ``force`` is set, so calling this at the start of every run is cheap.
    """
    num_images = dict(num_images or {"train": 2000, "val": 200, "test": 200})
    params = {"version": GENERATOR_VERSION, "seed": seed, "image_size": image_size, "num_images": num_images}
    p = paths(root)
    if not force and os.path.isfile(p["manifest"]):
        with open(p["manifest"]) as f:
            if json.load(f).get("params") == params:
                return p
    logger.info("Generating synthetic referring data under %s: %s", root, num_images)
    scenes = {s: generate_split(s, num_images.get(s, 0), seed, image_size) for s in SPLITS}
    _write_refer(root, scenes)
    _write_reasonseg(root, scenes, seed)
    _write_panoptic(root, scenes)
    counts = {
        s: {
            "images": len(v),
            "expressions": sum(len(sc.expressions) for sc in v),
            "by_kind": {
                k: sum(1 for sc in v for e in sc.expressions if e.kind == k)
                for k in ("attribute", "superlative", "relation")
            },
        }
        for s, v in scenes.items()
    }
    with open(p["manifest"], "w") as f:
        json.dump({"params": params, "counts": counts}, f, indent=2)
    return p


def register_synthetic_datasets(root: Optional[str] = None) -> List[str]:
    """Register the synthetic data under ``root`` (default :func:`default_root`) with the
    project's real loaders. Lazy: files are read when a data set is first loaded."""
    p = paths(root or default_root())
    names = []
    for split in SPLITS:
        for name, register in (
            (
                f"synthref_{split}",
                lambda n, s=split: register_refer_dataset(
                    n, p["refer_root"], REFER_DATASET, REFER_SPLIT_BY, s, image_root=p["refer_images"]
                ),
            ),
            (
                f"synthreason_{split}",
                lambda n, s=split: register_reasonseg_dataset(n, os.path.join(p["reason_root"], s)),
            ),
            (
                f"synthpan_{split}",
                lambda n, s=split: register_coco_panoptic_folder(
                    n, p["panoptic_root"], split=s, categories=CATEGORIES, overwrite=True
                ),
            ),
        ):
            if name in DatasetCatalog.list():  # re-registration under another root
                DatasetCatalog.remove(name)
                MetadataCatalog.remove(name)
            register(name)
            names.append(name)
    return names


register_synthetic_datasets()
