"""ReasonSeg data: LISA-layout writer -> loader -> ReferringDatasetMapper, on tiny generated data."""

from __future__ import annotations

import json
import os
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg.config import add_flowseg_config
from flowseg.data.build import MAPPER_REGISTRY, build_test_mapper
from flowseg.data.dataset_mappers.referring import ReferringDatasetMapper, gt_masks_from_dict
from flowseg.data.datasets.reasonseg import (
    REASONSEG_SPLITS,
    load_reasonseg_dataset,
    register_reasonseg_dataset,
)
from flowseg.data.writers.reasonseg import write_reasonseg_dataset


def _rect(x0: int, y0: int, x1: int, y1: int) -> list:
    """Polygon covering exactly pixels x0..x1-1, y0..y1-1 (COCO/pycocotools pixel-square convention)."""
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _box_mask(h: int, w: int, *boxes) -> np.ndarray:
    m = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


def _ellipse_mask() -> np.ndarray:
    m = np.zeros((50, 70), np.uint8)
    cv2.ellipse(m, (35, 25), (20, 12), 15.0, 0, 360, 1, -1)
    return m.astype(bool)


def _samples() -> list:
    rng = np.random.default_rng(1)
    img = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    return [
        # two targets (merged into one mask) and a separate ignore region
        {
            "name": "a_two_targets",
            "image": img(40, 60),
            "is_sentence": False,
            "texts": ["the two boxes", "both squares"],
            "target_polygons": [_rect(5, 5, 15, 20), _rect(30, 10, 50, 30)],
            "ignore_polygons": [_rect(52, 32, 58, 38)],
        },
        # long query, target given as a mask (traced to polygons by the writer)
        {
            "name": "b_sentence",
            "image": img(50, 70),
            "is_sentence": True,
            "texts": ["What would you sit on if you were tired after a long walk?", "q2", "q3"],
            "target_mask": _ellipse_mask(),
        },
        # an ignore region inside a larger target: LISA paints the smaller shape last, so it wins
        {
            "name": "c_nested",
            "image": img(30, 20),
            "is_sentence": False,
            "texts": ["the frame"],
            "target_polygons": [_rect(2, 2, 18, 28)],
            "ignore_polygons": [_rect(6, 6, 12, 12)],
        },
    ]


@pytest.fixture(scope="module")
def reasonseg(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("ReasonSeg") / "val")
    write_reasonseg_dataset(folder, _samples())
    tag = uuid.uuid4().hex[:8]
    first, every = f"test_reasonseg_{tag}", f"test_reasonseg_{tag}_all"
    register_reasonseg_dataset(first, folder)
    register_reasonseg_dataset(every, folder, all_queries=True)
    return {"folder": folder, "first": first, "all": every}


def _mapper(is_train: bool, image_size: int = 32) -> ReferringDatasetMapper:
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = image_size
    return MAPPER_REGISTRY.get("reasoning")(cfg, is_train)


def test_writer_layout_is_labelme(reasonseg):
    folder = reasonseg["folder"]
    expected = sorted(f"{s['name']}{e}" for s in _samples() for e in (".jpg", ".json"))
    assert sorted(os.listdir(folder)) == expected
    with open(os.path.join(folder, "a_two_targets.json")) as f:
        anno = json.load(f)
    assert anno["text"] == ["the two boxes", "both squares"] and anno["is_sentence"] is False
    assert [s["label"] for s in anno["shapes"]] == ["target", "target", "ignore"]
    assert anno["shapes"][0] == {
        "label": "target",
        "group_id": None,
        "shape_type": "polygon",
        "flags": {},
        "points": [[5.0, 5.0], [15.0, 5.0], [15.0, 20.0], [5.0, 20.0]],
    }


def test_first_query_vs_all_queries(reasonseg):
    first = DatasetCatalog.get(reasonseg["first"])
    every = DatasetCatalog.get(reasonseg["all"])
    assert len(first) == 3 and len(every) == 2 + 3 + 1
    assert [d["expression"] for d in first] == [s["texts"][0] for s in _samples()]
    assert [d["expression"] for d in every] == [t for s in _samples() for t in s["texts"]]
    assert [d["query_index"] for d in every] == [0, 1, 0, 1, 2, 0]
    assert [d["is_sentence"] for d in first] == [False, True, False]
    d = first[0]
    assert set(d) == {
        "file_name",
        "height",
        "width",
        "image_id",
        "expression",
        "is_sentence",
        "task",
        "target_polygons",
        "ignore_polygons",
        "query_index",
    }
    assert (d["image_id"], d["height"], d["width"], d["task"]) == ("a_two_targets", 40, 60, "reasoning")
    assert d["file_name"] == os.path.join(reasonseg["folder"], "a_two_targets.jpg")
    assert d["target_polygons"][1] == [30.0, 10.0, 50.0, 10.0, 50.0, 30.0, 30.0, 30.0]
    assert len(d["ignore_polygons"]) == 1
    assert MetadataCatalog.get(reasonseg["first"]).evaluator_type == "reason_seg"
    assert MetadataCatalog.get(reasonseg["all"]).all_queries is True


def test_builtin_names_registered():
    for split in REASONSEG_SPLITS:
        for name in (f"reasonseg_{split}", f"reasonseg_{split}_all"):
            assert name in DatasetCatalog.list()
            assert MetadataCatalog.get(name).evaluator_type == "reason_seg"
    folder = MetadataCatalog.get("reasonseg_val").folder
    assert folder.endswith(os.path.join("reason_seg", "ReasonSeg", "val"))
    if not os.path.isdir(folder):
        with pytest.raises(FileNotFoundError, match="ReasonSeg"):
            DatasetCatalog.get("reasonseg_val")


def test_mapper_eval_merges_targets_and_fills_ignore(reasonseg):
    first = DatasetCatalog.get(reasonseg["first"])
    mapper = _mapper(False, 32)
    out = mapper(first[0])
    assert tuple(out["image"].shape) == (3, 21, 32) and out["image"].dtype == torch.uint8  # 40x60 -> 21x32
    assert (out["height"], out["width"]) == (40, 60)
    assert np.array_equal(out["gt_mask"].astype(bool), _box_mask(40, 60, (5, 5, 15, 20), (30, 10, 50, 30)))
    assert np.array_equal(out["ignore_mask"], _box_mask(40, 60, (52, 32, 58, 38)))
    assert out["is_sentence"] is False and out["task"] == "reasoning" and out["image_id"] == "a_two_targets"
    assert "target_polygons" not in out and "instances" not in out

    out = mapper(first[1])  # mask traced by the writer
    inter = (out["gt_mask"].astype(bool) & _ellipse_mask()).sum()
    assert inter / (out["gt_mask"].astype(bool) | _ellipse_mask()).sum() >= 0.98
    assert out["is_sentence"] is True and not out["ignore_mask"].any()

    out = mapper(first[2])  # nested: the smaller ignore shape is painted last
    assert np.array_equal(out["ignore_mask"], _box_mask(30, 20, (6, 6, 12, 12)))
    assert np.array_equal(
        out["gt_mask"].astype(bool), _box_mask(30, 20, (2, 2, 18, 28)) & ~_box_mask(30, 20, (6, 6, 12, 12))
    )
    # evaluators can rebuild the same ground truth from the dataset dict alone
    gt, ign = gt_masks_from_dict(first[2])
    assert np.array_equal(gt, out["gt_mask"]) and np.array_equal(ign, out["ignore_mask"])


def test_mapper_train_instances(reasonseg):
    d = DatasetCatalog.get(reasonseg["first"])[0]
    out = _mapper(True, 30)(d)  # 40x60 -> 20x30: every coordinate halves
    inst = out["instances"]
    assert inst.image_size == (20, 30) and inst.gt_classes.tolist() == [0]
    expected = _box_mask(20, 30, (2, 2, 7, 10), (15, 5, 25, 15))  # ignore pixels are background
    assert np.array_equal(inst.gt_masks[0].numpy(), expected)
    assert build_test_mapper(add_flowseg_config(get_cfg()), reasonseg["first"]).is_train is False


# ---------------------------------------------------------------- errors name the file


def _write_one(folder, **override) -> tuple:
    s = dict(_samples()[0], **override)
    return write_reasonseg_dataset(str(folder), [s])[0]


def _patch_json(path, fn) -> None:
    with open(path) as f:
        anno = json.load(f)
    fn(anno)
    with open(path, "w") as f:
        json.dump(anno, f)


@pytest.mark.parametrize(
    "edit,pattern",
    [
        (lambda a: a.pop("text"), "has no 'text'"),
        (lambda a: a.update(text=[]), "empty 'text' list"),
        (lambda a: a.update(shapes=[s for s in a["shapes"] if s["label"] != "target"]), "no target polygon"),
        (lambda a: a["shapes"][1].update(points=[[1, 1], [5, 5]]), r"shape 1 \(label 'target'\).*2 points"),
        (lambda a: a.pop("is_sentence"), "boolean 'is_sentence'"),
    ],
    ids=["no_text", "empty_text", "no_target", "two_points", "no_is_sentence"],
)
def test_bad_json_names_file(tmp_path, edit, pattern):
    _, json_path = _write_one(tmp_path)
    _patch_json(json_path, edit)
    name = f"test_reasonseg_bad_{uuid.uuid4().hex[:8]}"
    register_reasonseg_dataset(name, str(tmp_path))  # lazy: no error yet
    with pytest.raises(ValueError, match=pattern) as e:
        DatasetCatalog.get(name)
    assert json_path in str(e.value)


def test_invalid_json_and_missing_pairs(tmp_path):
    img_path, json_path = _write_one(tmp_path)
    with open(json_path, "w") as f:
        f.write('{"text": ["x"], ')
    with pytest.raises(ValueError, match="not valid JSON") as e:
        load_reasonseg_dataset(str(tmp_path))
    assert json_path in str(e.value)

    os.remove(json_path)
    with pytest.raises(ValueError, match="has no annotation") as e:
        load_reasonseg_dataset(str(tmp_path))
    assert img_path in str(e.value) and json_path in str(e.value)

    img_path, json_path = _write_one(tmp_path)
    os.remove(img_path)
    with pytest.raises(ValueError, match="has no image") as e:
        load_reasonseg_dataset(str(tmp_path))
    assert json_path in str(e.value)

    with pytest.raises(FileNotFoundError, match="no_such_split"):
        load_reasonseg_dataset(str(tmp_path / "no_such_split"))


def test_cp1252_json_and_flag_shapes_are_read_like_lisa(tmp_path):
    _, json_path = _write_one(tmp_path)
    _patch_json(json_path, lambda a: a["shapes"].append({"label": "flag", "points": [[0, 0]]}))
    with open(json_path, encoding="utf-8") as f:
        text = f.read().replace("the two boxes", "the caf\\u00e9 boxes")
    anno = json.loads(text)
    with open(json_path, "w", encoding="cp1252") as f:
        json.dump(anno, f, ensure_ascii=False)  # "é" as the single byte 0xE9: not UTF-8
    (d,) = load_reasonseg_dataset(str(tmp_path))
    assert d["expression"] == "the café boxes" and len(d["target_polygons"]) == 2
