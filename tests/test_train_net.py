"""train_net.py and flowseg.engine: optimizer groups, evaluator wiring, metrics JSON, NaN guard,
and end-to-end training / resume / eval-only of the tiny COCO-panoptic config on CPU.

The end-to-end data set is written in the real COCO layout with COCO's 133 categories (objects
are "person" / "car" boxes and ellipses on a "wall-other-merged" background), so that the
subprocess run can find it under the builtin name ``coco_2017_train_panoptic_with_sem_seg`` via
``$DETECTRON2_DATASETS``, exactly as a user's COCO would be found.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Any, Dict, List

import flowseg  # noqa: F401
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.engine import default_argument_parser
from detectron2.evaluation import COCOEvaluator, COCOPanopticEvaluator, DatasetEvaluators, SemSegEvaluator
from flowseg import add_flowseg_config
from flowseg.data.writers import register_coco_panoptic_folder, write_coco_panoptic_dataset
from flowseg.engine import (
    NonFiniteLossError,
    SafePeriodicCheckpointer,
    build_evaluator,
    build_optimizer,
    check_losses_finite,
    check_num_classes,
    resolve_amp,
    write_metrics_json,
)
from test_coco_panoptic_data import make_scenes  # tests/ is on sys.path (rootdir conftest)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "projects", "FlowSeg"))
import train_net  # noqa: E402

TINY = os.path.join(REPO, "configs", "tiny", "flowseg_coco_panoptic_tiny.yaml")
TRAIN_ITERS = 160
STUFF_ID = next(c["id"] for c in COCO_CATEGORIES if c["name"] == "wall-other-merged")


def _cfg():
    cfg = get_cfg()
    add_flowseg_config(cfg)
    return cfg


def _args(opts: List[str], **flags: Any):
    argv = ["--config-file", TINY]
    if flags.get("resume"):
        argv.append("--resume")
    if flags.get("eval_only"):
        argv.append("--eval-only")
    return default_argument_parser().parse_args(argv + [str(o) for o in opts])


def _write_coco_scenes(coco_root: str, n: int = 8, seed: int = 1) -> Dict[str, Any]:
    images, segments = make_scenes(n, seed=seed)
    for segs in segments:
        for s in segs:
            if s["category_id"] == 7:  # the scenes' background stuff -> a COCO stuff class
                s["category_id"] = STUFF_ID
    return write_coco_panoptic_dataset(coco_root, images, segments, COCO_CATEGORIES, split="train")


@pytest.fixture(scope="module")
def d2_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``$DETECTRON2_DATASETS``-style root holding ``coco/`` with 8 training images."""
    root = str(tmp_path_factory.mktemp("d2_datasets"))
    _write_coco_scenes(os.path.join(root, "coco"))
    register_coco_panoptic_folder("test_tn_train", os.path.join(root, "coco"), "train", overwrite=True)
    return root


# ================================================================================ fast unit tests
class _ToyModel(torch.nn.Module):
    """Parameter names as in FlowSeg: backbone.*, sem_seg_head.*, condition_head.llm.*."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Module()
        self.backbone.conv = torch.nn.Conv2d(3, 4, 1)
        self.backbone.norm = torch.nn.LayerNorm(4)
        self.backbone.pos_embed = torch.nn.Parameter(torch.zeros(1, 4))
        self.sem_seg_head = torch.nn.Module()
        self.sem_seg_head.query_feat = torch.nn.Embedding(3, 4)
        self.sem_seg_head.level_embed = torch.nn.Embedding(3, 4)
        self.sem_seg_head.class_embed = torch.nn.Linear(4, 4)
        self.sem_seg_head.gn = torch.nn.GroupNorm(2, 4)
        self.condition_head = torch.nn.Module()
        self.condition_head.llm = torch.nn.Module()
        self.condition_head.llm.q_proj = torch.nn.Linear(4, 4)
        self.condition_head.llm.embed_tokens = torch.nn.Embedding(5, 4)
        self.condition_head.llm.frozen = torch.nn.Linear(4, 4)
        self.condition_head.llm.frozen.requires_grad_(False)
        self.logit_scale = torch.nn.Parameter(torch.ones(()))


def _group_of(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> Dict[str, Any]:
    hits = [g for g in optimizer.param_groups if any(q is p for q in g["params"])]
    assert len(hits) == 1
    return hits[0]


def test_optimizer_param_groups() -> None:
    cfg = _cfg()
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY = 1e-4, 0.05
    cfg.SOLVER.BACKBONE_MULTIPLIER, cfg.SOLVER.LLM_MULTIPLIER = 0.1, 0.5
    cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0, 0.01
    m = _ToyModel()
    opt = build_optimizer(cfg, m)
    assert isinstance(opt, torch.optim.AdamW)
    expect = {
        m.backbone.conv.weight: (1e-5, 0.05),
        m.backbone.norm.weight: (1e-5, 0.0),
        m.backbone.pos_embed: (1e-5, 0.01),
        m.sem_seg_head.query_feat.weight: (1e-4, 0.01),
        m.sem_seg_head.level_embed.weight: (1e-4, 0.01),
        m.sem_seg_head.class_embed.weight: (1e-4, 0.05),
        m.sem_seg_head.class_embed.bias: (1e-4, 0.05),
        m.sem_seg_head.gn.weight: (1e-4, 0.0),
        m.condition_head.llm.q_proj.weight: (5e-5, 0.05),
        m.condition_head.llm.embed_tokens.weight: (5e-5, 0.01),
        m.logit_scale: (1e-4, 0.0),
    }
    for p, (lr, wd) in expect.items():
        g = _group_of(opt, p)
        assert g["lr"] == pytest.approx(lr) and g["weight_decay"] == pytest.approx(wd)
    n_opt = sum(len(g["params"]) for g in opt.param_groups)
    assert n_opt == sum(1 for p in m.parameters() if p.requires_grad)  # frozen ones left out
    assert len(opt.param_groups) == 8  # one group per distinct (lr, wd), not one per tensor


def test_full_model_gradient_clipping_clips_global_norm() -> None:
    cfg = _cfg()
    cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
    m = _ToyModel()
    opt = build_optimizer(cfg, m)
    params = [p for p in m.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    total = torch.norm(torch.stack([p.grad.norm() for p in params]))
    assert total == pytest.approx(1.0, rel=1e-4)
    # "norm" clipping goes through Detectron2's per-parameter clipper instead
    cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"
    opt = build_optimizer(cfg, m)
    for p in params:
        p.grad = torch.full_like(p, 10.0)
    opt.step()
    assert all(p.grad.norm() == pytest.approx(1.0, rel=1e-4) for p in params)


def test_check_losses_finite_names_iteration_and_terms() -> None:
    check_losses_finite({"loss_ce": torch.tensor(1.0), "loss_dice": torch.tensor(2.0)}, 3)
    with pytest.raises(
        NonFiniteLossError, match=r"iteration=7.*\['loss_dice'\].*loss_ce=1.*loss_dice=nan"
    ) as e:
        check_losses_finite({"loss_ce": torch.tensor(1.0), "loss_dice": torch.tensor(float("nan"))}, 7)
    assert isinstance(e.value, FloatingPointError)  # Detectron2's own exception type


def test_safe_checkpointer_refuses_non_finite_weights(tmp_path) -> None:
    from detectron2.checkpoint import DetectionCheckpointer

    model = torch.nn.Linear(2, 2)
    ckpt = DetectionCheckpointer(model, str(tmp_path))
    hook = SafePeriodicCheckpointer(ckpt, period=2)

    class _Trainer:
        iter, max_iter = 1, 10

    hook.trainer = _Trainer()
    hook.before_train()
    hook.after_step()  # iteration 1: saved
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    hook.trainer.iter = 3
    with pytest.raises(NonFiniteLossError, match="iteration=3.*weight.*model_0000001.pth"):
        hook.after_step()
    assert not (tmp_path / "model_0000003.pth").exists()
    assert ckpt.get_checkpoint_file().endswith("model_0000001.pth")


def test_write_metrics_json(tmp_path) -> None:
    res = {"panoptic_seg": {"PQ": np.float64(12.5), "PQ_st": float("nan")}, "segm": {"AP": np.float32(3.0)}}
    run = {"weights": "w.pth", "weights_sha256": "ab" * 32, "config_sha256": "cd" * 32, "iteration": 9}
    paths = write_metrics_json(str(tmp_path), {"ds/a": res}, iteration=9, run=run)
    one = json.loads(open(paths["ds/a"]).read())
    assert os.path.basename(paths["ds/a"]) == "metrics_ds_a.json"
    assert one == {
        "dataset": "ds/a",
        "iteration": 9,
        "run": run,
        "metrics": {"panoptic_seg": {"PQ": 12.5, "PQ_st": None}, "segm": {"AP": 3.0}},
    }
    write_metrics_json(str(tmp_path), {"b": {"sem_seg": {"mIoU": 1.0}}}, iteration=9, run=run)
    merged = json.loads((tmp_path / "metrics_all.json").read_text())
    assert set(merged["metrics"]) == {"ds/a", "b"}  # the same run evaluated one by one keeps both


def test_build_evaluator_by_evaluator_type(d2_root: str, tmp_path) -> None:
    cfg = _cfg()
    cfg.OUTPUT_DIR = str(tmp_path)
    ev = build_evaluator(cfg, "test_tn_train")
    assert isinstance(ev, DatasetEvaluators)
    assert [type(e) for e in ev._evaluators] == [COCOPanopticEvaluator, COCOEvaluator, SemSegEvaluator]
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = False
    assert isinstance(build_evaluator(cfg, "test_tn_train"), COCOPanopticEvaluator)
    # the builtin COCO names without files on disk: only PQ (no instances json / semantic PNGs)
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    MetadataCatalog.get("test_tn_nofiles").set(
        evaluator_type="coco_panoptic_seg",
        json_file=str(tmp_path / "missing.json"),
        sem_seg_root=str(tmp_path / "missing"),
        **{k: v for k, v in MetadataCatalog.get("test_tn_train").as_dict().items() if k.endswith("_id")},
        panoptic_json="x",
        panoptic_root="y",
    )
    assert isinstance(build_evaluator(cfg, "test_tn_nofiles"), COCOPanopticEvaluator)
    MetadataCatalog.get("test_tn_unknown").set(evaluator_type="lvis_like")
    with pytest.raises(NotImplementedError, match="test_tn_unknown.*lvis_like"):
        build_evaluator(cfg, "test_tn_unknown")


def test_build_evaluator_refer_and_reason(tmp_path) -> None:
    from flowseg.evaluation import ReasoningEvaluator, ReferringEvaluator

    cfg = _cfg()
    MetadataCatalog.get("test_tn_refer").set(evaluator_type="refer")
    MetadataCatalog.get("test_tn_reason").set(evaluator_type="reason_seg")
    assert isinstance(build_evaluator(cfg, "test_tn_refer", str(tmp_path)), ReferringEvaluator)
    assert isinstance(build_evaluator(cfg, "test_tn_reason", str(tmp_path)), ReasoningEvaluator)


def test_check_num_classes_and_amp_on_cpu(d2_root: str) -> None:
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="NUM_CLASSES is 3 but data set 'test_tn_train' has 133"):
        check_num_classes(cfg, ["test_tn_train"])
    cfg.MODEL.LLM.CONFIG = "llm.json"  # with an LLM the classes are names: any count works
    check_num_classes(cfg, ["test_tn_train"])
    cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED = "cpu", True
    assert resolve_amp(cfg).SOLVER.AMP.ENABLED is True  # CPU autocast, SOLVER.AMP.PRECISION


# ================================================================================ end to end
@pytest.fixture(scope="module")
def trained(d2_root: str, tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    """Evaluate the untrained model, train TRAIN_ITERS iterations through train_net.main."""
    out = str(tmp_path_factory.mktemp("train_run"))
    opts = [
        "DATASETS.TRAIN", "('test_tn_train',)",
        "DATASETS.TEST", "('test_tn_train',)",
        "OUTPUT_DIR", out,
        "SOLVER.MAX_ITER", TRAIN_ITERS,
        "SOLVER.STEPS", f"({TRAIN_ITERS - 20},)",
        "SOLVER.CHECKPOINT_PERIOD", 10000,
        "SEED", 0,
    ]  # fmt: skip
    args = _args(opts)
    cfg = train_net.setup(args)
    model = train_net.Trainer.build_model(cfg)  # same seed -> the initialisation training starts from
    t0 = time.time()
    untrained = train_net.Trainer.test(cfg, model)
    t1 = time.time()
    train_net.main(args)  # trains, then EvalHook evaluates on DATASETS.TEST
    t2 = time.time()
    with open(os.path.join(out, "metrics_test_tn_train.json")) as f:
        after = json.load(f)
    pq0, pq1 = untrained["panoptic_seg"]["PQ"], after["metrics"]["panoptic_seg"]["PQ"]
    print(
        f"\nPQ untrained {pq0:.2f} -> trained {pq1:.2f}"
        f" after {TRAIN_ITERS} iterations (eval {t1 - t0:.1f}s, train+eval {t2 - t1:.1f}s)"
    )
    return {"out": out, "untrained": untrained, "after": after}


@pytest.mark.slow
def test_training_raises_pq_far_above_untrained(trained: Dict[str, Any]) -> None:
    pq_before = trained["untrained"]["panoptic_seg"]["PQ"]
    metrics = trained["after"]["metrics"]
    pq_after = metrics["panoptic_seg"]["PQ"]
    assert pq_after > pq_before + 20, (pq_before, pq_after)
    assert metrics["segm"]["AP"] > 10 and metrics["sem_seg"]["mIoU"] > 30  # AP and mIoU evaluated too
    assert trained["after"]["iteration"] == TRAIN_ITERS  # Detectron2's storage.iter after the loop
    out = trained["out"]
    assert json.load(open(os.path.join(out, "metrics_all.json")))["metrics"]["test_tn_train"] == metrics
    # Detectron2's training log (json lines) is not clobbered by the metrics files
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.json"))]
    assert any("total_loss" in x for x in lines)
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_final.pth"


@pytest.mark.slow
def test_eval_only_cli_with_builtin_coco_name(trained: Dict[str, Any], d2_root: str, tmp_path) -> None:
    """`train_net.py --eval-only MODEL.WEIGHTS ...` in a fresh process finds the data set under the
    builtin name through $DETECTRON2_DATASETS and reproduces the in-process PQ of those weights."""
    name = "coco_2017_train_panoptic_with_sem_seg"
    out = str(tmp_path / "eval")
    cmd = [
        sys.executable, os.path.join(REPO, "projects", "FlowSeg", "train_net.py"),
        "--config-file", TINY, "--eval-only",
        "MODEL.WEIGHTS", os.path.join(trained["out"], "model_final.pth"),
        "DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", f"('{name}',)",
        "OUTPUT_DIR", out,
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=d2_root, OMP_NUM_THREADS="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, f"metrics_{name}.json")) as f:
        res = json.load(f)
    assert res["iteration"] is None
    expected = trained["after"]["metrics"]["panoptic_seg"]["PQ"]
    assert res["metrics"]["panoptic_seg"]["PQ"] == pytest.approx(expected, abs=0.5)
    assert name in json.load(open(os.path.join(out, "metrics_all.json")))["metrics"]


@pytest.mark.slow
def test_resume_continues_iteration_and_optimizer_state(d2_root: str, tmp_path) -> None:
    out = str(tmp_path / "resume")
    common = [
        "DATASETS.TRAIN", "('test_tn_train',)", "DATASETS.TEST", "()",
        "OUTPUT_DIR", out, "SOLVER.CHECKPOINT_PERIOD", 2, "SEED", 0,
    ]  # fmt: skip
    train_net.main(_args(common + ["SOLVER.MAX_ITER", 4]))
    assert {"model_0000001.pth", "model_0000003.pth", "model_final.pth"} <= set(os.listdir(out))
    saved = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert saved["iteration"] == 3
    saved_opt = saved["trainer"]["_trainer"]["optimizer"]["state"]  # DefaultTrainer's checkpoint layout

    args = _args(common + ["SOLVER.MAX_ITER", 6], resume=True)
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=args.resume)
    assert trainer.start_iter == 4  # continues after the saved iteration
    state = trainer.optimizer.state_dict()["state"]
    assert len(state) == len(saved_opt) > 0
    for k, s in saved_opt.items():
        assert torch.equal(state[k]["exp_avg"], s["exp_avg"])
        assert torch.equal(state[k]["exp_avg_sq"], s["exp_avg_sq"])
        assert float(state[k]["step"]) == float(s["step"]) == 4
    model_sd = trainer.model.state_dict()
    assert all(torch.equal(model_sd[k], v) for k, v in saved["model"].items())
    assert trainer.scheduler.last_epoch == saved["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 4
    trainer.train()
    final = torch.load(os.path.join(out, "model_final.pth"), map_location="cpu", weights_only=False)
    assert final["iteration"] == 5
    assert "model_0000005.pth" in os.listdir(out)


@pytest.mark.slow
def test_non_finite_loss_fails_clearly_and_keeps_last_checkpoint(d2_root: str, tmp_path) -> None:
    out = str(tmp_path / "nan")
    args = _args(
        [
            "DATASETS.TRAIN",
            "('test_tn_train',)",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            out,
            "SOLVER.MAX_ITER",
            6,
            "SOLVER.CHECKPOINT_PERIOD",
            2,
            "SEED",
            0,
        ]  # fmt: skip
    )
    trainer = train_net.Trainer(train_net.setup(args))
    trainer.resume_or_load(resume=False)
    model = trainer._trainer.model
    forward = model.forward

    def nan_at_iteration_3(batched_inputs: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        losses = forward(batched_inputs)
        if trainer.iter == 3:
            losses["loss_dice"] = losses["loss_dice"] * float("nan")
        return losses

    model.forward = nan_at_iteration_3
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "iteration=3" in msg and "loss_dice=nan" in msg and "loss_ce=" in msg
    assert "model_0000001.pth" in msg
    files = set(os.listdir(out))
    assert (
        "model_0000001.pth" in files and "model_0000003.pth" not in files and "model_final.pth" not in files
    )
    assert open(os.path.join(out, "last_checkpoint")).read().strip() == "model_0000001.pth"
    kept = torch.load(os.path.join(out, "model_0000001.pth"), map_location="cpu", weights_only=False)
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("problem", ["missing", "malformed"])
def test_bad_annotation_file_error_names_the_file(d2_root: str, tmp_path, problem: str) -> None:
    root = str(tmp_path / "coco")
    shutil.copytree(os.path.join(d2_root, "coco"), root)
    name = f"test_tn_bad_{problem}"
    register_coco_panoptic_folder(name, root, "train", overwrite=True)
    pan_json = os.path.join(root, "annotations", "panoptic_train2017.json")
    if problem == "missing":
        os.remove(pan_json)
        expected = FileNotFoundError
    else:
        with open(pan_json) as f:
            info = json.load(f)
        del info["annotations"][2]["segments_info"]
        with open(pan_json, "w") as f:
            json.dump(info, f)
        expected = ValueError
    args = _args(["DATASETS.TRAIN", f"('{name}',)", "DATASETS.TEST", "()", "OUTPUT_DIR", str(tmp_path / "o")])
    with pytest.raises(expected) as e:
        train_net.main(args)
    assert pan_json in str(e.value)
    if problem == "malformed":
        assert "image_id=3" in str(e.value) and "segments_info" in str(e.value)
    DatasetCatalog.remove(name)


def test_metrics_json_nan_is_null(tmp_path) -> None:
    write_metrics_json(str(tmp_path), {"x": {"a": {"b": math.inf}}})
    assert json.loads((tmp_path / "metrics_x.json").read_text())["metrics"] == {"a": {"b": None}}
