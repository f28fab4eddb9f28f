"""Bad input ends in an error that names the file / ids and the cause, or in a documented, logged
fallback: data in the real on-disk formats (refer, ReasonSeg labelme json, COCO panoptic), tiny
models, the demo, the checkpointer and ``DATALOADER.ON_BAD_SAMPLE``."""

from __future__ import annotations

import json
import logging
import os
import pickle
import uuid

import cv2
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer
from flowseg.checkpoint.checkpointer import CheckpointShapeError, NotACheckpointError
from flowseg.data.build import guard_mapper
from flowseg.data.dataset_mappers.coco_panoptic_lsj import (
    COCOPanopticLSJDatasetMapper,
    build_coco_panoptic_test_mapper,
)
from flowseg.data.dataset_mappers.referring import ReferringDatasetMapper
from flowseg.data.datasets.conversation import load_llava_conversations
from flowseg.data.datasets.reasonseg import load_reasonseg_dataset
from flowseg.data.datasets.refcoco import load_refer_dataset
from flowseg.data.image_io import ImageReadError, read_image
from flowseg.data.writers import register_coco_panoptic_folder, write_coco_panoptic_dataset
from flowseg.evaluation import ReferringEvaluator
from flowseg.utils.inference import check_device
from test_coco_panoptic_data import CATEGORIES, make_scenes
from test_reasonseg_data import _patch_json, _write_one
from test_refer_data import _write

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PANOPTIC_TINY = os.path.join(REPO, "configs", "tiny", "flowseg_coco_panoptic_tiny.yaml")


def _edit_refer(paths, fn_inst=None, fn_refs=None) -> None:
    if fn_inst:
        with open(paths["instances"]) as f:
            data = json.load(f)
        fn_inst(data)
        with open(paths["instances"], "w") as f:
            json.dump(data, f)
    if fn_refs:
        with open(paths["refs"], "rb") as f:
            refs = pickle.load(f)
        fn_refs(refs)
        with open(paths["refs"], "wb") as f:
            pickle.dump(refs, f)


# ------------------------------------------------------------------ 1. refer segmentations
@pytest.mark.parametrize(
    "segm, cause",
    [
        ([[]], "an empty polygon"),
        ([[1.0, 1.0, 9.0, 9.0]], "a polygon of 2 point"),
        ([[1.0, 1.0, 5.0, 5.0, 9.0, 9.0]], "a zero-area polygon"),
        ({"size": [48, 64], "counts": [3072]}, "without foreground"),
    ],
    ids=["empty", "two_points", "zero_area", "empty_rle"],
)
def test_refer_segmentation_checked_at_load_time(tmp_path, segm, cause) -> None:
    paths = _write(tmp_path)
    _edit_refer(paths, fn_inst=lambda d: d["annotations"][0].update(segmentation=segm))
    with pytest.raises(ValueError, match=cause) as e:
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")
    assert "annotation id=501" in str(e.value) and "ref_id=0" in str(e.value)
    assert paths["instances"] in str(e.value)


# ------------------------------------------------------------------ 9. <p> markers at load time
def test_unbalanced_phrase_markers_checked_at_load_time(tmp_path) -> None:
    paths = _write(tmp_path)
    _edit_refer(paths, fn_refs=lambda r: r[1]["sentences"][1].update(sent="the <p>box with a hole"))
    with pytest.raises(ValueError, match=r"sent_id=3 of ref_id=1 .*refs\(unc\)\.p.*<p> without </p>"):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")

    _, json_path = _write_one(tmp_path / "reason")
    _patch_json(json_path, lambda a: a.update(text=["fine", "where is </p> the box"]))
    with pytest.raises(ValueError, match=r"query 1 in .*</p> without <p>") as e:
        load_reasonseg_dataset(str(tmp_path / "reason"))
    assert json_path in str(e.value)


def test_model_tokens_in_expressions_checked_at_load_time(tmp_path) -> None:
    paths = _write(tmp_path)
    _edit_refer(paths, fn_refs=lambda r: r[1]["sentences"][1].update(sent="the <SEG> box with a hole"))
    with pytest.raises(
        ValueError, match=r"sent_id=3 of ref_id=1 .*refs\(unc\)\.p.*special token\(s\) <SEG> "
    ):
        load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")

    _, json_path = _write_one(tmp_path / "reason")
    _patch_json(json_path, lambda a: a.update(text=["fine", "where is the <image> box"]))
    with pytest.raises(ValueError, match=r"query 1 in .*special token\(s\) <image> ") as e:
        load_reasonseg_dataset(str(tmp_path / "reason"))
    assert json_path in str(e.value)

    llava = tmp_path / "llava.json"
    turns = [
        ("<image>\nwhat is this?", "a box"),
        ("and <SEG> here?", "a disc"),
    ]  # LLaVA's own <image> is fine
    conv = [{"from": f, "value": v} for q, a in turns for f, v in (("human", q), ("gpt", a))]
    llava.write_text(json.dumps([{"id": "s7", "conversations": conv}]))
    with pytest.raises(
        ValueError, match=r"llava\.json: sample id='s7' .*turn 2 \(human\) .*special token\(s\) <SEG> "
    ):
        load_llava_conversations(str(llava), str(tmp_path))


# ------------------------------------------------------------------ 4. encodings
def test_reasonseg_encodings_utf8_bom_cp1252_warned_shift_jis_refused(tmp_path, caplog) -> None:
    _, json_path = _write_one(tmp_path)
    with open(json_path, encoding="utf-8") as f:
        anno = json.load(f)
    anno["text"] = ["赤い箱はどこ"]
    with open(json_path, "w", encoding="utf-8-sig") as f:  # UTF-8 with a BOM
        json.dump(anno, f, ensure_ascii=False)
    with caplog.at_level(logging.WARNING):
        (d,) = load_reasonseg_dataset(str(tmp_path))
    assert d["expression"] == "赤い箱はどこ" and not [
        r for r in caplog.records if "not UTF-8" in r.getMessage()
    ]

    with open(json_path, "w", encoding="shift_jis") as f:
        json.dump(anno, f, ensure_ascii=False)
    with pytest.raises(ValueError, match="not UTF-8.*convert it to UTF-8") as e:
        load_reasonseg_dataset(str(tmp_path))
    assert json_path in str(e.value)

    anno["text"] = ["the café box"]
    with open(json_path, "w", encoding="cp1252") as f:
        json.dump(anno, f, ensure_ascii=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        (d,) = load_reasonseg_dataset(str(tmp_path))
    assert d["expression"] == "the café box"
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warned) == 1 and json_path in warned[0] and "cp1252" in warned[0] and "é" in warned[0]


@pytest.mark.parametrize(
    "text, encoding, error",
    [
        ("Größe: 5µm", "latin-1", None),
        ("crème brûlée, 5°C ±2µm ½ – “quoted” «\xa0prix\xa0»\xa0: 5\xa0€", "cp1252", None),
        ("红色的盒子在哪里", "gbk", r"\(16 non-ASCII characters in a row \('ºìÉ«µÄºÐ×ÓÔÚ'\).*as .*GBK"),
        ("アイス", "shift_jis", r"\('ƒ' at character \d+\).*as SHIFT-JIS"),
        ("the red box", "utf-16", r"is not text: control byte 0x00 at offset 3 \(binary data, or UTF-16"),
    ],
    ids=["latin1", "cp1252", "gbk", "shift_jis", "utf16"],
)
def test_reasonseg_western_8bit_text_loads_other_bytes_name_the_cause(
    tmp_path, caplog, text, encoding, error
):
    _, json_path = _write_one(tmp_path)
    with open(json_path, encoding="utf-8") as f:
        anno = json.load(f)
    anno["text"] = [text]
    with open(json_path, "w", encoding=encoding) as f:
        json.dump(anno, f, ensure_ascii=False)
    if error:
        with pytest.raises(ValueError, match=error) as e:
            load_reasonseg_dataset(str(tmp_path))
        assert json_path in str(e.value) and "convert it to UTF-8" in str(e.value)
        return
    with caplog.at_level(logging.WARNING):
        (d,) = load_reasonseg_dataset(str(tmp_path))
    assert d["expression"] == text
    warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
    assert len(warned) == 1 and json_path in warned[0] and "read it as cp1252" in warned[0]


# ------------------------------------------------------------------ 3. panoptic segments vs PNG
@pytest.fixture()
def panoptic(tmp_path):
    images, segments = make_scenes(2)
    write_coco_panoptic_dataset(str(tmp_path), images, segments, CATEGORIES, split="train")
    pan_json = os.path.join(str(tmp_path), "annotations", "panoptic_train2017.json")
    with open(pan_json) as f:
        info = json.load(f)
    info["annotations"][1]["segments_info"].append(
        {**info["annotations"][1]["segments_info"][-1], "id": 4242}
    )
    with open(pan_json, "w") as f:
        json.dump(info, f)
    name = f"test_bad_pan_{uuid.uuid4().hex[:8]}"
    register_coco_panoptic_folder(name, str(tmp_path), "train", overwrite=True)
    yield DatasetCatalog.get(name)
    DatasetCatalog.remove(name)


def test_panoptic_segment_missing_from_png_is_an_error(panoptic) -> None:
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = 64
    test_mapper = build_coco_panoptic_test_mapper(cfg)
    train_mapper = COCOPanopticLSJDatasetMapper(is_train=True, augmentations=[], image_format="RGB")
    good, bad = panoptic
    assert test_mapper(dict(good))["image"].shape[0] == 3 and len(train_mapper(dict(good))["instances"]) > 0
    for mapper in (test_mapper, train_mapper):
        with pytest.raises(
            ValueError, match=r"segments_info ids \[4242\] .*do not occur in the panoptic PNG"
        ) as e:
            mapper(dict(bad))
        assert bad["pan_seg_file_name"] in str(e.value) and f"image_id={bad['image_id']}" in str(e.value)


# ------------------------------------------------------------------ 5, 8. image files
def test_truncated_jpeg_names_the_file_and_16_bit_png_is_scaled_with_a_warning(tmp_path, caplog) -> None:
    img = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    jpg = str(tmp_path / "cut.jpg")
    cv2.imwrite(jpg, img)
    data = open(jpg, "rb").read()
    open(jpg, "wb").write(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cannot read image .*cut.jpg.*truncated"):
        read_image(jpg, "RGB")

    grey16 = np.linspace(0, 65535, 40 * 50).reshape(40, 50).astype(np.uint16)
    png = str(tmp_path / "deep.png")
    cv2.imwrite(png, grey16)
    with caplog.at_level(logging.WARNING):
        out = read_image(png, "RGB")
    expected = ((grey16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    assert out.shape == (40, 50, 3) and np.array_equal(out[..., 0], expected)
    assert (out == 255).mean() < 0.01  # Detectron2's read_image makes 99.6% of these pixels 255
    assert any("16-bit" in r.getMessage() and png in r.getMessage() for r in caplog.records)


def _refer_mapper_on_truncated_image(tmp_path):
    paths = _write(tmp_path)
    dicts = load_refer_dataset(str(tmp_path), "refcoco", "unc", "train")
    with open(dicts[0]["file_name"], "rb") as f:
        data = f.read()
    with open(dicts[0]["file_name"], "wb") as f:
        f.write(data[: len(data) // 3])
    return paths, dicts


@pytest.mark.parametrize("is_train", [True, False])
def test_on_bad_sample_error_names_the_sample_skip_lists_it(tmp_path, caplog, is_train) -> None:
    _, dicts = _refer_mapper_on_truncated_image(tmp_path)
    cfg = add_flowseg_config(get_cfg())
    cfg.OUTPUT_DIR = str(tmp_path / "out")
    mapper = ReferringDatasetMapper(cfg, is_train=is_train)
    with pytest.raises(OSError, match="cannot read image") as e:
        guard_mapper(cfg, mapper, is_train)(dicts[0])
    assert dicts[0]["file_name"] in str(e.value) and "ref_id=0" in str(e.value) and "sent_id=" in str(e.value)

    cfg.DATALOADER.ON_BAD_SAMPLE = "skip"
    with caplog.at_level(logging.WARNING):
        out = guard_mapper(cfg, mapper, is_train)(dicts[0])
    assert any(
        "skipped" in r.getMessage() and dicts[0]["file_name"] in r.getMessage() for r in caplog.records
    )
    if is_train:
        assert out is None  # the training stream draws a replacement
        (line,) = open(tmp_path / "out" / "skipped_samples_train.jsonl").read().splitlines()
        rec = json.loads(line)
    else:
        rec = out["bad_sample"]  # a placeholder the evaluation loop drops and counts
    assert rec["file_name"] == dicts[0]["file_name"] and rec["ref_id"] == 0 and "truncated" in rec["cause"]
    assert guard_mapper(cfg, mapper, is_train)(dicts[2])["expression"] == dicts[2]["expression"]
    cfg.DATALOADER.ON_BAD_SAMPLE = "ignore"
    with pytest.raises(ValueError, match="ON_BAD_SAMPLE must be one of"):
        guard_mapper(cfg, mapper, is_train)


# ------------------------------------------------------------------ 2. all-empty ground truth
def test_all_empty_ground_truth_warns_and_is_flagged(caplog) -> None:
    def run(gt_any: bool):
        ev = ReferringEvaluator("all_empty_check", distributed=False)
        ev.reset()
        for i in range(3):
            gt = np.zeros((8, 8), bool)
            gt[:2, :2] = gt_any and i == 0
            ev.process(
                [{"gt_mask": gt, "ref_id": i}], [{"ref_seg": {"mask": np.zeros((8, 8), bool), "score": 0.1}}]
            )
        return ev.evaluate()["referring"]

    with caplog.at_level(logging.WARNING):
        res = run(False)
    assert res["all_empty"] is True and res["cIoU"] == 100.0  # LISA's rule, now flagged
    assert any("ground-truth masks of all 3 samples are empty" in r.getMessage() for r in caplog.records)
    assert "all_empty" not in run(True)


# ------------------------------------------------------------------ 7, 11. checkpoints
def _panoptic_model(*opts):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(PANOPTIC_TINY)
    cfg.merge_from_list([str(o) for o in opts])
    torch.manual_seed(0)
    return cfg, build_model(cfg)


def test_checkpoint_of_another_config_is_refused_unless_partial_loading_is_asked(tmp_path, caplog) -> None:
    _, source = _panoptic_model()
    FlowSegCheckpointer(source, save_dir=str(tmp_path)).save("other")
    path = str(tmp_path / "other.pth")
    cfg, model = _panoptic_model("MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", 8)
    with pytest.raises(
        CheckpointShapeError, match="query_feat.weight: checkpoint \\(16, 64\\) vs model \\(8, 64\\)"
    ) as e:
        FlowSegCheckpointer(model, cfg=cfg).load(path)
    assert path in str(e.value) and "MODEL.WEIGHTS_PARTIAL_LOAD True" in str(e.value)
    cfg.MODEL.WEIGHTS_PARTIAL_LOAD = True
    with caplog.at_level(logging.WARNING):
        FlowSegCheckpointer(model, cfg=cfg).load(path)
    assert any("query_feat.weight" in r.getMessage() for r in caplog.records)
    sd, src = model.state_dict(), source.state_dict()
    assert torch.equal(
        sd["sem_seg_head.predictor.class_embed.weight"], src["sem_seg_head.predictor.class_embed.weight"]
    )


@pytest.mark.parametrize(
    "content", [b"hello: world\n", bytes(range(256)) * 4, b""], ids=["text", "binary", "empty"]
)
def test_file_that_is_not_a_checkpoint(tmp_path, content) -> None:
    path = str(tmp_path / "weights.pth")
    open(path, "wb").write(content)
    with pytest.raises(NotACheckpointError, match="is not a checkpoint") as e:
        FlowSegCheckpointer(torch.nn.Linear(2, 2)).resume_or_load(path, resume=False)
    assert path in str(e.value)


# ------------------------------------------------------------------ 12. MODEL.DEVICE
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_gpu_names_the_key() -> None:
    cfg = add_flowseg_config(get_cfg())
    cfg.MODEL.DEVICE = "cuda"
    with pytest.raises(ValueError, match="MODEL.DEVICE is 'cuda'.*set MODEL.DEVICE cpu"):
        check_device(cfg)
    cfg.MODEL.DEVICE = "cpu"
    check_device(cfg)
