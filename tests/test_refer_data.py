"""RefCOCO/+/g data: refer-format writer -> loader -> ReferringDatasetMapper, on tiny generated data."""

from __future__ import annotations

import json
import os
import pickle
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg.config import add_flowseg_config
from flowseg.data.build import MAPPER_REGISTRY, build_test_mapper, build_train_mapper
from flowseg.data.dataset_mappers.referring import (
    ReferringDatasetMapper,
    group_expressions_by_image,
    long_side_shape,
    rasterize_segmentation,
    swap_left_right,
)
from flowseg.data.datasets.refcoco import REFER_SPLITS, load_refer_dataset, register_refer_dataset
from flowseg.data.writers.refer import mask_to_polygons, mask_to_rle, write_refer_dataset
from PIL import Image

SIZES = [(48, 64), (60, 40), (30, 30)]  # (h, w) of the three images


def _ellipse(h: int, w: int, center, axes, angle: float = 0.0) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, center, axes, angle, 0, 360, 1, -1)
    return m.astype(bool)


def _masks() -> list:
    m0 = _ellipse(48, 64, (22, 24), (14, 9), 30.0)
    m1 = np.zeros((60, 40), bool)
    m1[10:50, 5:30] = True
    m1[20:30, 12:20] = False  # a hole: only RLE keeps it
    m2 = _ellipse(30, 30, (15, 15), (10, 6))
    m3 = np.zeros((48, 64), bool)
    m3[5:15, 40:60] = True
    return [m0, m1, m2, m3]


def _images() -> list:
    rng = np.random.default_rng(0)
    return [{"image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8)} for h, w in SIZES]


# sentences per split: train 2 + 3, val 1, testA 2, testB 1 (+ 1 ref on an empty mask, split "empty")
REFS = [
    {"ann_index": 0, "split": "train", "sentences": ["the left ellipse", "a tilted blob"]},
    {"ann_index": 1, "split": "train", "sentences": ["frame", "box with a hole", "thing on the right"]},
    {"ann_index": 2, "split": "val", "sentences": ["round thing"]},
    {"ann_index": 3, "split": "testA", "sentences": ["top right box", "small box"]},
    {"ann_index": 0, "split": "testB", "sentences": ["ellipse again"]},
    {"ann_index": 4, "split": "empty", "sentences": ["nothing here"]},
]


def _write(root: str, name: str = "refcoco", split_by: str = "unc") -> dict:
    m0, m1, m2, m3 = _masks()
    anns = [
        {"image_index": 0, "mask": m0, "category_id": 1, "id": 501},  # polygons (default)
        {"image_index": 1, "mask": m1, "category_id": 2, "format": "rle", "id": 502},
        {"image_index": 2, "mask": m2, "category_id": 1, "format": "rle_uncompressed", "id": 503},
        {"image_index": 0, "mask": m3, "category_id": 2, "id": 504},
        # a polygon wholly outside the image: rasterises to an empty mask
        {"image_index": 2, "polygons": [[-9.0, -9.0, -2.0, -9.0, -2.0, -2.0]], "category_id": 1, "id": 505},
    ]
    cats = [
        {"id": 1, "name": "blob", "supercategory": "shape"},
        {"id": 2, "name": "box", "supercategory": "shape"},
    ]
    return write_refer_dataset(str(root), name, split_by, _images(), anns, REFS, cats)


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = tmp_path_factory.mktemp("refer_seg")
    paths = _write(root)
    tag = uuid.uuid4().hex[:8]
    names = {}
    for split in ("train", "val", "testA", "testB", "empty"):
        names[split] = f"test_refer_{tag}_{split}"
        register_refer_dataset(names[split], str(root), "refcoco", "unc", split)
    return {"root": str(root), "paths": paths, "names": names, "masks": _masks()}


def _cfg(image_size: int = 32, flip: bool = False):
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = image_size
    cfg.INPUT.REFER_RANDOM_FLIP = flip
    return cfg


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return float((a & b).sum() / max((a | b).sum(), 1))


# ---------------------------------------------------------------- writer / on-disk format


def test_writer_produces_refer_layout(refer):
    root = refer["root"]
    assert os.path.isfile(os.path.join(root, "refcoco", "instances.json"))
    assert os.path.isfile(os.path.join(root, "refcoco", "refs(unc).p"))
    img_dir = os.path.join(root, "images", "mscoco", "images", "train2014")
    assert sorted(os.listdir(img_dir)) == [f"COCO_train2014_{i:012d}.jpg" for i in (1, 2, 3)]
    with open(refer["paths"]["instances"]) as f:
        inst = json.load(f)
    assert [(im["height"], im["width"]) for im in inst["images"]] == SIZES
    segs = {a["id"]: a["segmentation"] for a in inst["annotations"]}
    assert isinstance(segs[501], list) and len(segs[501][0]) >= 6  # polygon from cv2.findContours
    assert isinstance(segs[502]["counts"], str)  # compressed RLE
    assert isinstance(segs[503]["counts"], list)  # uncompressed RLE
    with open(refer["paths"]["refs"], "rb") as f:
        refs = pickle.load(f)
    assert refs[1]["ann_id"] == 502 and refs[1]["image_id"] == 2
    assert [s["sent"] for s in refs[1]["sentences"]] == REFS[1]["sentences"]
    assert refs[1]["file_name"] == "COCO_train2014_000000000002_502.jpg"


def test_mask_codecs_round_trip():
    for m in _masks():
        h, w = m.shape
        assert np.array_equal(rasterize_segmentation(mask_to_rle(m, True), h, w), m)
        assert np.array_equal(rasterize_segmentation(mask_to_rle(m, False), h, w), m)
    m0, m1 = _masks()[:2]
    assert _iou(rasterize_segmentation(mask_to_polygons(m0), 48, 64), m0) >= 0.98
    # polygons cannot carry holes: the hole is filled, the outline is exact
    filled = rasterize_segmentation(mask_to_polygons(m1), 60, 40)
    assert filled.sum() == 40 * 25 and filled[25, 15] == 1


# ---------------------------------------------------------------- loader


def test_one_sample_per_expression_and_split_filter(refer):
    n = refer["names"]
    train = DatasetCatalog.get(n["train"])
    assert len(train) == 5
    assert [d["expression"] for d in train] == REFS[0]["sentences"] + REFS[1]["sentences"]
    assert [d["ann_id"] for d in train] == [501, 501, 502, 502, 502]
    assert [d["ref_id"] for d in train] == [0, 0, 1, 1, 1]
    assert len({d["sent_id"] for d in train}) == 5
    assert len(DatasetCatalog.get(n["val"])) == 1
    assert [d["expression"] for d in DatasetCatalog.get(n["testA"])] == REFS[3]["sentences"]
    assert [d["ann_id"] for d in DatasetCatalog.get(n["testB"])] == [501]
    d = train[2]
    assert set(d) == {
        "file_name",
        "height",
        "width",
        "image_id",
        "ref_id",
        "ann_id",
        "sent_id",
        "expression",
        "task",
        "segmentation",
        "category_id",
        "split",
    }
    assert (d["height"], d["width"], d["image_id"], d["category_id"]) == (60, 40, 2, 2)
    assert d["task"] == "referring" and d["split"] == "train"
    assert d["file_name"].endswith("images/mscoco/images/train2014/COCO_train2014_000000000002.jpg")
    assert os.path.isfile(d["file_name"])
    meta = MetadataCatalog.get(n["val"])
    assert meta.evaluator_type == "refer" and meta.split == "val" and meta.split_by == "unc"


def test_builtin_names_registered_lazily():
    expected = [f"{ds}_{by}_{s}" for (ds, by), splits in REFER_SPLITS.items() for s in splits]
    assert len(expected) == 11 and "refcoco+_unc_testB" in expected and "refcocog_umd_test" in expected
    for name in expected:
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).evaluator_type == "refer"
    meta = MetadataCatalog.get("refcocog_umd_val")
    inst = os.path.join(meta.refer_root, "refcocog", "instances.json")
    if not os.path.exists(inst):  # no real data here: the error comes at get() time and names the file
        with pytest.raises(FileNotFoundError, match="instances.json"):
            DatasetCatalog.get("refcocog_umd_val")


def test_umd_pickle_name(tmp_path):
    paths = _write(tmp_path, name="refcocog", split_by="umd")
    assert paths["refs"].endswith(os.path.join("refcocog", "refs(umd).p"))
    assert len(load_refer_dataset(str(tmp_path), "refcocog", "umd", "train")) == 5


# ---------------------------------------------------------------- mapper


def test_mapper_eval_resizes_long_side_and_keeps_gt_at_original_resolution(refer):
    mapper = ReferringDatasetMapper(_cfg(32), is_train=False)
    masks = refer["masks"]
    for split, idx, expect, exact in (
        ("train", 0, masks[0], False),
        ("train", 2, masks[1], True),
        ("val", 0, masks[2], True),
        ("testA", 0, masks[3], False),
    ):
        d = DatasetCatalog.get(refer["names"][split])[idx]
        out = mapper(d)
        h, w = expect.shape
        assert out["image"].dtype == torch.uint8
        assert tuple(out["image"].shape) == (3, *long_side_shape(h, w, 32))
        assert max(out["image"].shape[1:]) == 32
        assert (out["height"], out["width"]) == (h, w)
        assert out["gt_mask"].shape == (h, w) and out["gt_mask"].dtype == np.uint8
        if exact:  # RLE: bit-exact
            assert np.array_equal(out["gt_mask"].astype(bool), expect)
        else:  # polygon round trip
            assert _iou(out["gt_mask"], expect) >= 0.98
        assert out["ignore_mask"].dtype == bool and not out["ignore_mask"].any()
        assert out["expression"] == d["expression"] and out["task"] == "referring"
        assert (out["ref_id"], out["ann_id"], out["sent_id"]) == (d["ref_id"], d["ann_id"], d["sent_id"])
        assert "instances" not in out and "segmentation" not in out
    # image content is resized, not cropped: the mean colour is preserved
    d = DatasetCatalog.get(refer["names"]["val"])[0]
    orig = np.asarray(Image.open(d["file_name"]).convert("RGB"), dtype=np.float64)
    assert abs(mapper(d)["image"].double().mean().item() - orig.mean()) < 3.0


def test_mapper_train_targets_at_resized_size(refer):
    mapper = MAPPER_REGISTRY.get("referring")(_cfg(80), True)  # upscales: 60x40 -> 80x53
    d = DatasetCatalog.get(refer["names"]["train"])[3]
    out = mapper(d)
    inst = out["instances"]
    assert inst.image_size == (80, 53) == tuple(out["image"].shape[1:])
    assert inst.gt_classes.tolist() == [0]
    assert inst.gt_masks.dtype == torch.bool and tuple(inst.gt_masks.shape) == (1, 80, 53)
    expected = np.asarray(Image.fromarray(refer["masks"][1].astype(np.uint8)).resize((53, 80), Image.NEAREST))
    assert np.array_equal(inst.gt_masks[0].numpy(), expected.astype(bool))
    ys, xs = np.nonzero(expected)
    assert inst.gt_boxes.tensor.tolist() == [[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]
    assert "gt_mask" not in out and out["flipped"] is False


def test_random_flip_swaps_left_right_only_in_training(refer):
    d = DatasetCatalog.get(refer["names"]["train"])[0]  # "the left ellipse"
    flip = ReferringDatasetMapper(
        is_train=True, image_format="RGB", image_size=64, random_flip=True, flip_prob=1.0
    )
    plain = ReferringDatasetMapper(is_train=True, image_format="RGB", image_size=64, random_flip=False)
    a, b = flip(d), plain(d)
    assert a["flipped"] and a["expression"] == "the right ellipse"
    assert torch.equal(a["image"], b["image"].flip(-1))
    assert torch.equal(a["instances"].gt_masks, b["instances"].gt_masks.flip(-1))
    test = ReferringDatasetMapper(
        is_train=False, image_format="RGB", image_size=64, random_flip=True, flip_prob=1.0
    )
    assert test(d)["expression"] == "the left ellipse"
    # the config switch reaches the mapper
    cfg = _cfg(64, flip=True)
    cfg.INPUT.DATASET_MAPPER_NAME = "referring"
    assert build_train_mapper(cfg).random_flip


def test_grouped_training_draws_expressions_of_one_image(refer):
    """EXPRESSIONS_PER_IMAGE = 2: per-image items; the mapper gives 2 distinct expressions of the
    image sharing ONE image tensor, each exactly as the per-expression mapper maps it."""
    dicts = DatasetCatalog.get(refer["names"]["train"])
    groups = group_expressions_by_image(dicts)
    assert [len(g["expressions"]) for g in groups] == [2, 3]
    assert [g["file_name"] for g in groups] == [dicts[0]["file_name"], dicts[2]["file_name"]]
    cfg = _cfg(64)
    cfg.INPUT.EXPRESSIONS_PER_IMAGE = 2
    mapper = ReferringDatasetMapper(cfg, is_train=True)
    single = ReferringDatasetMapper(_cfg(64), is_train=True)
    by_sent = {d["sent_id"]: d for d in dicts}
    seen = set()
    for _ in range(20):
        outs = mapper(groups[1])
        assert len(outs) == 2 and outs[0]["image"] is outs[1]["image"]
        assert outs[0]["sent_id"] != outs[1]["sent_id"]  # drawn without replacement
        for o in outs:
            ref = single(by_sent[o["sent_id"]])
            assert o["expression"] == ref["expression"] and torch.equal(o["image"], ref["image"])
            assert torch.equal(o["instances"].gt_masks, ref["instances"].gt_masks)
            seen.add(o["sent_id"])
    assert len(seen) == 3  # every expression of the image gets drawn
    assert len(mapper(groups[0])) == 2
    # evaluation is per expression whatever the setting
    assert not isinstance(ReferringDatasetMapper(cfg, is_train=False)(dicts[0]), list)
    with pytest.raises(ValueError, match="EXPRESSIONS_PER_IMAGE"):
        ReferringDatasetMapper(is_train=True, image_format="RGB", image_size=32, expressions_per_image=0)


def test_packed_training_sample_has_one_span_per_object(refer):
    """PACK_EXPRESSIONS: one sample per image with k ~ uniform{1..K} expressions of DIFFERENT
    objects, one <p> span and one target (class j = expression j) each."""
    from flowseg.modeling.language.prompts import build_instruction

    dicts = DatasetCatalog.get(refer["names"]["train"]) + DatasetCatalog.get(refer["names"]["testA"])
    group = group_expressions_by_image(dicts)[0]  # image 0: 2 sentences of ann 501, 2 of ann 504
    assert {d["ann_id"] for d in group["expressions"]} == {501, 504}
    cfg = _cfg(64)
    cfg.INPUT.EXPRESSIONS_PER_IMAGE = 3
    cfg.INPUT.PACK_EXPRESSIONS = True
    mapper = ReferringDatasetMapper(cfg, is_train=True)
    single = ReferringDatasetMapper(_cfg(64), is_train=True)
    by_sent = {d["sent_id"]: d for d in dicts}
    sizes = set()
    for _ in range(30):
        out = mapper(group)
        k = len(out["expressions"])
        sizes.add(k)
        assert len(set(out["ann_id"])) == k  # never two expressions of one object
        assert out["instances"].gt_classes.tolist() == list(range(k))
        for j, sent in enumerate(out["sent_id"]):
            ref = single(by_sent[sent])
            assert out["expressions"][j] == ref["expression"]
            assert torch.equal(out["instances"].gt_masks[j], ref["instances"].gt_masks[0])
        spans = ", ".join(f"<p>{e}</p>" for e in out["expressions"])
        assert build_instruction(out) == f"Please segment {spans} in this image."
    assert sizes == {1, 2}  # at most the 2 objects of the image, and single-expression prompts too
    cfg.INPUT.EXPRESSIONS_PER_IMAGE = 1
    with pytest.raises(ValueError, match="EXPRESSIONS_PER_IMAGE > 1"):
        ReferringDatasetMapper(cfg, is_train=True)
    assert not ReferringDatasetMapper(cfg, is_train=False).pack_expressions  # evaluation: never packed


def test_swap_left_right():
    assert (
        swap_left_right("Left man, rightmost cup, RIGHT-hand side, bright lefty")
        == "Right man, leftmost cup, LEFT-hand side, bright lefty"
    )


def test_test_mapper_chosen_by_evaluator_type(refer):
    mapper = build_test_mapper(_cfg(32), refer["names"]["val"])
    assert isinstance(mapper, ReferringDatasetMapper) and not mapper.is_train


def test_empty_target_is_refused_at_load_time(refer):
    # training and evaluation alike: scored, an empty target is "right" for an empty prediction
    with pytest.raises(ValueError, match=r"annotation id=505 .*ref_id=5.* wholly outside the 30x30"):
        DatasetCatalog.get(refer["names"]["empty"])


# ---------------------------------------------------------------- errors name the file and id


def _edit_json(path: str, fn) -> None:
    with open(path) as f:
        data = json.load(f)
    fn(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _edit_refs(path: str, fn) -> None:
    with open(path, "rb") as f:
        refs = pickle.load(f)
    fn(refs)
    with open(path, "wb") as f:
        pickle.dump(refs, f)


def test_missing_files_raise_file_not_found(tmp_path):
    paths = _write(tmp_path)
    os.remove(paths["refs"])
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p"):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")
    with pytest.raises(FileNotFoundError, match="instances.json"):
        load_refer_dataset(str(tmp_path), "refcoco+", "unc", "train")
    paths = _write(tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_images"):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train", str(tmp_path / "no_such_images"))


def _set_ann(refs, ref_index, ann_id):
    refs[ref_index]["ann_id"] = ann_id


@pytest.mark.parametrize(
    "edit_refs,edit_inst,pattern",
    [
        (lambda r: _set_ann(r, 1, 999), None, r"ref_id=1 in .*refs\(unc\)\.p.*ann_id=999.*instances\.json"),
        (
            lambda r: r[1]["sentences"][2].update(sent="", raw=" "),
            None,
            r"sentence 2 \(sent_id=4\) of ref_id=1 in .*refs\(unc\)\.p has no text",
        ),
        (
            None,
            lambda d: d["annotations"][1].pop("segmentation"),
            r"annotation id=502 in .*instances\.json \(ref_id=1\) has no segmentation",
        ),
        (None, lambda d: d["images"].pop(1), r"image id=2 \(ref_id=1, ann_id=502\) .*instances\.json"),
        (
            lambda r: [x.update(split="val") for x in r if x["split"] == "train"],
            None,
            r"split 'train' has no refs in .*refs\(unc\)\.p",
        ),
    ],
    ids=["ann_missing", "empty_sentence", "no_segmentation", "image_missing", "empty_split"],
)
def test_malformed_entries_raise_value_error(tmp_path, edit_refs, edit_inst, pattern):
    paths = _write(tmp_path)
    if edit_refs:
        _edit_refs(paths["refs"], edit_refs)
    if edit_inst:
        _edit_json(paths["instances"], edit_inst)
    name = f"test_refer_bad_{uuid.uuid4().hex[:8]}"
    register_refer_dataset(name, str(tmp_path), "refcoco", "unc", "train")  # lazy: no error yet
    with pytest.raises(ValueError, match=pattern):
        DatasetCatalog.get(name)


def test_invalid_json_or_pickle_names_file(tmp_path):
    paths = _write(tmp_path)
    with open(paths["instances"], "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"instances\.json is not valid JSON"):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")
    paths = _write(tmp_path)
    with open(paths["refs"], "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ValueError, match=r"cannot unpickle .*refs\(unc\)\.p"):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")
