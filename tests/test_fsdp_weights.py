"""Converted weights under the sharded engine: X-SAM's tiny fixture checkpoint (X-SAM's key names,
converted by :mod:`flowseg.checkpoint.xsam`) given as ``MODEL.WEIGHTS`` to a ``FlowSegTrainer`` with
``MODEL.DISTRIBUTED.ENGINE fsdp`` in two processes (gloo), loaded by ``resume_or_load`` after the
model is sharded, then gathered back: it must equal the same file loaded into the unsharded model,
tensor for tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from flowseg.data.synthetic import generate_synthetic_datasets, register_synthetic_datasets
from test_fsdp import _launch
from test_xsam_parity import load_fixture, save_state_dict, xsam_tiny_cfg

FIXTURE = "qwen3"


def _cfg(folder: Path, weights: str, engine: str):
    cfg = xsam_tiny_cfg(FIXTURE, folder)
    cfg.merge_from_list([
        "MODEL.DISTRIBUTED.ENGINE", engine,
        "MODEL.WEIGHTS", weights,
        "DATASETS.TRAIN", ("synthref_train",),
        "DATASETS.TEST", (),
        "SOLVER.IMS_PER_BATCH", 2,  # 1 per process
        "OUTPUT_DIR", str(folder / engine),
    ])  # fmt: skip
    return cfg


def _worker(data_root: str, folder: str, weights: str) -> None:
    from detectron2.utils import comm
    from flowseg.engine import FlowSegTrainer

    torch.set_num_threads(1)
    register_synthetic_datasets(data_root)
    cfg = _cfg(Path(folder), weights, "fsdp")
    torch.manual_seed(cfg.SEED + comm.get_rank())  # ranks start from different random weights
    trainer = FlowSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    gathered = trainer.checkpointer.model.state_dict()  # full tensors, on every rank
    if comm.is_main_process():
        torch.save({k: v.detach().cpu() for k, v in gathered.items()}, os.path.join(folder, "gathered.pth"))
    comm.synchronize()


@pytest.mark.slow
def test_xsam_weights_loaded_sharded_equal_the_unsharded_load(tmp_path) -> None:
    from detectron2.modeling import build_model
    from flowseg.checkpoint import FlowSegCheckpointer

    data = tmp_path / "synthetic"
    generate_synthetic_datasets(str(data), {"train": 2, "val": 0, "test": 0}, seed=5)
    weights = save_state_dict(load_fixture(FIXTURE)["state_dict"], tmp_path)
    _launch(_worker, str(data), str(tmp_path), weights)
    sharded = torch.load(tmp_path / "gathered.pth", weights_only=True)

    cfg = _cfg(tmp_path, weights, "ddp")
    torch.manual_seed(0)
    model = build_model(cfg)
    ckpt = FlowSegCheckpointer(model, cfg=cfg)
    ckpt.resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    report = ckpt.last_report
    assert report.source_format == "xsam (current key names)"
    assert report.num_loaded == len(model.state_dict())  # every tensor comes from the file
    expected = model.state_dict()
    assert sharded.keys() == expected.keys()
    differ = [k for k, v in expected.items() if not torch.equal(sharded[k], v)]
    assert not differ, f"{len(differ)} tensors differ after the sharded load, e.g. {differ[:5]}"
