"""gRefCOCO (GRES) data: the published on-disk layout -> loader -> referring mapper, and the
synthetic multi-target / no-target expressions."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg.config import add_flowseg_config
from flowseg.data.build import build_test_mapper, build_train_mapper
from flowseg.data.dataset_mappers.referring import ReferringDatasetMapper, group_expressions_by_image
from flowseg.data.datasets.grefcoco import (
    load_grefcoco_dataset,
    register_all_grefcoco,
    register_grefcoco_dataset,
)
from flowseg.data.mixed import EVALUATOR_TYPE_TO_TRAIN_MAPPER
from flowseg.data.synthetic.gres import COUNT_WORDS, gres_expressions, render_group
from flowseg.data.synthetic.scenes import generate_scene, resolve
from flowseg.data.writers.grefer import write_grefcoco_dataset

H, W = 40, 48


def _boxes() -> list:
    """Four objects: three in image 0, one in image 1."""
    masks = []
    for y0, y1, x0, x1 in ((2, 12, 2, 14), (20, 34, 4, 16), (5, 30, 30, 44), (10, 20, 10, 20)):
        m = np.zeros((H, W), bool)
        m[y0:y1, x0:x1] = True
        masks.append(m)
    return masks


REFS = [
    {
        "ann_indices": [0, 1],
        "image_index": 0,
        "split": "train",
        "sentences": ["the two left boxes", "all left boxes"],
    },
    {"ann_indices": [2], "image_index": 0, "split": "train", "sentences": ["the right box"]},
    {"ann_indices": [], "image_index": 0, "split": "train", "sentences": ["the purple hexagon"]},
    {"ann_indices": [0, 1, 2], "image_index": 0, "split": "val", "sentences": ["all boxes"]},
    {"ann_indices": [], "image_index": 1, "split": "val", "sentences": ["the dog"]},
    {"ann_indices": [3], "image_index": 1, "split": "testA", "sentences": ["the box"]},
    {"ann_indices": [], "image_index": 1, "split": "testB", "sentences": ["the cat"]},
]


def _write(root: str, refs=REFS) -> dict:
    rng = np.random.default_rng(0)
    images = [{"image": rng.integers(0, 255, (H, W, 3), dtype=np.uint8)} for _ in range(2)]
    anns = [
        {"image_index": 0 if i < 3 else 1, "mask": m, "category_id": 1, "format": "rle", "id": 900 + i}
        for i, m in enumerate(_boxes())
    ]
    return write_grefcoco_dataset(os.path.join(root, "refer_seg"), "grefcoco", "unc", images, anns, refs)


@pytest.fixture(scope="module")
def gref(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("datasets"))
    return {"root": root, "paths": _write(root)}


def _cfg(image_size: int = 48):
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = image_size
    return cfg


def test_writer_produces_the_published_grefcoco_layout(gref):
    refer_root = os.path.join(gref["root"], "refer_seg")
    assert os.path.isfile(os.path.join(refer_root, "grefcoco", "grefs(unc).json"))
    assert os.path.isfile(os.path.join(refer_root, "grefcoco", "instances.json"))
    with open(gref["paths"]["refs"]) as f:
        refs = json.load(f)
    assert refs[0]["ann_id"] == [900, 901] and refs[0]["no_target"] is False
    # a no-target ref: ann_id [-1], category_id [-1], no_target true
    assert refs[2]["ann_id"] == [-1] and refs[2]["category_id"] == [-1] and refs[2]["no_target"] is True


def test_builtin_names_read_the_layout_under_the_datasets_root(gref):
    # register_all_grefcoco registers grefcoco_unc_* under a root; use a copy of the names' loader
    names = register_all_grefcoco(gref["root"])
    assert names == [f"grefcoco_unc_{s}" for s in ("train", "val", "testA", "testB")]
    assert MetadataCatalog.get("grefcoco_unc_val").evaluator_type == "gres"
    d = load_grefcoco_dataset(os.path.join(gref["root"], "refer_seg"), "grefcoco", "unc", "val")
    assert [x["expression"] for x in d] == ["all boxes", "the dog"]


def test_loader_several_targets_and_no_target(gref):
    d = load_grefcoco_dataset(os.path.join(gref["root"], "refer_seg"), "grefcoco", "unc", "train")
    assert [x["expression"] for x in d] == [
        "the two left boxes",
        "all left boxes",
        "the right box",
        "the purple hexagon",
    ]
    assert [x["ann_ids"] for x in d] == [[900, 901], [900, 901], [902], []]
    assert [x["no_target"] for x in d] == [False, False, False, True]
    assert [len(x["segmentations"]) for x in d] == [2, 2, 1, 0]
    assert all(x["multi_target"] and x["task"] == "referring" for x in d)
    assert d[0]["sent_id"] != d[1]["sent_id"] and d[0]["ref_id"] == d[1]["ref_id"]


def test_a_single_ann_id_may_be_a_number(tmp_path):
    paths = _write(str(tmp_path))
    with open(paths["refs"]) as f:
        refs = json.load(f)
    refs[1]["ann_id"] = 902  # the refer-style spelling of one target
    with open(paths["refs"], "w") as f:
        json.dump(refs, f)
    d = load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "train")
    assert d[2]["ann_ids"] == [902] and len(d[2]["segmentations"]) == 1


def test_test_mapper_gives_the_union_and_an_empty_mask(gref):
    tag = uuid.uuid4().hex[:8]
    register_grefcoco_dataset(f"g_{tag}", os.path.join(gref["root"], "refer_seg"), "grefcoco", "unc", "val")
    mapper = build_test_mapper(_cfg(), f"g_{tag}")
    assert isinstance(mapper, ReferringDatasetMapper) and not mapper.is_train
    all_boxes, dog = (mapper(dict(x)) for x in DatasetCatalog.get(f"g_{tag}"))
    m = _boxes()
    assert np.array_equal(all_boxes["gt_mask"].astype(bool), m[0] | m[1] | m[2])
    assert not dog["gt_mask"].any() and dog["gt_mask"].shape == (H, W) and dog["no_target"]
    assert "segmentations" not in all_boxes  # annotations become masks, not model inputs


def test_train_mapper_one_instance_per_target_all_of_condition_zero(gref):
    d = load_grefcoco_dataset(os.path.join(gref["root"], "refer_seg"), "grefcoco", "unc", "train")
    mapper = ReferringDatasetMapper(_cfg(96), is_train=True)  # 2x upscale
    multi, single, empty = mapper(dict(d[0])), mapper(dict(d[2])), mapper(dict(d[3]))
    inst = multi["instances"]
    assert inst.gt_classes.tolist() == [0, 0] and inst.gt_masks.shape == (2, 80, 96)
    m = _boxes()
    for k in range(2):  # each target keeps its own mask (nearest resize: exact 2x)
        assert torch.equal(inst.gt_masks[k], torch.from_numpy(np.kron(m[k], np.ones((2, 2), bool))))
    assert single["instances"].gt_classes.tolist() == [0]
    assert len(empty["instances"]) == 0 and empty["instances"].gt_masks.shape == (0, 80, 96)
    assert empty["instances"].gt_boxes.tensor.shape == (0, 4)


def test_packed_prompt_labels_every_target_with_its_expression_and_never_shares_an_object(gref):
    d = load_grefcoco_dataset(os.path.join(gref["root"], "refer_seg"), "grefcoco", "unc", "train")
    (image,) = group_expressions_by_image(d)
    cfg = _cfg()
    cfg.INPUT.EXPRESSIONS_PER_IMAGE, cfg.INPUT.PACK_EXPRESSIONS = 4, True
    cfg.INPUT.DATASET_MAPPER_NAME = EVALUATOR_TYPE_TO_TRAIN_MAPPER["gres"]
    mapper = build_train_mapper(cfg)
    seen_three = False
    for seed in range(30):
        np.random.seed(seed)
        out = mapper(image)
        texts = out["expressions"]
        # "the two left boxes" and "all left boxes" denote the same objects: never packed together
        assert not {"the two left boxes", "all left boxes"} <= set(texts)
        expected = []
        for j, t in enumerate(texts):
            expected += [j] * {"the right box": 1, "the purple hexagon": 0}.get(t, 2)
        assert out["instances"].gt_classes.tolist() == expected
        seen_three |= len(texts) == 3
    assert seen_three  # a multi-target, a single-target and a no-target expression in one prompt
    assert EVALUATOR_TYPE_TO_TRAIN_MAPPER["gres"] == "referring"


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r[0].update(ann_id=[900, 999]), "ann_id=999, which is not in"),
        (lambda r: r[0].update(no_target=True), "has no_target=True but ann_id="),
        (lambda r: r[2].update(no_target=False), "has no_target=False but ann_id="),
        (lambda r: r[0].update(ann_id=[900, 900]), "lists an ann_id twice"),
        (lambda r: r[5].update(split="train", ann_id=[900]), "has image_id=2 but its ann_id=900"),
        (lambda r: r[0].pop("ann_id"), "has no 'ann_id'"),
        (lambda r: r[0].update(sentences=[]), "has no sentences"),
        (lambda r: r[0].update(sentences=[{"sent_id": 5}]), r"sentence 0 \(sent_id=5\)"),
        (lambda r: r[0].update(image_id=77), "image id=77"),
    ],
)
def test_malformed_entries_are_named_errors(tmp_path, edit, match):
    paths = _write(str(tmp_path))
    with open(paths["refs"]) as f:
        refs = json.load(f)
    edit(refs)
    if refs[0].get("image_id") == 77:  # keep the image check reachable: its anns must agree
        refs[0]["ann_id"] = [-1]
        refs[0]["no_target"] = True
    with open(paths["refs"], "w") as f:
        json.dump(refs, f)
    with pytest.raises(ValueError, match=match) as err:
        load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "train")
    assert "ref_id=" in str(err.value) or "image id=" in str(err.value)


def test_missing_or_broken_files_are_named(tmp_path):
    paths = _write(str(tmp_path))
    with pytest.raises(ValueError, match="split 'nope' has no refs"):
        load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "nope")
    with open(paths["refs"], "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=r"grefs\(unc\).json is not valid JSON"):
        load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "train")
    os.remove(paths["refs"])
    with pytest.raises(FileNotFoundError, match=r"refs file not found: .*grefs\(unc\).json"):
        load_grefcoco_dataset(paths["refer_root"], "grefcoco", "unc", "train")


# ---------------------------------------------------------------- synthetic GRES expressions


def test_synthetic_group_expressions_denote_exactly_their_targets():
    rng = np.random.default_rng(5)
    kinds = set()
    for _ in range(40):
        scene = generate_scene(rng, image_size=96)
        exprs = gres_expressions(scene, rng, 0.08 * 96)
        assert len({e.text for e in exprs}) == len(exprs)
        for e in exprs:
            kinds.add(e.kind)
            assert resolve(e.program, scene.objects, 0.08 * 96) == e.targets, e.text
            if e.kind == "multi":
                assert len(e.targets) >= 2 and e.text.split()[0] in ("the", "all")
            if e.kind == "no_target":
                assert e.targets == [] and e.text.startswith("the ")
                colour, shape = e.text.split()[1:]
                hard = [
                    (s, c)
                    for s in {o.shape for o in scene.objects}
                    for c in {o.colour for o in scene.objects}
                    if not any(o.shape == s and o.colour == c for o in scene.objects)
                ]
                # both words occur in the scene (on other objects) whenever such a pair exists
                assert (shape, colour) in hard or not hard
    assert kinds == {"single", "multi", "no_target"}
    assert render_group({"shape": "circle", "colour": "red", "size": None}, 2, True) == "the two red circles"
    assert render_group({"shape": "star", "colour": None, "size": None}, 3, False) == "all stars"
    assert (
        render_group({"shape": None, "colour": "purple", "size": "small"}, 2, False)
        == "all small purple shapes"
    )


def test_synthgref_round_trip_leaves_the_other_synthetic_files_alone(tmp_path):
    from flowseg.data.synthetic import generate_synthetic_datasets
    from flowseg.data.synthetic.generate import generate_split
    from flowseg.data.synthetic.gres import generate_synthgref_datasets, register_synthgref_datasets

    sizes, root = {"train": 3, "val": 3, "test": 2}, str(tmp_path)
    generate_synthetic_datasets(root, sizes, seed=5, image_size=64)

    def snapshot() -> dict:
        files = {}
        for dirpath, _, names in os.walk(root):
            for n in names:
                with open(os.path.join(dirpath, n), "rb") as f:
                    files[os.path.relpath(os.path.join(dirpath, n), root)] = f.read()
        return files

    before = snapshot()
    manifest = generate_synthgref_datasets(root, sizes, seed=5, image_size=64)
    after = snapshot()
    assert {k: after[k] for k in before} == before  # existing files byte-identical, only additions
    assert any(k.startswith(os.path.join("refer_seg", "synthgref")) for k in after)
    mtime = os.stat(manifest).st_mtime_ns
    generate_synthgref_datasets(root, sizes, seed=5, image_size=64)  # cached: nothing rewritten
    assert os.stat(manifest).st_mtime_ns == mtime

    register_synthgref_datasets(root)
    train, val = (generate_split(s, sizes[s], seed=5, image_size=64) for s in ("train", "val"))
    grefs = DatasetCatalog.get("synthgref_val")
    assert MetadataCatalog.get("synthgref_val").evaluator_type == "gres"
    assert {d["no_target"] for d in grefs} == {True, False}
    assert max(len(d["ann_ids"]) for d in grefs) >= 2
    # annotation ids count the objects scene by scene from 1 (train scenes first)
    first_id = 1 + sum(len(s.objects) for s in train)
    offsets = {}
    for i, d in enumerate(sorted({d["image_id"] for d in grefs})):
        offsets[d] = first_id + sum(len(s.objects) for s in val[:i])
    mapper = ReferringDatasetMapper(_cfg(64), is_train=False)
    for d in grefs:
        scene = val[sorted(offsets).index(d["image_id"])]
        objs = [scene.objects[a - offsets[d["image_id"]]] for a in d["ann_ids"]]
        expected = np.zeros((64, 64), bool)
        for o in objs:
            expected |= o.mask
        assert np.array_equal(mapper(dict(d))["gt_mask"].astype(bool), expected), d["expression"]
        words = d["expression"].split()
        if d["no_target"]:  # "the <colour> <shape>" that no object is
            assert not any(o.colour == words[1] and o.shape == words[2] for o in scene.objects)
        elif len(objs) > 1:  # "the two red circles" / "all red circles": the count and the noun
            assert words[0] == "all" or words[1] == COUNT_WORDS[len(objs)]
            noun = words[-1][:-1]
            assert noun == "shape" or all(o.shape == noun for o in objs)
        # the same picture as the single-target split's
        name = os.path.basename(d["file_name"])
        with (
            open(d["file_name"], "rb") as f,
            open(os.path.join(root, "refer_seg/images/synthref", name), "rb") as g,
        ):
            assert f.read() == g.read()
