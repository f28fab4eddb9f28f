"""LLaVA conversation data: json loader, registration, ConversationDatasetMapper, error messages."""

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
from flowseg.data.build import MAPPER_REGISTRY
from flowseg.data.dataset_mappers.conversation import ConversationDatasetMapper
from flowseg.data.datasets.conversation import load_llava_conversations, register_llava_dataset
from PIL import Image

# (h, w, RGB colour) of the two images
IMAGES = {"img_a.jpg": (40, 60, (200, 30, 10)), "sub/img_b.png": (30, 20, (10, 220, 90))}

SAMPLES = [
    {
        "id": "a",
        "image": "img_a.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the picture?"},
            {"from": "gpt", "value": "A red square."},
            {"from": "human", "value": "Is it <image> big?"},
            {"from": "gpt", "value": "No."},
        ],
    },
    {
        "id": 7,
        "image": "sub/img_b.png",
        "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"},
            {"from": "gpt", "value": "It is green."},
        ],
    },
    {  # text-only, OpenAI role names
        "id": "t1",
        "conversations": [
            {"from": "user", "value": "Tell me a fact."},
            {"from": "assistant", "value": "Water boils at 100 C at sea level."},
        ],
    },
]


def _write(tmp_path, samples=SAMPLES) -> tuple:
    image_root = tmp_path / "images"
    for rel, (h, w, rgb) in IMAGES.items():
        path = image_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((h, w, 3), rgb, np.uint8)).save(path, quality=100)
    json_file = tmp_path / "llava.json"
    json_file.write_text(json.dumps(samples))
    return str(json_file), str(image_root)


def _cfg(image_size: int = 64, fmt: str = "RGB"):
    cfg = add_flowseg_config(get_cfg())
    cfg.INPUT.IMAGE_SIZE = image_size
    cfg.INPUT.FORMAT = fmt
    return cfg


def test_load_llava_conversations(tmp_path):
    json_file, image_root = _write(tmp_path)
    dicts = load_llava_conversations(json_file, image_root)
    assert [d["image_id"] for d in dicts] == ["a", 7, "t1"]
    assert all(d["task"] == "conversation" for d in dicts)
    assert dicts[0]["file_name"] == os.path.join(image_root, "img_a.jpg")
    assert dicts[1]["file_name"] == os.path.join(image_root, "sub/img_b.png")
    assert dicts[2]["file_name"] is None
    assert [d["has_image"] for d in dicts] == [True, True, False]
    assert "height" not in dicts[0]  # sizes are read lazily by the mapper
    assert len(dicts[0]["conversations"]) == 4
    assert [t["from"] for t in dicts[2]["conversations"]] == ["human", "gpt"]  # roles normalised


def test_register_is_lazy_and_sets_metadata(tmp_path):
    name = f"test_llava_{uuid.uuid4().hex[:8]}"
    json_file = str(tmp_path / "later.json")
    register_llava_dataset(name, json_file, str(tmp_path / "images"))  # nothing on disk yet: fine
    meta = MetadataCatalog.get(name)
    assert meta.evaluator_type == "conversation" and meta.json_file == json_file
    with pytest.raises(FileNotFoundError, match="later.json"):
        DatasetCatalog.get(name)
    _write(tmp_path, SAMPLES)
    os.rename(tmp_path / "llava.json", json_file)
    assert [d["image_id"] for d in DatasetCatalog.get(name)] == ["a", 7, "t1"]
    register_llava_dataset(name, json_file, str(tmp_path / "images"), overwrite=True)


def test_builtin_llava_instruct_registered():
    assert "llava_instruct_150k" in DatasetCatalog.list()
    meta = MetadataCatalog.get("llava_instruct_150k")
    assert meta.json_file.endswith(os.path.join("llava", "llava_instruct_150k.json"))
    assert meta.image_root.endswith(os.path.join("coco", "train2017"))
    assert meta.evaluator_type == "conversation"


def test_mapper_outputs(tmp_path):
    json_file, image_root = _write(tmp_path)
    dicts = load_llava_conversations(json_file, image_root)
    mapper = MAPPER_REGISTRY.get("conversation")(_cfg(64, "RGB"), True)
    assert isinstance(mapper, ConversationDatasetMapper)

    out = mapper(dicts[0])
    assert out["image"].dtype == torch.uint8 and tuple(out["image"].shape) == (3, 43, 64)  # 40x60 -> long 64
    assert (out["height"], out["width"]) == (40, 60)
    assert out["task"] == "conversation" and out["has_image"] is True
    assert out["expression"] == "What is in the picture?"
    assert out["answer"] == "A red square."
    # default: first turn pair only (also in "conversations", which the head would otherwise use)
    assert out["conversations"] == [
        {"from": "human", "value": "What is in the picture?"},
        {"from": "gpt", "value": "A red square."},
    ]
    pixel = out["image"][:, 20, 30].tolist()
    assert np.allclose(pixel, [200, 30, 10], atol=6)  # RGB order, colour kept through the resize
    assert len(dicts[0]["conversations"]) == 4 and "<image>" in dicts[0]["conversations"][0]["value"]

    out_b = mapper(dicts[1])
    assert tuple(out_b["image"].shape) == (3, 64, 43)  # 30x20 upsampled, long side 64
    assert out_b["expression"] == "Describe the image." and out_b["answer"] == "It is green."

    text = mapper(dicts[2])
    assert text["has_image"] is False
    assert tuple(text["image"].shape) == (3, 32, 32) and int(text["image"].abs().sum()) == 0
    assert (text["height"], text["width"]) == (32, 32)
    assert text["expression"] == "Tell me a fact."


def test_mapper_all_turns_and_bgr(tmp_path):
    json_file, image_root = _write(tmp_path)
    dicts = load_llava_conversations(json_file, image_root)
    cfg = _cfg(32, "BGR")
    cfg.INPUT.CONVERSATION_MAX_TURNS = 0  # optional key: 0 keeps every turn
    mapper = ConversationDatasetMapper(cfg, is_train=True)
    out = mapper(dicts[0])
    assert [t["value"] for t in out["conversations"]] == [
        "What is in the picture?",
        "A red square.",
        "Is it  big?",
        "No.",
    ]
    assert out["expression"] == "What is in the picture?" and out["answer"] == "A red square."
    assert np.allclose(out["image"][:, 10, 16].tolist(), [10, 30, 200], atol=6)  # BGR


def _conv(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.mark.parametrize(
    "sample, exc, words",
    [
        ({"id": "noconv", "image": "img_a.jpg"}, ValueError, ["noconv", "conversations"]),
        ({"id": "emptyconv", "conversations": []}, ValueError, ["emptyconv", "conversations"]),
        (
            {"id": "twohumans", "conversations": _conv(("human", "a"), ("human", "b"))},
            ValueError,
            ["twohumans", "alternate"],
        ),
        (
            {"id": "gptfirst", "conversations": _conv(("gpt", "a"), ("human", "b"))},
            ValueError,
            ["gptfirst", "alternate"],
        ),
        (
            {"id": "noanswer", "conversations": _conv(("human", "a"), ("gpt", "b"), ("human", "c"))},
            ValueError,
            ["noanswer", "gpt"],
        ),
        (
            {"id": "emptyvalue", "conversations": _conv(("human", "a"), ("gpt", "  "))},
            ValueError,
            ["emptyvalue", "empty"],
        ),
        (
            {"id": "noimage", "image": "missing.jpg", "conversations": _conv(("human", "a"), ("gpt", "b"))},
            FileNotFoundError,
            ["noimage", "missing.jpg"],
        ),
        (
            {
                "id": "imagelist",
                "image": ["a.jpg", "b.jpg"],
                "conversations": _conv(("human", "a"), ("gpt", "b")),
            },
            ValueError,
            ["imagelist", "image"],
        ),
    ],
)
def test_loader_errors_name_file_and_id(tmp_path, sample, exc, words):
    json_file, image_root = _write(tmp_path, [SAMPLES[1], sample])
    with pytest.raises(exc) as info:
        load_llava_conversations(json_file, image_root)
    msg = str(info.value)
    assert json_file in msg, msg
    for w in words:
        assert w in msg, msg


def test_loader_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_llava_conversations(str(tmp_path / "nothere.json"), str(tmp_path))
    path = tmp_path / "dict.json"
    path.write_text(json.dumps({"id": "x"}))
    with pytest.raises(ValueError, match="must hold a list") as info:
        load_llava_conversations(str(path), str(tmp_path))
    assert str(path) in str(info.value)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_llava_conversations(str(path), str(tmp_path))
    json_file, _ = _write(tmp_path)
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_llava_conversations(json_file, str(tmp_path / "no_images"))


def test_mapper_missing_image_names_file_and_id(tmp_path):
    json_file, image_root = _write(tmp_path)
    dicts = load_llava_conversations(json_file, image_root)
    os.remove(dicts[1]["file_name"])
    mapper = ConversationDatasetMapper(_cfg(), is_train=True)
    with pytest.raises(FileNotFoundError) as info:
        mapper(dicts[1])
    assert "img_b.png" in str(info.value) and "image_id=7" in str(info.value)
