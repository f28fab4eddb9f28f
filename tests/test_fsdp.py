"""The sharded engine (``MODEL.DISTRIBUTED.ENGINE fsdp``, :mod:`flowseg.engine.fsdp`) on the CPU:
two processes through Detectron2's ``launch`` (gloo), ``FlowSegTrainer`` on the tiny paper
scaffold (full fine-tuning, SGD with momentum, constant LR), synthetic referring data.

In one launch each process runs, one after the other:

* ``ddp``: 4 steps under DDP (checkpoints at steps 2 and 4);
* ``fsdp``: the same 4 steps sharded;
* ``fsdp_resumed``: a sharded run stopped after 2 steps (``MAX_ITER 2``; the LR is constant, so it
  is the same run; its trainer and in-memory state are dropped, only the files remain), then a new
  trainer resumed as ``--resume`` does (``resume_or_load(resume=True)``) for the 2 last steps;
* ``fsdp_to_ddp``: the sharded checkpoint of step 2 resumed under DDP for the 2 last steps;
* ``ddp_into_fsdp``: DDP's final checkpoint loaded by a sharded trainer and gathered back;
* ``ddp_lora`` / ``fsdp_lora``: 2 steps of LoRA on the frozen LLM (loaded from its folder).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import timedelta
from typing import Any, Dict, List

import pytest
import torch
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.utils.tiny_models import make_tiny_llm_dir
from paper_scaffold import paper_scaffold_cfg
from repo_scripts import load_script

STEPS = 4
#: sharded vs DDP after 4 SGD steps: the same sums in another order (reduce-scatter of gradient
#: shards vs all-reduce of buckets), i.e. float32 rounding (3e-8 measured)
TOL = 1e-5


def _lora_opts(llm: Dict[str, str]) -> List[Any]:
    """LoRA on the tiny LLM loaded from its folder (a frozen part with a source file)."""
    return ["MODEL.LLM.PATH", llm["llm"], "MODEL.LLM.CONFIG", ""]


def _cfg(llm: Dict[str, str], out: str, engine: str, max_iter: int, lora: bool = False):
    cfg = paper_scaffold_cfg(
        llm,
        *(_lora_opts(llm) if lora else []),
        "MODEL.DISTRIBUTED.ENGINE", engine,
        "DATASETS.TEST", "()",
        "SOLVER.IMS_PER_BATCH", 2,  # 1 per process
        "SOLVER.OPTIMIZER", "SGD",
        "SOLVER.BASE_LR", 0.01,
        "SOLVER.LR_SCHEDULER_NAME", "WarmupMultiStepLR",  # constant: a cut run is the same run
        "SOLVER.WARMUP_ITERS", 0,
        "SOLVER.STEPS", "()",
        "SOLVER.MAX_ITER", max_iter,
        "SOLVER.CHECKPOINT_PERIOD", 2,
        "SEED", 7,
        "OUTPUT_DIR", out,
        lora=lora,
    )  # fmt: skip
    return cfg


def _trainer(llm, root: str, name: str, engine: str, max_iter: int, lora: bool = False):
    from detectron2.utils import comm
    from flowseg.engine import FlowSegTrainer

    cfg = _cfg(llm, os.path.join(root, name), engine, max_iter, lora)
    torch.manual_seed(cfg.SEED + comm.get_rank())  # as train_net's default_setup seeds each rank
    return FlowSegTrainer(cfg)


def _run(
    llm, root: str, name: str, engine: str, max_iter: int, resume: bool = False, lora: bool = False
) -> None:
    from detectron2.utils import comm

    trainer = _trainer(llm, root, name, engine, max_iter, lora)
    trainer.resume_or_load(resume=resume)
    trainer.train()
    comm.synchronize()


def _copy_checkpoint(root: str, src: str, name: str, dst: str) -> None:
    from detectron2.utils import comm

    if comm.is_main_process():
        os.makedirs(os.path.join(root, dst))
        shutil.copy(os.path.join(root, src, name), os.path.join(root, dst))
        with open(os.path.join(root, dst, "last_checkpoint"), "w") as f:
            f.write(name)
    comm.synchronize()


def _load_ddp_checkpoint_sharded(llm, root: str) -> Dict[str, float]:
    """DDP's final checkpoint loaded by a sharded trainer (``--resume``), gathered back."""
    from flowseg.checkpoint.full_state import full_optimizer_state_dict

    _copy_checkpoint(root, "ddp", "model_final.pth", "ddp_into_fsdp")
    trainer = _trainer(llm, root, "ddp_into_fsdp", "fsdp", STEPS)
    trainer.resume_or_load(resume=True)
    weights = trainer.checkpointer.model.state_dict()  # gathered on every rank
    optimizer = full_optimizer_state_dict(trainer.model, trainer.optimizer)  # on rank 0
    saved = torch.load(os.path.join(root, "ddp", "model_final.pth"), weights_only=False)
    diff = {"weights": _max_diff(saved["model"], {k: weights[k] for k in saved["model"]})}
    if optimizer:
        state = saved["trainer"]["_trainer"]["optimizer"]["state"]
        diff["momentum"] = max(
            float((s["momentum_buffer"] - optimizer["state"][i]["momentum_buffer"]).abs().max())
            for i, s in state.items()
        )
    diff["start_iter"] = trainer.start_iter
    return diff


def _hook_names(llm, root: str) -> List[List[str]]:
    """Each rank's hooks of a sharded trainer whose config names a test set."""
    from detectron2.utils import comm

    trainer = _trainer(llm, root, "hooks", "fsdp", STEPS)
    trainer.cfg.defrost()
    trainer.cfg.DATASETS.TEST = ("synthref_val",)
    return comm.all_gather([type(h).__name__ for h in trainer.build_hooks()])


def _worker(llm, data_root: str, root: str) -> None:
    from detectron2.utils import comm

    torch.set_num_threads(1)
    register_synthetic_datasets(data_root)
    _run(llm, root, "ddp", "ddp", STEPS)
    _run(llm, root, "fsdp", "fsdp", STEPS)
    _run(llm, root, "fsdp_resumed", "fsdp", 2)  # its process state is dropped: only files remain
    _run(llm, root, "fsdp_resumed", "fsdp", STEPS, resume=True)
    _copy_checkpoint(root, "fsdp", "model_0000001.pth", "fsdp_to_ddp")
    _run(llm, root, "fsdp_to_ddp", "ddp", STEPS, resume=True)
    loaded = _load_ddp_checkpoint_sharded(llm, root)
    _run(llm, root, "ddp_lora", "ddp", 2, lora=True)
    _run(llm, root, "fsdp_lora", "fsdp", 2, lora=True)
    hooks = _hook_names(llm, root)
    if comm.is_main_process():
        with open(os.path.join(root, "done.json"), "w") as f:
            json.dump({"world": comm.get_world_size(), "ddp_into_fsdp": loaded, "hooks": hooks}, f)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(path) -> Dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def _max_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())


#: a collective that waits longer fails the launch instead of hanging the suite (ranks out of step)
LAUNCH_TIMEOUT = timedelta(seconds=120)


def _launch(worker, *args: Any) -> None:
    """``worker(*args)`` in 2 processes through Detectron2's ``launch`` on gloo."""
    from detectron2.engine import launch

    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = ""  # launch picks NCCL when it sees a GPU: the gloo path here
    try:
        launch(worker, 2, dist_url=f"tcp://127.0.0.1:{_free_port()}", args=args, timeout=LAUNCH_TIMEOUT)
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES")
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old
    register_synthetic_datasets()  # back to the default root for the tests that follow


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    data = root / "synthetic"
    generate_synthetic_datasets(str(data), {"train": 4, "val": 2, "test": 0}, seed=5)
    llm = make_tiny_llm_dir(root / "llm")
    _launch(_worker, llm, str(data), str(root))
    done = json.loads((root / "done.json").read_text())
    assert done["world"] == 2
    return {"root": root, "llm": llm, "done": done}


@pytest.mark.slow
def test_sharded_training_equals_ddp_and_resumes_exactly(runs) -> None:
    root = runs["root"]
    ddp, fsdp = _weights(root / "ddp" / "model_final.pth"), _weights(root / "fsdp" / "model_final.pth")
    first = _weights(root / "ddp" / "model_0000001.pth")
    moved = _max_diff(ddp, first)
    diff = _max_diff(ddp, fsdp)
    print(f"\nsharded vs DDP after {STEPS} SGD steps: {diff:.2e} (steps 3-4 moved weights by {moved:.2e})")
    assert moved > 100 * TOL  # the steps did train
    assert diff < TOL
    # kill + resume under sharding: the weights of the uninterrupted sharded run
    resumed = _weights(root / "fsdp_resumed" / "model_final.pth")
    assert _max_diff(resumed, fsdp) == 0.0
    # the sharded step-2 checkpoint (weights, momentum, every rank's RNG) resumed under DDP
    to_ddp = _max_diff(_weights(root / "fsdp_to_ddp" / "model_final.pth"), fsdp)
    print(f"sharded checkpoint resumed under DDP vs sharded run: {to_ddp:.2e}")
    assert to_ddp < TOL
    # and DDP's checkpoint loaded sharded: gathered back, the file's weights and momentum exactly
    loaded = runs["done"]["ddp_into_fsdp"]
    assert loaded == {"weights": 0.0, "momentum": 0.0, "start_iter": STEPS}
    # a sharded save is a collective: every rank checkpoints; no in-training evaluation (logged)
    for names in runs["done"]["hooks"]:
        assert "SafePeriodicCheckpointer" in names and "EvalHook" not in names
    # LoRA on a frozen LLM: the same trainable-only checkpoints (LoRA and the rest, no LLM base)
    lora_ddp, lora_fsdp = (_weights(root / d / "model_final.pth") for d in ("ddp_lora", "fsdp_lora"))
    assert any(".lora_A." in k for k in lora_fsdp) and not any(".base_layer." in k for k in lora_fsdp)
    lora = _max_diff(lora_ddp, lora_fsdp)
    print(f"LoRA, 2 steps, sharded vs DDP: {lora:.2e}")
    assert lora < TOL


@pytest.mark.slow
def test_sharded_checkpoint_has_ddp_format_and_loads_unsharded(runs) -> None:
    from detectron2.modeling import build_model
    from flowseg.checkpoint import FlowSegCheckpointer

    root = runs["root"]
    ddp = torch.load(root / "ddp" / "model_final.pth", map_location="cpu", weights_only=False)
    fsdp = torch.load(root / "fsdp" / "model_final.pth", map_location="cpu", weights_only=False)
    assert ddp.keys() == fsdp.keys()
    assert all(type(v) is torch.Tensor for v in fsdp["model"].values())  # full tensors, no DTensors
    opt_ddp, opt_fsdp = ddp["trainer"]["_trainer"]["optimizer"], fsdp["trainer"]["_trainer"]["optimizer"]
    assert opt_ddp["state"].keys() == opt_fsdp["state"].keys()  # torch's index format
    assert [g["params"] for g in opt_ddp["param_groups"]] == [g["params"] for g in opt_fsdp["param_groups"]]
    for i, s in opt_ddp["state"].items():
        assert (s["momentum_buffer"] - opt_fsdp["state"][i]["momentum_buffer"]).abs().max() < TOL
    per_rank = fsdp["trainer"]["hooks"]["ExactResumeHook"]["rng_per_rank"]
    assert len(per_rank) == 2 and not torch.equal(per_rank[0]["torch"], per_rank[1]["torch"])

    # one process, no sharding (--eval-only's path): the file's tensors, exactly
    cfg = _cfg(runs["llm"], str(root / "eval"), "fsdp", STEPS)
    model = build_model(cfg)
    FlowSegCheckpointer(model, cfg=cfg).load(str(root / "fsdp" / "model_final.pth"))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in fsdp["model"].items())

    # tools/export_full_checkpoint.py on a sharded LoRA run's checkpoint: the frozen LLM restored
    # from its folder, the trained tensors from the file
    sharded = root / "fsdp_lora" / "model_final.pth"
    lora_cfg = _cfg(runs["llm"], str(root / "eval"), "fsdp", STEPS, lora=True)
    (root / "lora.yaml").write_text(lora_cfg.dump())
    load_script("tools/export_full_checkpoint.py").export_full_checkpoint(
        str(root / "lora.yaml"), str(sharded), str(root / "full.pth")
    )
    full = torch.load(root / "full.pth", weights_only=False)["model"]
    trained = _weights(sharded)
    assert len(full) > len(trained) and all(torch.equal(full[k], v) for k, v in trained.items())
    base = build_model(lora_cfg).state_dict()  # the LLM's frozen weights, read from its folder
    frozen = [k for k in full if ".base_layer." in k]
    assert frozen and all(torch.equal(full[k], base[k]) for k in frozen)
