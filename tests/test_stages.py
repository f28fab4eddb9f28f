"""The three training stages (paper A.3) as configs: a tiny stage 1 trained through train_net.py on
the synthetic COCO-panoptic-format set, then stage 2 (projectors only) and stage 3 (BSF + BAR +
LoRA) models started from it by MODEL.WEIGHTS, with FlowSegCheckpointer's grouped load report."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Dict

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer, group_keys_by_component
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.engine import SafePeriodicCheckpointer, build_optimizer, resolve_amp
from flowseg.engine.freezing import apply_stage_freezing
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "FlowSeg"))
import train_net  # noqa: E402

STAGE1 = os.path.join(REPO, "configs", "tiny", "stage1_tiny.yaml")
STAGE2 = os.path.join(REPO, "configs", "tiny", "stage2_tiny.yaml")
STAGE3 = os.path.join(REPO, "configs", "tiny", "stage3_tiny.yaml")
LOGGER = "flowseg.checkpoint.checkpointer"
PROJECTORS = {"condition_head.vis_projector", "condition_head.llm_projector"}
# what stage 3 adds to a stage-1 segmentor
STAGE3_NEW = {
    "transformer_decoder.bsf",
    "refiner",
    "transformer_decoder.condition_logits",
    "condition_head.llm_base",
    "condition_head.lora",
    "condition_head.token_rows",
    "condition_head.projectors",
    "condition_head.vision_tower",
}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Tiny stage 1: 3 iterations of the generic segmentor on synthpan_train (31 categories)."""
    tmp = tmp_path_factory.mktemp("stages")
    d2 = tmp / "datasets"
    out = tmp / "stage1"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(d2))
        generate_synthetic_datasets(str(d2 / "synthetic"), {"train": 4, "val": 2, "test": 2}, seed=0)
        register_synthetic_datasets(str(d2 / "synthetic"))
        args = default_argument_parser().parse_args(
            ["--config-file", STAGE1]
            + ["OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "2"]
            + ["DATASETS.TEST", "()", "SEED", "0"]
        )
        train_net.main(args)
        yield {"weights": str(out / "model_final.pth"), "llm": make_tiny_llm_dir(tmp / "llm")}
    register_synthetic_datasets()  # back to the default root for the tests that follow


def _cfg(config: str, *opts: Any):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list([str(o) if not isinstance(o, bool) else o for o in opts])
    return cfg


def _stage_model(config: str, stage1: Dict[str, Any], *, lora: bool, weights: str, seed: int = 0):
    # LLM / vision tower from their "pretrained" folders, as MODEL.LLM.PATH in the real stages
    opts = tiny_llm_cfg_overrides(stage1["llm"], from_weights=True, lora=lora) + ["MODEL.WEIGHTS", weights]
    cfg = _cfg(config, *opts)
    torch.manual_seed(seed)
    return cfg, build_model(cfg)


def _load(model: torch.nn.Module, cfg) -> FlowSegCheckpointer:
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return ckpt


def _prefixes(names) -> set:
    return {".".join(n.split(".")[:2]) for n in names}


def test_stage3_from_stage1_misses_exactly_what_stage3_adds(stage1: Dict[str, Any], caplog) -> None:
    saved = torch.load(stage1["weights"], map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2  # train_net trained and saved
    assert set(group_keys_by_component(saved["model"])) == {
        "segmentation_encoder",
        "pixel_decoder",
        "transformer_decoder",
        "transformer_decoder.class_head",
    }
    cfg, model = _stage_model(STAGE3, stage1, lora=True, weights=stage1["weights"])
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = _load(model, cfg).last_report
    assert not report.unexpected and not report.incorrect_shapes
    assert set(report.missing) == STAGE3_NEW and not report.missing_unexpected  # all explained: INFO
    model_groups = group_keys_by_component(model.state_dict())
    for component in STAGE3_NEW:  # each new component is missing as a whole
        assert report.missing[component] == model_groups[component], component
    assert report.dropped == {
        "transformer_decoder.class_head": sorted(k for k in saved["model"] if ".class_embed." in k)
    }
    assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]
    info = "\n".join(r.getMessage() for r in caplog.records if r.name == LOGGER)
    assert "BSF modules" in info and "introduced in stage 3" in info and "MODEL.LLM.PATH" in info
    sd = model.state_dict()
    for k, v in saved["model"].items():
        if ".class_embed." not in k:
            assert torch.equal(sd[k], v), k


def test_stage2_trains_only_the_projectors(stage1: Dict[str, Any]) -> None:
    cfg, model = _stage_model(STAGE2, stage1, lora=False, weights=stage1["weights"])
    # without the stage's selection the new-token rows (peft) and the segmentor would train too
    default = {n for n, p in model.named_parameters() if p.requires_grad}
    assert _prefixes(default) > PROJECTORS
    trainable = apply_stage_freezing(model, cfg)
    assert _prefixes(trainable) == PROJECTORS
    projector_params = [n for n, _ in model.named_parameters() if _prefixes([n]) <= PROJECTORS]
    assert sorted(trainable) == sorted(projector_params) and len(trainable) == 8  # 2 MLPs x 2 Linear x (w, b)
    optimizer = build_optimizer(cfg, model)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(trainable)

    cfg.MODEL.FLOWSEG.TRAINABLE = ["condition_head.vis_projectr"]
    with pytest.raises(ValueError, match="vis_projectr.*match no parameter"):
        apply_stage_freezing(model, cfg)


def test_stage_chain_1_2_3_keeps_every_trained_tensor(stage1: Dict[str, Any], tmp_path) -> None:
    cfg2, stage2 = _stage_model(STAGE2, stage1, lora=False, weights=stage1["weights"])
    apply_stage_freezing(stage2, cfg2)
    report = _load(stage2, cfg2).last_report
    assert not report.unexpected and not report.missing_unexpected
    assert set(report.missing) == {
        "transformer_decoder.condition_logits",
        "condition_head.llm_base",
        "condition_head.token_rows",
        "condition_head.projectors",
        "condition_head.vision_tower",
    }
    with torch.no_grad():  # stands in for stage-2 training (its forward needs conversation batches)
        for p in stage2.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    FlowSegCheckpointer(stage2, str(tmp_path)).save("model_final")

    cfg3, stage3 = _stage_model(STAGE3, stage1, lora=True, weights=str(tmp_path / "model_final.pth"), seed=1)
    report = _load(stage3, cfg3).last_report
    assert not report.unexpected and not report.incorrect_shapes and not report.missing_unexpected
    assert set(report.missing) == {"transformer_decoder.bsf", "refiner", "condition_head.lora"}
    s2, s3 = stage2.state_dict(), stage3.state_dict()
    for k in s2:
        if k.startswith(("condition_head.vis_projector.", "condition_head.llm_projector.", "backbone.")):
            assert torch.equal(s2[k], s3[k]), k
    # stage 2's token adapter (LoRA off) and stage 3's (inside LoRA) hold the same <p>, </p>, <SEG> rows
    delta2 = [k for k in s2 if "embed_tokens" in k and "trainable_tokens_delta" in k]
    delta3 = [k for k in s3 if "embed_tokens" in k and "trainable_tokens_delta" in k]
    assert len(delta2) == len(delta3) == 1 and delta2 != delta3
    assert torch.equal(s2[delta2[0]], s3[delta3[0]])


def test_trainer_runs_stage3_from_stage1_with_flowseg_checkpointer(stage1: Dict[str, Any], tmp_path) -> None:
    opts = tiny_llm_cfg_overrides(stage1["llm"], from_weights=True, lora=True)
    opts += ["MODEL.WEIGHTS", stage1["weights"], "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", 2]
    opts += ["SOLVER.IMS_PER_BATCH", 2, "DATASETS.TEST", "()", "DATALOADER.TASK_RATIOS", [1.0, 1.0, 1.0]]
    cfg = resolve_amp(_cfg(STAGE3, *opts))
    cfg.freeze()
    trainer = train_net.Trainer(cfg)
    assert isinstance(trainer.checkpointer, FlowSegCheckpointer)
    periodic = [h for h in trainer._hooks if isinstance(h, SafePeriodicCheckpointer)]
    assert len(periodic) == 1 and periodic[0].checkpointer is trainer.checkpointer
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS = the stage-1 checkpoint
    report = trainer.checkpointer.last_report
    assert report.clean and set(report.missing) == STAGE3_NEW
    trainer.train()  # mixed referring / reasoning / panoptic batches
    final = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert {"condition_head.lora", "transformer_decoder.bsf", "refiner"} <= set(
        group_keys_by_component(final)
    )
