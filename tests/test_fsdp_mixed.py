"""The sharded engine (``MODEL.DISTRIBUTED.ENGINE fsdp``) on the mixed-task loader and under bf16
autocast with activation checkpointing: two processes through Detectron2's ``launch`` (gloo, CPU),
``FlowSegTrainer`` on the tiny paper scaffold (full fine-tuning, SGD, constant LR), launched as
:mod:`test_fsdp` does.

* ``ddp`` / ``fsdp``: the same 4 steps of a stage-3-like mixed stream (referring data and LLaVA
  conversations written in their real formats, the mixed loader drawing one task per step on all
  ranks); a conversation-only step gives the segmentor and the mask decoder no gradient.
* ``bf16``: 6 sharded steps under ``SOLVER.AMP.PRECISION bfloat16`` with the activation
  checkpointing the X-SAM stage-3 config switches on (LLM, SigLIP, SAM).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from flowseg.engine.fsdp import shard_units
from flowseg.utils.tiny_models import make_tiny_llm_dir
from PIL import Image
from test_fsdp import TOL, _cfg, _launch, _max_diff, _weights
from torch import nn
from torch.nn.modules.module import register_module_forward_hook

MIXED_STEPS = 4
BF16_STEPS = 6
CONV = "fsdp_test_llava"
#: with SEED 7 the 4 first steps draw both tasks (checked below)
MIXED = ["DATASETS.TRAIN", f"('synthref_train','{CONV}')", "DATALOADER.TASK_RATIOS", [1.0, 1.0]]
#: the keys configs/stages/stage3_joint_xsam.yaml sets for activation checkpointing
ACT_CHECKPOINT = [
    "MODEL.SAM_VIT.USE_ACT_CHECKPOINT", True,
    "MODEL.LLM.GRADIENT_CHECKPOINTING", True,
    "MODEL.VANILLA_ENCODER.GRADIENT_CHECKPOINTING", True,
]  # fmt: skip
BF16 = ["SOLVER.AMP.ENABLED", True, "SOLVER.AMP.PRECISION", "bfloat16", "SOLVER.BASE_LR", 0.05]


def _write_conversations(root: str, n: int = 4) -> None:
    """LLaVA-format conversations (``{"image", "conversations": [human, gpt]}``) on small images."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(
            os.path.join(root, "images", f"{i}.jpg")
        )
        turns = [
            {"from": "human", "value": f"<image>\nWhat is in picture {i}?"},
            {"from": "gpt", "value": f"Noise {i}."},
        ]
        samples.append({"id": i, "image": f"{i}.jpg", "conversations": turns})
    with open(os.path.join(root, "llava.json"), "w") as f:
        json.dump(samples, f)


def _train(llm, root: str, name: str, engine: str, max_iter: int, *opts: Any) -> Dict[str, Any]:
    """Train; on the main process the losses of each step (Detectron2's event storage) and the
    model's parameter dtypes after training."""
    from detectron2.utils import comm
    from flowseg.engine import FlowSegTrainer

    cfg = _cfg(llm, os.path.join(root, name), engine, max_iter)
    cfg.merge_from_list(list(opts))
    torch.manual_seed(cfg.SEED + comm.get_rank())
    trainer = FlowSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    linear_dtypes = set()

    def watch(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(module, nn.Linear):
            linear_dtypes.add(str(output.dtype))

    handle = register_module_forward_hook(watch)
    try:
        trainer.train()
    finally:
        handle.remove()
    comm.synchronize()
    # the modules that recompute their activations in backward: Hugging Face's (LLM, SigLIP) and
    # the SAM blocks swapped to their checkpointed class (torch's non-reentrant checkpoint calls
    # no module hook when it recomputes, so this is read from the modules)
    checkpointed = [
        type(m).__name__ for m in trainer.model.modules() if getattr(m, "gradient_checkpointing", 0) is True
    ]
    checkpointed += [
        type(m).__name__ for m in shard_units(trainer.model) if "Checkpointed" in type(m).__name__
    ]
    steps: List[Dict[str, float]] = [{} for _ in range(max_iter)]
    for key, history in trainer.storage.histories().items():
        if key.startswith("loss_") or key == "total_loss":
            for value, it in history.values():
                steps[it][key] = value
    dtypes = sorted({str(p.dtype) for p in trainer.model.parameters()})
    return {
        "losses": steps,
        "dtypes": dtypes,
        "linear_dtypes": sorted(linear_dtypes),
        "checkpointed": dict(Counter(checkpointed)),
    }


def _worker(llm, data_root: str, conv_root: str, root: str) -> None:
    from detectron2.utils import comm
    from flowseg.data.datasets.conversation import register_llava_dataset

    torch.set_num_threads(1)
    register_synthetic_datasets(data_root)
    register_llava_dataset(CONV, os.path.join(conv_root, "llava.json"), os.path.join(conv_root, "images"))
    done = {"world": comm.get_world_size()}
    done["ddp"] = _train(llm, root, "ddp", "ddp", MIXED_STEPS, *MIXED)
    done["fsdp"] = _train(llm, root, "fsdp", "fsdp", MIXED_STEPS, *MIXED)
    done["bf16"] = _train(llm, root, "bf16", "fsdp", BF16_STEPS, *BF16, *ACT_CHECKPOINT)
    if comm.is_main_process():
        with open(os.path.join(root, "done.json"), "w") as f:
            json.dump(done, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp_mixed")
    data, conv = root / "synthetic", root / "llava"
    generate_synthetic_datasets(str(data), {"train": 4, "val": 2, "test": 0}, seed=5)
    _write_conversations(str(conv))
    llm = make_tiny_llm_dir(root / "llm")
    _launch(_worker, llm, str(data), str(conv), str(root))
    done = json.loads((root / "done.json").read_text())
    assert done["world"] == 2
    return {"root": root, "done": done}


@pytest.mark.slow
def test_sharded_mixed_loader_with_conversation_only_steps_equals_ddp(runs) -> None:
    root, done = runs["root"], runs["done"]
    print("\nmixed-stream losses per step (fsdp):", done["fsdp"]["losses"])
    # which task each step drew: a conversation step has the LLM's loss only, which Detectron2's
    # trainer logs as total_loss alone
    conversation = [set(s) == {"total_loss"} for s in done["fsdp"]["losses"]]
    assert any(conversation) and not all(conversation), done["fsdp"]["losses"]
    for run in ("ddp", "fsdp"):
        assert all(math.isfinite(v) for s in done[run]["losses"] for v in s.values())
    assert [sorted(s) for s in done["ddp"]["losses"]] == [sorted(s) for s in done["fsdp"]["losses"]]
    ddp, fsdp = _weights(root / "ddp" / "model_final.pth"), _weights(root / "fsdp" / "model_final.pth")
    diff = _max_diff(ddp, fsdp)
    print(f"mixed stream, {MIXED_STEPS} SGD steps, sharded vs DDP: {diff:.2e}")
    assert diff < TOL


@pytest.mark.slow
def test_sharded_bf16_autocast_with_activation_checkpointing_trains(runs) -> None:
    done = runs["done"]["bf16"]
    totals = [s["total_loss"] for s in done["losses"]]
    print("\nbf16 + activation checkpointing, sharded, total loss per step:", totals)
    assert all(math.isfinite(v) for v in totals)
    assert totals[-1] < totals[0]
    assert done["dtypes"] == ["torch.float32"]  # the master weights stay float32 under autocast
    assert "torch.bfloat16" in done["linear_dtypes"]  # the forward did run in bf16
    fp32 = runs["done"]["fsdp"]
    assert fp32["linear_dtypes"] == ["torch.float32"]
    print("activation checkpointing (bf16 run / fp32 run):", done["checkpointed"], fp32["checkpointed"])
    names = " ".join(done["checkpointed"])
    assert "Siglip" in names and "Qwen3" in names and "_CheckpointedBlock" in names, names
    assert not fp32["checkpointed"]
    saved = _weights(runs["root"] / "bf16" / "model_final.pth")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
