"""Trainable-only checkpoints (:mod:`flowseg.checkpoint.trainable`): what training changed plus the
sources of the frozen weights; loading one gives the same model, outputs and resumed training as
the full checkpoint; a missing or changed source fails with its name."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Instances
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer, group_keys_by_component
from flowseg.checkpoint.trainable import MANIFEST_KEY, FrozenBaseMismatchError, checkpoint_bytes
from flowseg.utils.tiny_models import make_tiny_llm_dir, tiny_llm_cfg_overrides
from repo_scripts import load_script

REFER_TINY = "configs/tiny/flowseg_refer_tiny.yaml"
FROZEN = {"condition_head.llm_base", "condition_head.vision_tower"}


@pytest.fixture(scope="module")
def llm_paths(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


def _cfg(llm_paths: Dict[str, str], *opts: Any):
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(REFER_TINY)
    # the paper's stage-3 setting: LLM (LoRA + new-token rows train) and SigLIP frozen, from folders
    cfg.merge_from_list(tiny_llm_cfg_overrides(llm_paths, from_weights=True, lora=True))
    cfg.merge_from_list(["MODEL.LLM.FREEZE", True, "MODEL.VANILLA_ENCODER.FREEZE", True, *opts])
    return cfg


def _model(cfg, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


@torch.no_grad()
def _perturb_trainable(model: torch.nn.Module, seed: int) -> None:
    # LoRA B starts at zero and the token rows at the mean row: move what trains, so that a tensor
    # that failed to load changes the outputs
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _eval_inputs() -> List[Dict[str, Any]]:
    out = []
    for i, text in enumerate(["the red circle", "segment <p>the square</p> and <p>the circle</p>"]):
        g = torch.Generator().manual_seed(i)
        image = torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8, generator=g)
        out.append({"image": image, "expression": text, "task": "referring"})
    return out


def _train_inputs() -> List[Dict[str, Any]]:
    batch = []
    for x in _eval_inputs()[:1]:
        masks = torch.zeros(1, 96, 128, dtype=torch.bool)
        masks[0, 10:50, 20:70] = True
        inst = Instances((96, 128))
        inst.gt_masks, inst.gt_classes = BitMasks(masks), torch.tensor([0])
        batch.append({**x, "instances": inst})
    return batch


def _nbytes(state: Dict[str, torch.Tensor]) -> int:
    unique = {(v.data_ptr(), v.dtype, tuple(v.shape)): v for v in state.values()}
    return sum(v.numel() * v.element_size() for v in unique.values())


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    a.eval(), b.eval()
    with torch.no_grad():
        out_a, out_b = a(_eval_inputs()), b(_eval_inputs())
    for x, y in zip(out_a, out_b):
        for p, q in zip(x["ref_segs"], y["ref_segs"]):
            assert torch.equal(p["mask"], q["mask"]) and p["score"] == q["score"] and p["query"] == q["query"]
        assert torch.equal(x["ref_seg"]["candidates"], y["ref_seg"]["candidates"])


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    model.train()
    torch.manual_seed(123)  # point sampling of the mask losses
    loss = sum(model(_train_inputs()).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def test_eval_and_resume_from_trainable_only_equal_the_full_checkpoint(llm_paths, tmp_path) -> None:
    cfg = _cfg(llm_paths)
    assert cfg.SOLVER.CHECKPOINT_TRAINABLE_ONLY
    model = _model(cfg, seed=0)
    _perturb_trainable(model, seed=1)
    opt = _optimizer(model)
    _step(model, opt)  # AdamW moments to resume
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    full_dir.mkdir(), part_dir.mkdir()
    FlowSegCheckpointer(model, str(full_dir), trainable_only=False, optimizer=opt).save(
        "model_0000000", iteration=0
    )
    FlowSegCheckpointer(model, str(part_dir), cfg=cfg, optimizer=opt).save("model_0000000", iteration=0)

    full = torch.load(full_dir / "model_0000000.pth", weights_only=False)
    part = torch.load(part_dir / "model_0000000.pth", weights_only=False)
    assert FROZEN <= set(group_keys_by_component(full["model"]))
    groups = group_keys_by_component(part["model"])
    assert not FROZEN & set(groups)
    assert {
        "condition_head.lora",
        "condition_head.token_rows",
        "condition_head.projectors",
        "refiner",
    } <= set(groups)
    manifest = part[MANIFEST_KEY]
    assert manifest["base_checkpoint"] is None  # nothing was loaded: the frozen parts are the folders'
    assert set(manifest["sources"]) == {"MODEL.LLM.PATH", "MODEL.VANILLA_ENCODER.PATH"}
    assert manifest["sources"]["MODEL.LLM.PATH"]["path"] == os.path.abspath(llm_paths["llm"])
    # exactly the frozen LLM and vision-tower tensors are left out (tied weights counted once)
    frozen_bytes = sum(
        _nbytes({k: v for k, v in full["model"].items() if k in ks})
        for c, ks in group_keys_by_component(full["model"]).items()
        if c in FROZEN
    )
    assert frozen_bytes > 0 and _nbytes(part["model"]) == _nbytes(full["model"]) - frozen_bytes

    # --eval-only / demo: a fresh model (other random init) + the trainable-only file
    from_part, from_full = _model(cfg, seed=5), _model(cfg, seed=6)
    FlowSegCheckpointer(from_part, cfg=cfg).load(str(part_dir / "model_0000000.pth"))
    FlowSegCheckpointer(from_full, cfg=cfg).load(str(full_dir / "model_0000000.pth"))
    _assert_same_state(model, from_part)
    _assert_same_state(from_full, from_part)
    _assert_same_outputs(from_full, from_part)

    # --resume: model, optimizer and iteration; the next training step is bit-identical
    resumed = _model(cfg, seed=7)
    opt_resumed = _optimizer(resumed)
    ckpt = FlowSegCheckpointer(resumed, str(part_dir), cfg=cfg, optimizer=opt_resumed)
    assert ckpt.resume_or_load("", resume=True)["iteration"] == 0
    _assert_same_state(model, resumed)
    _step(model, opt)
    _step(resumed, opt_resumed)
    _assert_same_state(model, resumed)
    # saving again after a resume keeps referring to the same sources
    ckpt.save("model_0000001")
    again = torch.load(part_dir / "model_0000001.pth", weights_only=False)[MANIFEST_KEY]
    assert {s: e["fingerprint"] for s, e in again["sources"].items()} == {
        s: e["fingerprint"] for s, e in manifest["sources"].items()
    }


def test_base_checkpoint_chain_and_clear_errors(llm_paths, tmp_path) -> None:
    # stage-2-like: the segmentation encoder is frozen and comes from the checkpoint the run started from
    cfg = _cfg(llm_paths, "MODEL.SAM_VIT.FREEZE", True)
    start = _model(cfg, seed=0)
    _perturb_trainable(start, seed=2)
    with torch.no_grad():
        for p in start.backbone.parameters():
            p.add_(0.01)  # a "stage-1 trained" encoder, not the random init
    for d in ("stage1", "run", "later"):
        (tmp_path / d).mkdir()
    FlowSegCheckpointer(start, str(tmp_path / "stage1"), trainable_only=False).save("model_final")
    base = tmp_path / "stage1" / "model_final.pth"

    model = _model(cfg, seed=1)
    FlowSegCheckpointer(model, cfg=cfg).load(str(base))
    _perturb_trainable(model, seed=3)
    FlowSegCheckpointer(model, str(tmp_path / "run"), cfg=cfg).save("model_final")
    saved = torch.load(tmp_path / "run" / "model_final.pth", weights_only=False)
    assert saved[MANIFEST_KEY]["base_checkpoint"] == str(base)
    frozen_vit = [n for n, p in model.backbone.named_parameters() if not p.requires_grad]
    assert frozen_vit and not any(f"backbone.{n}" in saved["model"] for n in frozen_vit)
    assert any(k.startswith("backbone.") for k in saved["model"])  # the pyramid still trains

    restored = _model(cfg, seed=4)
    FlowSegCheckpointer(restored, cfg=cfg).load(str(tmp_path / "run" / "model_final.pth"))
    _assert_same_state(model, restored)

    # a later stage started from the trainable-only file, saved trainable-only again: a chain of two
    later = _model(cfg, seed=8)
    FlowSegCheckpointer(later, cfg=cfg).load(str(tmp_path / "run" / "model_final.pth"))
    FlowSegCheckpointer(later, str(tmp_path / "later"), cfg=cfg).save("model_final")
    chained = _model(cfg, seed=9)
    FlowSegCheckpointer(chained, cfg=cfg).load(str(tmp_path / "later" / "model_final.pth"))
    _assert_same_state(model, chained)

    # the base checkpoint was overwritten by another one: the error names it
    with torch.no_grad():
        next(start.backbone.net.parameters()).add_(1.0)
    FlowSegCheckpointer(start, str(tmp_path / "stage1"), trainable_only=False).save("model_final")
    with pytest.raises(FrozenBaseMismatchError, match="base checkpoint .*stage1/model_final.pth"):
        FlowSegCheckpointer(_model(cfg, seed=4), cfg=cfg).load(str(tmp_path / "run" / "model_final.pth"))
    # the base checkpoint is gone
    shutil.move(str(base), str(tmp_path / "moved.pth"))
    with pytest.raises(FileNotFoundError, match="base checkpoint .*stage1/model_final.pth"):
        FlowSegCheckpointer(_model(cfg, seed=4), cfg=cfg).load(str(tmp_path / "run" / "model_final.pth"))


def test_resumed_run_does_not_reference_its_own_checkpoints(llm_paths, tmp_path) -> None:
    # a frozen tensor with no source file (the random pyramid of a from-scratch run, frozen here)
    # is saved in the run's checkpoints; after --resume the next checkpoint must hold it again
    # rather than point at the resumed file, which PeriodicCheckpointer may delete later
    cfg = _cfg(llm_paths, "MODEL.SAM_VIT.FREEZE", True)
    run = tmp_path / "run"
    run.mkdir()
    model = _model(cfg, seed=0)
    _perturb_trainable(model, seed=1)
    FlowSegCheckpointer(model, str(run), cfg=cfg).save("model_0000001")
    first = torch.load(run / "model_0000001.pth", weights_only=False)
    assert first[MANIFEST_KEY]["base_checkpoint"] is None

    resumed = _model(cfg, seed=5)
    FlowSegCheckpointer(resumed, str(run), cfg=cfg).load(str(run / "model_0000001.pth"))
    FlowSegCheckpointer(resumed, str(run), cfg=cfg).save("model_final")
    final = torch.load(run / "model_final.pth", weights_only=False)
    assert final[MANIFEST_KEY]["base_checkpoint"] is None
    assert final["model"].keys() == first["model"].keys()

    os.remove(run / "model_0000001.pth")
    restored = _model(cfg, seed=6)
    FlowSegCheckpointer(restored, cfg=cfg).load(str(run / "model_final.pth"))
    _assert_same_state(model, restored)


def test_changed_llm_folder_is_named(llm_paths, tmp_path) -> None:
    cfg = _cfg(llm_paths)
    model = _model(cfg, seed=0)
    FlowSegCheckpointer(model, str(tmp_path), cfg=cfg).save("model_final")
    other = _model(cfg, seed=1)
    base_weights = [p for n, p in other.named_parameters() if "q_proj.base_layer.weight" in n]
    with torch.no_grad():
        base_weights[0].add_(1.0)  # another LLM in the folder
    with pytest.raises(FrozenBaseMismatchError, match="MODEL.LLM.PATH .*llm"):
        FlowSegCheckpointer(other, cfg=cfg).load(str(tmp_path / "model_final.pth"))


def test_checkpoint_bytes_counts_the_saved_tensors(llm_paths, tmp_path) -> None:
    cfg = _cfg(llm_paths)
    model = _model(cfg, seed=0)
    sizes = checkpoint_bytes(model, cfg)
    FlowSegCheckpointer(model, str(tmp_path), cfg=cfg).save("part")
    state = torch.load(tmp_path / "part.pth", weights_only=False)["model"]
    tensors = {(v.data_ptr(), v.dtype, tuple(v.shape)): v for v in state.values()}
    assert sizes["trainable_only"] == sum(v.numel() * v.element_size() for v in tensors.values())
    all_params = {(v.data_ptr(), v.dtype, tuple(v.shape)): v for v in model.state_dict().values()}
    assert sizes["full"] == sum(v.numel() * v.element_size() for v in all_params.values())


def _export_tool():
    return load_script("tools/export_full_checkpoint.py")


def test_export_full_checkpoint_is_self_contained_and_merges_lora(llm_paths, tmp_path) -> None:
    opts = [*tiny_llm_cfg_overrides(llm_paths, from_weights=True, lora=True)]
    opts += ["MODEL.LLM.FREEZE", True, "MODEL.VANILLA_ENCODER.FREEZE", True]
    cfg = _cfg(llm_paths)
    model = _model(cfg, seed=0)
    _perturb_trainable(model, seed=1)
    FlowSegCheckpointer(model, str(tmp_path), cfg=cfg).save("model_final")
    tool = _export_tool()
    res = tool.export_full_checkpoint(
        REFER_TINY, str(tmp_path / "model_final.pth"), str(tmp_path / "full.pth"), opts
    )
    full = torch.load(tmp_path / "full.pth", weights_only=False)
    assert MANIFEST_KEY not in full and res["num_tensors"] == len(full["model"]) == len(model.state_dict())
    assert FROZEN <= set(group_keys_by_component(full["model"]))
    loaded = _model(cfg, seed=3)
    FlowSegCheckpointer(loaded).load(str(tmp_path / "full.pth"))
    _assert_same_state(model, loaded)

    tool.main(
        ["--config-file", REFER_TINY, "--weights", str(tmp_path / "model_final.pth")]
        + ["--output", str(tmp_path / "merged.pth"), "--merge-lora", *map(str, opts)]
    )
    merged = torch.load(tmp_path / "merged.pth", weights_only=False)["model"]
    assert "condition_head.lora" not in group_keys_by_component(merged)
    no_lora = _model(_cfg(llm_paths, "MODEL.LLM.LORA.ENABLED", False), seed=4).eval()
    FlowSegCheckpointer(no_lora).load(str(tmp_path / "merged.pth"))
    model.eval()
    with torch.no_grad():
        a, b = model(_eval_inputs()), no_lora(_eval_inputs())
    for x, y in zip(a, b):
        assert x["ref_seg"]["query"] == y["ref_seg"]["query"]
        assert abs(x["ref_seg"]["score"] - y["ref_seg"]["score"]) < 1e-4  # W + BA merged: float rounding


def test_base_without_condition_head_gives_no_warning_and_one_expected_line(
    llm_paths, tmp_path, caplog
) -> None:
    # the main job's chain: a segmentor-only (stage-1) base; a referring run whose frozen LLM and
    # vision tower are built from config files (no weights: the run's file keeps them), saved
    # trainable-only. Loading it loads the base first, which lacks what the file itself holds.
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(REFER_TINY)
    cfg.merge_from_list(tiny_llm_cfg_overrides(llm_paths, from_weights=False, lora=True))
    frozen = ["MODEL.LLM.FREEZE", True, "MODEL.VANILLA_ENCODER.FREEZE", True, "MODEL.SAM_VIT.FREEZE", True]
    cfg.merge_from_list(frozen)
    start = _model(cfg, seed=0)
    (tmp_path / "stage1").mkdir()
    (tmp_path / "run").mkdir()
    state = {k: v for k, v in start.state_dict().items() if not k.startswith("condition_head.")}
    torch.save({"model": state}, tmp_path / "stage1" / "model_final.pth")
    model = _model(cfg, seed=1)
    FlowSegCheckpointer(model, cfg=cfg).load(str(tmp_path / "stage1" / "model_final.pth"))
    _perturb_trainable(model, seed=3)
    FlowSegCheckpointer(model, str(tmp_path / "run"), cfg=cfg).save("model_final")

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flowseg"):
        restored = _model(cfg, seed=4)
        FlowSegCheckpointer(restored, cfg=cfg).load(str(tmp_path / "run" / "model_final.pth"))
    _assert_same_state(model, restored)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not warnings, warnings[0][:300]
    text = "\n".join(r.getMessage() for r in caplog.records)
    expected = [line for line in text.splitlines() if "as expected" in line]
    assert expected and all(line.startswith("Not in the checkpoint, as expected: ") for line in expected)
    assert "LLM base weights 25 (saved in model_final.pth)" in text  # filled by the run's own file
