"""``train_net.py --eval-only`` refuses a checkpoint that leaves parts the task needs at their
initialisation (a stage-1 segmentor checkpoint for a referring config, a referring checkpoint
for the stage-1 panoptic config), naming them; ``TEST.ALLOW_UNTRAINED_PARTS`` evaluates anyway."""

from __future__ import annotations

import logging
import os
import sys

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer, UntrainedPartsError, check_evaluation_weights
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "FlowSeg"))
import train_net  # noqa: E402

REFER = os.path.join(REPO, "configs", "tiny", "flowseg_refer_tiny.yaml")
STAGE1 = os.path.join(REPO, "configs", "tiny", "stage1_tiny.yaml")


def _cfg(config, opts):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(config)
    cfg.merge_from_list([str(o) for o in opts])
    return cfg


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A stage-1 (segmentor-only) and a referring checkpoint of the tiny configs (full state dicts)."""
    tmp = tmp_path_factory.mktemp("eval_weights")
    llm = tiny_llm_cfg_overrides(make_tiny_llm_dir(tmp / "llm")) + ["MODEL.LLM.LORA.ENABLED", False]
    torch.manual_seed(0)
    for name, config, opts in (("stage1", STAGE1, []), ("referring", REFER, llm)):
        DetectionCheckpointer(build_model(_cfg(config, opts)), save_dir=str(tmp)).save(name)
    return {"tmp": tmp, "llm": [str(o) for o in llm]}


def _eval_only(config, weights, opts, out):
    argv = ["--config-file", config, "--eval-only", "MODEL.WEIGHTS", str(weights), "OUTPUT_DIR", str(out)]
    return train_net.main(default_argument_parser().parse_args(argv + [str(o) for o in opts]))


def test_stage1_checkpoint_for_referring_eval_only_names_the_untrained_parts(ckpts) -> None:
    weights = ckpts["tmp"] / "stage1.pth"
    with pytest.raises(UntrainedPartsError) as e:
        _eval_only(REFER, weights, ckpts["llm"], ckpts["tmp"] / "out_r")
    msg = str(e.value)
    assert str(weights) in msg and "TEST.ALLOW_UNTRAINED_PARTS True" in msg
    for part in (
        "condition head / LLM base weights: 25 keys",
        "condition head / vision tower: 32 keys",
        "condition head / projectors",
        "transformer decoder / condition-logit head",
    ):
        assert part in msg, msg
    # the segmentor came from the checkpoint: not listed
    assert "segmentation encoder" not in msg and "pixel decoder" not in msg


def test_referring_checkpoint_for_panoptic_eval_only_names_the_class_head(ckpts) -> None:
    weights = ckpts["tmp"] / "referring.pth"
    with pytest.raises(
        UntrainedPartsError, match=r"transformer decoder / class head \(class_embed\): 2 keys"
    ):
        _eval_only(STAGE1, weights, [], ckpts["tmp"] / "out_p")


def test_matching_checkpoint_passes_and_the_option_allows_untrained_parts(ckpts, caplog) -> None:
    cfg = _cfg(REFER, ckpts["llm"])
    model = build_model(cfg)
    checkpointer = FlowSegCheckpointer(model, cfg=cfg)
    checkpointer.load(str(ckpts["tmp"] / "referring.pth"))
    assert check_evaluation_weights(model, cfg, checkpointer.last_report) == {}
    with pytest.raises(UntrainedPartsError, match=r"no checkpoint \(MODEL.WEIGHTS is empty\)"):
        check_evaluation_weights(model, cfg, None)  # nothing loaded: every part at its initialisation

    checkpointer.load(str(ckpts["tmp"] / "stage1.pth"))
    cfg.TEST.ALLOW_UNTRAINED_PARTS = True
    with caplog.at_level(logging.WARNING):
        parts = check_evaluation_weights(model, cfg, checkpointer.last_report)
    assert len(parts["condition_head.llm_base"]) == 25 and len(parts["condition_head.vision_tower"]) == 32
    assert any("TEST.ALLOW_UNTRAINED_PARTS" in r.getMessage() for r in caplog.records)
