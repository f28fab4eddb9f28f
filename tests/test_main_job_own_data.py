"""A user's own data through the whole main job (``tools/main_job.py``), in the real on-disk
formats: a RefCOCO folder (``refer_seg/refcoco``, ``refs(unc).p``, instances stored as polygons,
one crowd annotation as uncompressed RLE, splits train / val / testA / testB) and a COCO-panoptic
folder with its own 7 categories and no semantic PNGs, read through the builtin names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import yaml
from flowseg.data.datasets.refcoco import refer_image_root
from flowseg.data.synthetic.generate import (
    generate_split,
    panoptic_categories,
    panoptic_segments,
    refer_records,
)
from flowseg.data.synthetic.vocabulary import DEFAULT_VOCABULARY
from flowseg.data.writers import write_coco_panoptic_dataset, write_refer_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = {"train": 8, "val": 2, "testA": 2, "testB": 2}
# 3 shapes x 2 colours + background: 7 categories, none of them COCO's
SEVEN = replace(
    DEFAULT_VOCABULARY,
    name="seven",
    shapes={s: s for s in ("circle", "square", "triangle")},
    colours={k: DEFAULT_VOCABULARY.colours[k] for k in ("red", "blue")},
    shape_hints={k: DEFAULT_VOCABULARY.shape_hints[k] for k in ("circle", "square", "triangle")},
    colour_hints={k: DEFAULT_VOCABULARY.colour_hints[k] for k in ("red", "blue")},
)


def write_own_data(root: str) -> dict:
    """The folders under ``root`` (``$DETECTRON2_DATASETS``); returns what was written."""
    categories = panoptic_categories(SEVEN)
    scenes = {
        s: generate_split("train", n, seed=5, image_size=128, vocabulary=SEVEN, stream=20 + i)
        for i, (s, n) in enumerate(SPLITS.items())
    }
    images, annotations, refs = refer_records(scenes, categories, prefix="own")
    for ann in annotations:
        ann["format"] = "polygon"  # as the real RefCOCO stores its objects
    annotations[0]["format"] = "rle_uncompressed"  # a crowd region, as COCO stores those
    refer_root = os.path.join(root, "refer_seg")
    paths = write_refer_dataset(
        refer_root, "refcoco", "unc", images, annotations, refs, categories[:-1], refer_image_root(refer_root)
    )
    with open(paths["instances"]) as f:
        instances = json.load(f)
    instances["annotations"][0]["iscrowd"] = 1
    with open(paths["instances"], "w") as f:
        json.dump(instances, f)
    coco = os.path.join(root, "coco")
    segments = [panoptic_segments(sc, categories) for sc in scenes["train"]]
    pan = write_coco_panoptic_dataset(coco, [sc.image for sc in scenes["train"]], segments, categories)
    for name in os.listdir(pan["sem_seg_root"]):  # the user has not made them
        os.remove(os.path.join(pan["sem_seg_root"], name))
    os.rmdir(pan["sem_seg_root"])
    return {"instances": instances, "categories": categories, "sem_seg_root": pan["sem_seg_root"]}


@pytest.mark.slow
def test_main_job_on_own_polygon_refcoco_and_seven_class_panoptic(tmp_path):
    data = str(tmp_path / "data")
    written = write_own_data(data)
    assert isinstance(written["instances"]["annotations"][1]["segmentation"], list)  # polygons
    out = tmp_path / "out"
    tests = ["refcoco_unc_val", "refcoco_unc_testA", "refcoco_unc_testB"]
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "main_job.py"), "--data-root", data,
        "--refer-train", "refcoco_unc_train", "--refer-test", *tests,
        "--panoptic-train", "coco_2017_train_panoptic_with_sem_seg", "--reason-test", "",
        "--stage1-iters", "2", "--stage2-iters", "2", "--iters", "2", "--num-vis", "1",
        "--cpu-processes", "1", "--output-dir", str(out),
        "--set", "SOLVER.IMS_PER_BATCH", "2", "--set", "DATALOADER.NUM_WORKERS", "0",
    ]  # fmt: skip
    # the subprocesses import this checkout's flowseg, not an installed one
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "projects", "FlowSeg"), OMP_NUM_THREADS="2")
    env.pop("DETECTRON2_DATASETS", None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    # stage 1 trained on the json's own 7 categories, and the job said where they came from
    with open(out / "stage1" / "config.yaml") as f:
        assert yaml.safe_load(f)["MODEL"]["SEM_SEG_HEAD"]["NUM_CLASSES"] == 7
    assert "7 categories" in proc.stdout and "panoptic_train2017.json" in proc.stdout
    # the semantic PNGs were made from the panoptic PNGs
    assert len(os.listdir(written["sem_seg_root"])) == SPLITS["train"]
    # stage 2 described the polygon (and crowd RLE) objects
    with open(os.path.join(data, "scene_conversations", "refcoco_unc_train.json")) as f:
        answers = [s["conversations"][1]["value"] for s in json.load(f)]
    assert answers and all(a.startswith(("a small ", "a large ")) for a in answers)
    # the three held-out splits in one table
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["held_out"]) == tests
    for m in summary["held_out"].values():
        assert 0.0 <= m["cIoU"] <= 100.0 and 0.0 <= m["gIoU"] <= 100.0
    table = (out / "summary.md").read_text().splitlines()
    assert table[0].startswith("| data set | cIoU | gIoU |") and len(table) == 2 + len(tests)
    assert [row.split("|")[1].strip() for row in table[2:]] == tests
    assert "\n".join(table) in proc.stdout
    assert np.isclose(summary["held_out_cIoU"], summary["held_out"]["refcoco_unc_val"]["cIoU"])
