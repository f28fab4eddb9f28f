"""X-SAM's referring data protocol on a refer-format data set written here: sentences lower-cased
and de-duplicated per object (the *_dedup splits), training samples packing every object of an
image (chunks of K, repeated as X-SAM enumerates them), prompt seeds for X-SAM's templates."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from flowseg import add_flowseg_config
from flowseg.data.dataset_mappers.referring import (
    ReferringDatasetMapper,
    group_expressions_by_image,
    split_groups_by_objects,
)
from flowseg.data.datasets.refcoco import load_refer_dataset, register_all_refer, register_refer_dataset
from flowseg.data.writers.refer import write_refer_dataset

H, W = 48, 64
# (image, sentences) per object; ann ids 11, 12, 13 (image 1), 21 (image 2)
OBJECTS = [
    (0, 11, ["The man", "the man", "man on left"]),
    (0, 12, ["A dog"]),
    (0, 13, ["red car", "Red car", "the car", "car"]),
    (1, 21, ["X", "x", "y"]),
]


def _mask(k: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[4 + 10 * k : 12 + 10 * k, 8 + 6 * k : 30 + 6 * k] = True
    return m


@pytest.fixture(scope="module")
def refer(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("refer_seg"))
    rng = np.random.default_rng(0)
    images = [{"image": rng.integers(0, 255, (H, W, 3), dtype=np.uint8)} for _ in range(2)]
    anns = [{"image_index": im, "id": ann, "mask": _mask(k)} for k, (im, ann, _) in enumerate(OBJECTS)]
    split = {0: "train", 1: "val"}
    refs = [
        {"ann_index": k, "split": split[im], "sentences": sents, "ref_id": k}
        for k, (im, _, sents) in enumerate(OBJECTS)
    ]
    write_refer_dataset(root, "refcoco", "unc", images, anns, refs)
    tag = uuid.uuid4().hex[:8]
    names = {}
    for s in ("train", "val"):
        for suffix, dedup in (("", False), ("_dedup", True)):
            names[s + suffix] = f"test_protocol_{tag}_{s}{suffix}"
            register_refer_dataset(names[s + suffix], root, "refcoco", "unc", s, dedup_sentences=dedup)
    return {"root": root, "names": names}


def test_sentences_are_lower_cased_and_deduplicated_per_object(refer):
    """A synthetic stand-in for RefCOCO val (no real data here): the de-duplicated split has fewer
    samples exactly by the repeated (case-insensitive) sentences of each object."""
    names = refer["names"]
    full, dedup = DatasetCatalog.get(names["train"]), DatasetCatalog.get(names["train_dedup"])
    assert len(full) == 8 and len(dedup) == 6
    by_ann = {}
    for d in dedup:
        by_ann.setdefault(d["ann_id"], []).append((d["expression"], d["sent_id"]))
    # sorted, lower-cased; a kept sentence has the sent_id of its first occurrence
    assert by_ann == {
        11: [("man on left", 2), ("the man", 0)],
        12: [("a dog", 3)],
        13: [("car", 7), ("red car", 4), ("the car", 6)],
    }
    assert [d["expression"] for d in DatasetCatalog.get(names["val_dedup"])] == ["x", "y"]
    assert len(DatasetCatalog.get(names["val"])) == 3
    assert MetadataCatalog.get(names["val_dedup"]).dedup_sentences
    assert load_refer_dataset(refer["root"], "refcoco", "unc", "val", dedup_sentences=True)[0]["sent_id"] == 8
    # the builtin names come in both protocols
    builtin = register_all_refer("datasets")
    assert {"refcoco_unc_val", "refcoco_unc_val_dedup", "refcocog_umd_test_dedup"} <= set(builtin)


def _item(ann, n):
    return [
        {"file_name": "x.jpg", "image_id": 1, "ann_id": ann, "expression": f"{ann}-{i}"} for i in range(n)
    ]


def test_xsam_sample_counts_and_chunks():
    """X-SAM: min(sum n_o, prod n_o) sentence combinations per image, each cut into chunks of at
    most K objects (ordered by ann id)."""
    group = group_expressions_by_image(_item(3, 2) + _item(1, 2) + _item(2, 2))
    items = split_groups_by_objects(group, 2)
    assert len(items) == 2 * min(6, 8)  # 2 chunks x 6 combinations
    assert [sorted({d["ann_id"] for d in it["expressions"]}) for it in items] == [[1, 2]] * 6 + [[3]] * 6
    one = split_groups_by_objects(group_expressions_by_image(_item(5, 1) + _item(6, 4)), 8)
    assert len(one) == min(5, 4)  # the product bounds it
    # ReasonSeg queries (no ann id): each query is its own condition, all in one sample
    queries = [
        {"file_name": "r.jpg", "image_id": "r", "expression": q, "query_index": i}
        for i, q in enumerate("abc")
    ]
    packed = split_groups_by_objects(group_expressions_by_image(queries), 8)
    assert len(packed) == 1 and len(packed[0]["expressions"]) == 3
    with pytest.raises(ValueError, match="max_objects"):
        split_groups_by_objects(group, 0)


def _cfg(*opts):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_list(["INPUT.IMAGE_SIZE", 64, *opts])
    return cfg


def test_all_objects_packing_gives_every_object_one_sentence(refer):
    dicts = DatasetCatalog.get(refer["names"]["train_dedup"])
    items = split_groups_by_objects(group_expressions_by_image(dicts), 2)
    assert len(items) == 2 * min(6, 6)
    opts = [
        "INPUT.EXPRESSIONS_PER_IMAGE",
        2,
        "INPUT.PACK_EXPRESSIONS",
        True,
        "INPUT.PACK_MODE",
        "all_objects",
    ]
    mapper = ReferringDatasetMapper(_cfg(*opts, "MODEL.LLM.PROMPT_STYLE", "xsam"), is_train=True)
    single = ReferringDatasetMapper(_cfg(), is_train=True)
    by_sent = {d["sent_id"]: d for d in dicts}
    drawn, seeds = set(), set()
    np.random.seed(0)
    for _ in range(20):
        out = mapper(items[0])
        assert out["ann_id"] == [11, 12]  # every object of the chunk, in ann-id order
        assert out["instances"].gt_classes.tolist() == [0, 1]
        for j, sent in enumerate(out["sent_id"]):
            assert torch.equal(out["instances"].gt_masks[j], single(by_sent[sent])["instances"].gt_masks[0])
        drawn.add(out["expressions"][0])
        seeds.add(out["prompt_seed"])
    assert drawn == {"man on left", "the man"} and len(seeds) > 1
    last = mapper(items[-1])
    assert last["ann_id"] == [13] and last["instances"].gt_classes.tolist() == [0]
    # evaluation: one sentence per sample, no seed (the template is a function of the text)
    val = ReferringDatasetMapper(_cfg(*opts, "MODEL.LLM.PROMPT_STYLE", "xsam"), is_train=False)
    out = val(DatasetCatalog.get(refer["names"]["val_dedup"])[0])
    assert out["expression"] == "x" and "prompt_seed" not in out
    # FlowSeg's prompts: no seed drawn (the data-loader RNG stream stays what it was)
    assert "prompt_seed" not in ReferringDatasetMapper(_cfg(*opts), is_train=True)(items[0])
    with pytest.raises(ValueError, match="PACK_MODE"):
        ReferringDatasetMapper(_cfg("INPUT.PACK_MODE", "sometimes"), is_train=True)
