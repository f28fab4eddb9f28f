"""Stage 2 in miniature: LLaVA-format conversations written about a referring data set's scenes
(known answers on a hand-made folder in the real refer layout), registered and read by the real
conversation loader, and the synthetic stage-2 config: stage-1 weights load, only the language
side trains, its LM loss goes down, and stage 3 starts from what it learnt."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer
from flowseg.data.dataset_mappers.conversation import ConversationDatasetMapper
from flowseg.data.datasets.conversation import register_all_llava
from flowseg.data.datasets.refcoco import register_refer_dataset
from flowseg.data.writers.refer import write_refer_dataset
from flowseg.data.writers.scene_conversations import (
    place_phrase,
    scene_conversations,
    write_scene_conversations,
)
from flowseg.engine.freezing import apply_stage_freezing, trainable_parameter_names
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

SYNTH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic")


def test_place_phrase_grid():
    assert place_phrase(0.1, 0.1) == "at the top left"
    assert place_phrase(0.5, 0.1) == "at the top"
    assert place_phrase(0.9, 0.5) == "on the right"
    assert place_phrase(0.5, 0.5) == "in the centre"
    assert place_phrase(0.2, 0.99) == "at the bottom left"
    assert place_phrase(1.0, 1.0) == "at the bottom right"  # the far edge stays in the grid


def _write_folder(root, fmt: str = "rle") -> str:
    """Two images in the refer layout: image 0 has a small box at the top left (2 expressions)
    and a large one at the bottom right; image 1 one large box in the centre. ``fmt``: how the
    instances json stores the masks (``polygon`` as the real RefCOCO, or RLE)."""
    masks = [np.zeros((60, 60), bool) for _ in range(3)]
    masks[0][2:10, 3:11] = True  # 64 px of 3600: small; centre (7, 6)
    masks[1][30:58, 32:58] = True  # 728 px: large; centre (45, 44)
    masks[2][15:45, 15:45] = True
    images = [{"image": np.full((60, 60, 3), 90 + 40 * i, np.uint8)} for i in range(2)]
    anns = [
        {"image_index": i, "mask": m, "category_id": c, "format": fmt}
        for i, m, c in ((0, masks[0], 1), (0, masks[1], 2), (1, masks[2], 1))
    ]
    refs = [
        {"ann_index": 0, "split": "train", "sentences": ["the little red one", "top left thing"]},
        {"ann_index": 1, "split": "train", "sentences": ["the big box"]},
        {"ann_index": 2, "split": "train", "sentences": ["the red square"]},
    ]
    cats = [{"id": 1, "name": "red square"}, {"id": 2, "name": "blue box"}]
    write_refer_dataset(str(root / "refer_seg"), "toyref", "unc", images, anns, refs, cats)
    name = f"toyref_{uuid.uuid4().hex[:8]}_train"
    register_refer_dataset(name, str(root / "refer_seg"), "toyref", "unc", "train")
    return name


@pytest.mark.parametrize("fmt", ["polygon", "rle", "rle_uncompressed"])
def test_conversations_of_a_refer_folder_known_answers(tmp_path, fmt):
    name = _write_folder(tmp_path, fmt)
    stored = json.load(open(tmp_path / "refer_seg" / "toyref" / "instances.json"))["annotations"]
    assert isinstance(stored[0]["segmentation"], list if fmt == "polygon" else dict)
    json_file = write_scene_conversations(name, str(tmp_path))
    assert json_file == os.path.join(tmp_path, "scene_conversations", f"{name}.json")
    by_question = {}
    for s in json.load(open(json_file)):
        human, gpt = s["conversations"]
        by_question.setdefault(s["image"], {})[human["value"]] = gpt["value"]
    assert len(by_question) == 2
    first, second = (by_question[k] for k in sorted(by_question))
    assert first == {
        "<image>\nDescribe the image.": "a small red square at the top left, a large blue box at the bottom right",
        "<image>\nWhere is the little red one?": "a small red square at the top left",
        "<image>\nWhere is top left thing?": "a small red square at the top left",
        "<image>\nWhere is the big box?": "a large blue box at the bottom right",
    }
    assert second["<image>\nWhere is the red square?"] == "a large red square in the centre"

    # a fresh registration pass (as importing flowseg does) finds the file; the loader and the
    # mapper read it with its images
    DatasetCatalog.remove(f"{name}_conversations")
    MetadataCatalog.remove(f"{name}_conversations")
    assert f"{name}_conversations" in register_all_llava(str(tmp_path))
    dicts = DatasetCatalog.get(f"{name}_conversations")
    assert len(dicts) == 6 and all(os.path.isfile(d["file_name"]) for d in dicts)
    cfg = add_flowseg_config(get_cfg())
    out = ConversationDatasetMapper(cfg, True)(dicts[0])
    assert out["expression"] == "Describe the image." and out["image"].shape[0] == 3


def test_unknown_category_is_named():
    records = [
        {"file_name": "/x/a.jpg", "ann_id": 5, "category_id": 9, "expression": "it", "segmentation": None}
    ]
    with pytest.raises(ValueError, match="ann_id 5 has category 9"):
        scene_conversations(records, {1: "cat"}, "/x")


def _cfg(name: str, *opts):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(os.path.join(SYNTH, name))
    cfg.merge_from_list([str(o) for o in opts] + ["MODEL.DEVICE", "cpu"])
    return cfg


def _conversation_batch(n: int = 4) -> list:
    g = torch.Generator().manual_seed(0)
    answers = ["a small red circle at the top left", "a large blue star in the centre"]
    return [
        {
            "image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8, generator=g),
            "task": "conversation",
            "has_image": True,
            "conversations": [
                {"from": "human", "value": "Where is the red circle?"},
                {"from": "gpt", "value": answers[i % 2]},
            ],
        }
        for i in range(n)
    ]


def test_stage2_config_trains_the_language_side_and_stage3_starts_from_it(tmp_path):
    llm = make_tiny_llm_dir(tmp_path / "llm")
    lang = [*tiny_llm_cfg_overrides(llm), "MODEL.LLM.LORA.ENABLED", False]
    torch.manual_seed(0)
    stage1 = build_model(_cfg("stage1_synthpan_cpu.yaml"))
    FlowSegCheckpointer(stage1, save_dir=str(tmp_path)).save("stage1")

    cfg = _cfg("stage2_synthconv_cpu.yaml", *lang, "MODEL.WEIGHTS", tmp_path / "stage1.pth")
    model = build_model(cfg)
    FlowSegCheckpointer(model, cfg=cfg).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    apply_stage_freezing(model, cfg)
    trainable = trainable_parameter_names(model)
    assert trainable and all(
        n.startswith(
            ("condition_head.llm.", "condition_head.vision_encoder.", "condition_head.vis_projector.")
        )
        for n in trainable
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    batch, losses = _conversation_batch(), []
    for _ in range(15):
        loss = model(batch)["loss_llm"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses
    for k, v in stage1.state_dict().items():  # the segmentor did not move
        if k in model.state_dict() and not k.startswith("condition_head"):
            assert torch.equal(model.state_dict()[k], v), k

    FlowSegCheckpointer(model, save_dir=str(tmp_path), cfg=cfg).save("stage2")
    cfg3 = _cfg("flowseg_synthref_cpu.yaml", *lang, "MODEL.WEIGHTS", tmp_path / "stage2.pth")
    model3 = build_model(cfg3)
    FlowSegCheckpointer(model3, cfg=cfg3).resume_or_load(cfg3.MODEL.WEIGHTS, resume=False)
    state3 = model3.state_dict()
    for k, v in model.state_dict().items():
        if k.startswith(("condition_head.llm.", "condition_head.vision_encoder.")):
            assert torch.equal(state3[k], v), k
