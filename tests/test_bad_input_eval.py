"""Bad input in evaluation ends in an error naming the file / ids and the cause, never in a score:
ground truth outside its image (RefCOCO ``instances.json`` + ``refs(unc).p``, gRefCOCO
``grefs(unc).json``, ReasonSeg json), panoptic PNGs of another size than their image (COCO-panoptic
json + PNGs)."""

from __future__ import annotations

import json
import uuid

import cv2
import pytest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from flowseg import add_flowseg_config
from flowseg.data.build import guard_mapper
from flowseg.data.dataset_mappers.coco_panoptic_lsj import (
    COCOPanopticLSJDatasetMapper,
    build_coco_panoptic_test_mapper,
)
from flowseg.data.dataset_mappers.referring import ReferringDatasetMapper
from flowseg.data.datasets.grefcoco import load_grefcoco_dataset
from flowseg.data.datasets.reasonseg import load_reasonseg_dataset
from flowseg.data.datasets.refcoco import load_refer_dataset, register_refer_dataset
from flowseg.data.writers import register_coco_panoptic_folder, write_coco_panoptic_dataset
from flowseg.engine import FlowSegTrainer
from test_bad_input import _edit_refer
from test_coco_panoptic_data import CATEGORIES, make_scenes
from test_gres_data import _write as _write_gref
from test_reasonseg_data import _patch_json, _write_one
from test_refer_data import _write

OUTSIDE = [[-9.0, -9.0, -2.0, -9.0, -2.0, -2.0]]  # left of and above the image


def _cfg(**kw):
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = 32
    for k, v in kw.items():
        cfg.merge_from_list([k, v])
    return cfg


def _move_val_target(paths, segmentation) -> None:
    # ann 503 is the target of the only "val" ref (ref_id=2) on image 3 (30x30)
    def edit(data):
        (ann,) = [a for a in data["annotations"] if a["id"] == 503]
        ann["segmentation"] = segmentation

    _edit_refer(paths, fn_inst=edit)


# ------------------------------------------------------------------ RefCOCO val target outside its image
def test_refer_val_target_outside_image_is_refused_before_evaluation(tmp_path) -> None:
    paths = _write(tmp_path)
    _move_val_target(paths, OUTSIDE)
    name = f"test_outside_val_{uuid.uuid4().hex[:8]}"
    register_refer_dataset(name, str(tmp_path), "refcoco", "unc", "val")
    try:  # what --eval-only builds before the first inference
        with pytest.raises(
            ValueError, match=r"wholly outside the 30x30 \(WxH\) image.*empty target mask"
        ) as e:
            FlowSegTrainer.build_test_loader(_cfg(), name)
    finally:
        DatasetCatalog.remove(name)
    msg = str(e.value)
    assert paths["instances"] in msg and "annotation id=503" in msg and "ref_id=2" in msg
    assert "x in [-9, -2], y in [-9, -2]" in msg


def test_refer_rle_of_another_size_is_refused_at_load_time(tmp_path) -> None:
    paths = _write(tmp_path)
    _move_val_target(paths, {"size": [60, 40], "counts": [100, 50, 2250]})  # image 3 is 30x30
    with pytest.raises(
        ValueError, match=r"an RLE of size \[60, 40\] \(HxW\) for an image of size \[30, 30\]"
    ) as e:
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "val")
    assert paths["instances"] in str(e.value) and "annotation id=503" in str(e.value)


def test_refer_target_that_rasterises_to_nothing_is_an_error_in_evaluation_or_skipped(tmp_path) -> None:
    # inside the image with a positive area, but it covers no pixel centre: an empty mask
    paths = _write(tmp_path)
    _move_val_target(paths, [[10.1, 10.1, 10.4, 10.1, 10.1, 10.4]])
    (d,) = load_refer_dataset(str(tmp_path), "refcoco", "unc", "val")
    cfg = _cfg(OUTPUT_DIR=str(tmp_path / "out"))
    mapper = guard_mapper(cfg, ReferringDatasetMapper(cfg, is_train=False), False)
    with pytest.raises(ValueError, match=r"empty target mask after rasterisation") as e:
        mapper(d)
    assert d["file_name"] in str(e.value) and "ref_id=2" in str(e.value) and "ann_id=503" in str(e.value)
    # DATALOADER.ON_BAD_SAMPLE skip: left out of the metrics and counted there (bad_samples/skipped)
    cfg.DATALOADER.ON_BAD_SAMPLE = "skip"
    rec = guard_mapper(cfg, ReferringDatasetMapper(cfg, is_train=False), False)(d)["bad_sample"]
    assert rec["ref_id"] == 2 and "empty target mask" in rec["cause"]


def test_refer_target_partly_outside_the_image_still_loads(tmp_path) -> None:
    paths = _write(tmp_path)
    _move_val_target(paths, [[-5.0, -5.0, 20.0, -5.0, 20.0, 20.0, -5.0, 20.0]])  # clipped to 20x20
    (d,) = load_refer_dataset(str(tmp_path), "refcoco", "unc", "val")
    out = ReferringDatasetMapper(_cfg(), is_train=False)(d)
    assert out["gt_mask"].shape == (30, 30) and 350 <= out["gt_mask"].sum() <= 450


def test_grefcoco_no_target_still_evaluates_and_a_target_outside_the_image_is_refused(tmp_path) -> None:
    paths = _write_gref(str(tmp_path))
    dicts = load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "val")
    (no_target,) = [d for d in dicts if d["no_target"]]
    out = ReferringDatasetMapper(_cfg(), is_train=False)(no_target)  # legitimately empty
    assert out["gt_mask"].shape == (40, 48) and not out["gt_mask"].any()

    with open(paths["instances"]) as f:
        data = json.load(f)
    (ann,) = [a for a in data["annotations"] if a["id"] == 902]  # one of the 3 targets of "all boxes"
    ann["segmentation"] = [[60.0, 5.0, 70.0, 5.0, 70.0, 20.0]]  # right of the 48-wide image
    with open(paths["instances"], "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"annotation id=902 .*wholly outside the 48x40 \(WxH\) image") as e:
        load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "val")
    assert paths["instances"] in str(e.value) and "ref_id=3" in str(e.value)


# ------------------------------------------------------------------ ReasonSeg target outside its image
def test_reasonseg_target_outside_image_is_refused_at_load_time(tmp_path) -> None:
    image_path, json_path = _write_one(tmp_path)  # a 60x40 image, two target boxes
    _patch_json(json_path, lambda a: [s.update(points=[[70, 50], [90, 50], [90, 80]]) for s in a["shapes"]
                                     if s["label"] == "target"])  # fmt: skip
    with pytest.raises(ValueError, match=r"2 polygons wholly outside the 60x40 \(WxH\) image") as e:
        load_reasonseg_dataset(str(tmp_path))
    assert json_path in str(e.value) and image_path in str(e.value)


def test_reasonseg_target_hidden_by_an_ignore_shape_is_an_error_in_evaluation(tmp_path) -> None:
    # an ignore shape equal to the only target: painted after it, it leaves no target pixel
    _, json_path = _write_one(tmp_path)

    def edit(anno):
        target = dict(next(s for s in anno["shapes"] if s["label"] == "target"))
        anno["shapes"] = [target, {**target, "label": "ignore"}]

    _patch_json(json_path, edit)
    (d,) = load_reasonseg_dataset(str(tmp_path))
    with pytest.raises(ValueError, match=r"empty target mask after rasterisation: .*a_two_targets.jpg") as e:
        ReferringDatasetMapper(_cfg(), is_train=False)(d)
    assert "image_id=a_two_targets" in str(e.value) and "query_index=0" in str(e.value)


# ------------------------------------------------------------------ panoptic PNG of another size
@pytest.fixture()
def small_png(tmp_path):
    """Two 96x128 scenes; the second one's panoptic PNG shrunk to half size."""
    images, segments = make_scenes(2)
    write_coco_panoptic_dataset(str(tmp_path), images, segments, CATEGORIES, split="train")
    name = f"test_small_png_{uuid.uuid4().hex[:8]}"
    register_coco_panoptic_folder(name, str(tmp_path), "train", overwrite=True)
    dicts = DatasetCatalog.get(name)
    png = dicts[1]["pan_seg_file_name"]
    pan = cv2.imread(png)
    cv2.imwrite(png, cv2.resize(pan, (64, 48), interpolation=cv2.INTER_NEAREST))
    yield dicts
    DatasetCatalog.remove(name)


def _assert_names_both(e, d) -> None:
    msg = str(e.value)
    assert d["pan_seg_file_name"] in msg and d["file_name"] in msg and f"image_id={d['image_id']}" in msg


def test_panoptic_png_of_another_size_is_named_in_training(small_png) -> None:
    good, bad = small_png
    mapper = COCOPanopticLSJDatasetMapper(_cfg(), is_train=True)
    assert len(mapper(dict(good))["instances"]) > 0
    with pytest.raises(ValueError, match=r"the PNG is 64x48 \(WxH\) but its image is 128x96") as e:
        mapper(dict(bad))
    _assert_names_both(e, bad)


def test_panoptic_png_of_another_size_is_named_before_its_inference(small_png) -> None:
    good, bad = small_png
    mapper = build_coco_panoptic_test_mapper(_cfg())
    out = mapper(dict(good))
    assert (out["height"], out["width"]) == (96, 128) and out["image"].shape[1:] == (24, 32)
    with pytest.raises(ValueError, match=r"the PNG is 64x48 \(WxH\) but its image is 128x96") as e:
        mapper(dict(bad))
    _assert_names_both(e, bad)
