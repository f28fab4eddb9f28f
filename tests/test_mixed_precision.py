"""Mixed precision as X-SAM trains: bfloat16 autocast without loss scaling, on the model's device
type, so the path GPU runs take is the one trained here on the CPU."""

from __future__ import annotations

import glob
import itertools
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from flowseg import add_flowseg_config
from flowseg.engine import CheckedAMPTrainer, amp_precision, build_optimizer, resolve_amp
from flowseg.utils.tiny_models import make_tiny_llm_dir
from paper_scaffold import ROOT, paper_scaffold_cfg, referring_batch

PAPER_CONFIGS = sorted(
    glob.glob(os.path.join(ROOT, "configs", "flowseg_*.yaml"))
    + glob.glob(os.path.join(ROOT, "configs", "stages", "*.yaml"))
)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_autocast_trains_the_tiny_paper_scaffold_on_cpu(llm, lora):
    cfg = paper_scaffold_cfg(llm, "SOLVER.BASE_LR", 1e-3, "SOLVER.AMP.ENABLED", True, lora=lora)
    cfg = resolve_amp(cfg)
    assert cfg.SOLVER.AMP.ENABLED and amp_precision(cfg) == torch.bfloat16  # kept on CPU
    torch.manual_seed(0)
    model = build_model(cfg).train()
    pred = model.sem_seg_head.predictor  # BSF decoder: semantic and condition refinement on
    assert model.refiner is not None and pred.semantic_refinement and pred.condition_refinement
    dtypes = set()
    pred.register_forward_hook(lambda m, a, o: dtypes.add(o["pred_masks"].dtype))
    batch = referring_batch()
    loop = CheckedAMPTrainer(
        model,
        itertools.repeat(batch),
        build_optimizer(cfg, model),
        precision=torch.bfloat16,
        device_type="cpu",
    )
    assert not loop.grad_scaler.is_enabled() and loop.state_dict()["grad_scaler"] == {}
    with EventStorage(0) as storage:
        for it in range(6):
            loop.iter = storage.iter = it
            loop.run_step()
    losses = [v for v, _ in storage.history("total_loss").values()]
    assert dtypes == {torch.bfloat16}  # the mask head ran in bf16
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) / 2 < 0.9 * losses[0], losses
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for _, p in trained)  # fp32 master weights
    assert all(p.grad.dtype == torch.float32 for _, p in trained if p.grad is not None)
    lora_params = [n for n, _ in trained if "lora_" in n]
    assert bool(lora_params) == lora


def test_every_paper_config_trains_in_bf16_and_fp16_keeps_its_scaler():
    assert PAPER_CONFIGS
    for path in PAPER_CONFIGS:
        cfg = add_flowseg_config(get_cfg())
        cfg.merge_from_file(path)
        assert cfg.SOLVER.AMP.ENABLED and amp_precision(cfg) == torch.bfloat16, path
    model = torch.nn.Linear(2, 2)
    data = itertools.repeat([torch.ones(2)])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fp16 = CheckedAMPTrainer(model, data, opt, precision=torch.float16, device_type="cpu")
    assert fp16.grad_scaler.is_enabled()
    cfg.SOLVER.AMP.PRECISION = "fp8"
    with pytest.raises(ValueError, match="SOLVER.AMP.PRECISION must be one of .*'fp8'"):
        amp_precision(cfg)
