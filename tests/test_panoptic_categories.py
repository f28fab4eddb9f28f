"""Where a COCO-panoptic data set's categories come from: the builtin ``_with_sem_seg`` names read
their own panoptic json's ``categories`` (on first use, logged when they are not COCO's), an
override file replaces them, and whatever disagrees stops with an error that says where the
categories came from (class count, PQ and AP evaluation)."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg import add_flowseg_config
from flowseg.data.datasets import coco_panoptic_metadata, register_coco_panoptic_dataset
from flowseg.data.datasets.coco_panoptic import (
    _PREDEFINED_SPLITS_COCO_PANOPTIC_WITH_SEM_SEG as BUILTIN,
)
from flowseg.data.datasets.coco_panoptic import register_all_coco_panoptic_with_sem_seg
from flowseg.data.datasets.panoptic_categories import BUILTIN_CATEGORIES_FILE, json_categories
from flowseg.data.writers import write_coco_panoptic_dataset
from flowseg.engine.evaluation import build_evaluator, check_num_classes

CATEGORIES = [
    {"id": 7, "name": "background", "isthing": 0, "color": [128, 128, 128]},
    {"id": 1, "name": "rect", "isthing": 1, "color": [220, 40, 40]},
    {"id": 3, "name": "ellipse", "isthing": 1, "color": [40, 60, 220]},
]
TRAIN = "coco_2017_train_panoptic_with_sem_seg"


def _write(coco_root: str, split: str) -> dict:
    images, segments = [], []
    for i in range(2):
        rect = np.zeros((32, 32), bool)
        rect[4 + i : 14, 4:20] = True
        disc = np.zeros((32, 32), bool)
        disc[20:28, 20:28] = True
        images.append(np.full((32, 32, 3), 100 + i, np.uint8))
        segments.append(
            [
                {"mask": rect, "category_id": 1},
                {"mask": disc, "category_id": 3},
                {"mask": ~(rect | disc), "category_id": 7},
            ]
        )
    return write_coco_panoptic_dataset(coco_root, images, segments, CATEGORIES, split=split)


@pytest.fixture
def builtin_root(tmp_path):
    """The builtin names registered under a fresh root (restored afterwards)."""
    saved = {n: (DatasetCatalog[n], MetadataCatalog.get(n)) for n in BUILTIN}
    for n in BUILTIN:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)
    root = str(tmp_path / "d2")
    _write(os.path.join(root, "coco"), "train")
    _write(os.path.join(root, "coco"), "val")

    def register():
        for n in BUILTIN:
            if n in DatasetCatalog.list():
                DatasetCatalog.remove(n)
                MetadataCatalog.remove(n)
        register_all_coco_panoptic_with_sem_seg(root)

    yield root, register
    for n, (fn, meta) in saved.items():
        if n in DatasetCatalog.list():
            DatasetCatalog.remove(n)
        DatasetCatalog[n] = fn
        MetadataCatalog[n] = meta


def test_builtin_names_read_their_own_json_categories_and_say_so(builtin_root, caplog):
    root, register = builtin_root
    register()
    meta = MetadataCatalog.get(TRAIN)
    assert "categories_source" not in vars(meta)  # registering read nothing
    with caplog.at_level(logging.INFO, logger="flowseg"):
        assert meta.stuff_classes == ["rect", "ellipse", "background"]  # things first
    pan_json = os.path.join(root, "coco", "annotations", "panoptic_train2017.json")
    assert meta.categories_source == f"the 'categories' of {pan_json}"
    assert f"{TRAIN}: 3 categories from the 'categories' of {pan_json} (not COCO's 133)" in caplog.text
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 3: 1}
    dicts = DatasetCatalog.get(TRAIN)
    assert sorted(s["category_id"] for s in dicts[0]["segments_info"]) == [0, 1, 2]
    assert len(MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg").stuff_classes) == 3


def test_override_file_and_missing_json(builtin_root):
    root, register = builtin_root
    override = [dict(c, name=c["name"].upper()) for c in CATEGORIES]
    side = os.path.join(root, BUILTIN_CATEGORIES_FILE)
    with open(side, "w") as f:
        json.dump({"categories": override}, f)
    register()
    assert MetadataCatalog.get(TRAIN).stuff_classes == ["RECT", "ELLIPSE", "BACKGROUND"]
    assert MetadataCatalog.get(TRAIN).categories_source == side
    os.remove(side)
    os.remove(os.path.join(root, "coco", "annotations", "panoptic_train2017.json"))
    register()
    meta = MetadataCatalog.get(TRAIN)
    assert len(meta.stuff_classes) == 133 and "panoptic_train2017.json not found" in meta.categories_source


def test_big_json_categories_are_read_from_its_end(tmp_path, monkeypatch):
    import flowseg.data.datasets.coco_panoptic as cp
    import flowseg.data.datasets.panoptic_categories as pc

    def full_parse(path):
        raise AssertionError(f"{path} parsed in full")

    path = tmp_path / "pan.json"
    pad = [{"id": i, "file_name": "x" * 50} for i in range(2000)]
    path.write_text(json.dumps({"images": pad, "annotations": [], "categories": CATEGORIES}))
    monkeypatch.setattr(pc, "_FULL_PARSE_BYTES", 1000)
    monkeypatch.setattr(pc, "_TAIL_BYTES", 4096)  # less than the file: only its end is read
    monkeypatch.setattr(cp, "read_annotation_json", full_parse)
    assert json_categories(str(path)) == CATEGORIES


def test_class_count_error_says_where_the_categories_come_from(builtin_root):
    root, register = builtin_root
    register()
    cfg = add_flowseg_config(get_cfg())
    cfg.MODEL.FLOWSEG.MODE = "generic"
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 133
    pan_json = os.path.join(root, "coco", "annotations", "panoptic_train2017.json")
    with pytest.raises(ValueError, match=rf"has 3 categories .* from the 'categories' of {pan_json}: set "):
        check_num_classes(cfg, [TRAIN])


def test_evaluation_refuses_categories_that_differ_from_the_jsons(tmp_path):
    paths = _write(str(tmp_path / "coco"), "val")
    cfg = add_flowseg_config(get_cfg())
    other = [dict(c, id=c["id"] + 100) for c in CATEGORIES]
    args = (paths["image_root"], paths["panoptic_root"], paths["panoptic_json"])
    register_coco_panoptic_dataset("test_pc_other", coco_panoptic_metadata(other), *args, overwrite=True)
    with pytest.raises(ValueError, match=r"lists category ids \[1, 3, 7\].* ids \[101, 103, 107\].*PQ"):
        build_evaluator(cfg, "test_pc_other", str(tmp_path / "ev"))
    # the instances json (mask AP) lists other things than the data set's
    with open(paths["instances_json"]) as f:
        inst = json.load(f)
    inst["categories"] = [{"id": 5, "name": "rect"}, {"id": 3, "name": "ellipse"}]
    inst["annotations"] = [
        dict(a, category_id=5 if a["category_id"] == 1 else 3) for a in inst["annotations"]
    ]
    with open(paths["instances_json"], "w") as f:
        json.dump(inst, f)
    register_coco_panoptic_dataset(
        "test_pc_inst", coco_panoptic_metadata(CATEGORIES), *args, instances_json=paths["instances_json"],
        overwrite=True,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"thing category ids \[3, 5\].*register_coco_panoptic_dataset.*AP"):
        build_evaluator(cfg, "test_pc_inst", str(tmp_path / "ev2"))
