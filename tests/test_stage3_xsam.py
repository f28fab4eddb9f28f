"""configs/stages/stage3_joint_xsam.yaml: stage 3 as X-SAM's own stage-3 file trains (full fine-tuning
of the LLM, SigLIP2 and SAM; lr multipliers; warm-up and cosine as mmengine's LinearLR +
CosineAnnealingLR), checked against the values of X-SAM's file and on the tiny paper scaffold."""

from __future__ import annotations

import math
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler
from flowseg import add_flowseg_config
from flowseg.engine import build_optimizer
from flowseg.engine.ddp import NEVER_USED_SUBMODULES
from flowseg.utils.tiny_models import make_tiny_llm_dir
from paper_scaffold import ROOT, paper_scaffold_cfg, referring_batch

XSAM_STAGE3 = os.path.join(ROOT, "configs", "stages", "stage3_joint_xsam.yaml")
LORA_STAGE3 = os.path.join(ROOT, "configs", "stages", "stage3_joint.yaml")

#: the switches of the X-SAM stage-3 config that the tiny scaffold takes over
RECIPE_KEYS = [
    "MODEL.SAM_VIT.FREEZE", "MODEL.SAM_VIT.USE_ACT_CHECKPOINT", "MODEL.LLM.FREEZE",
    "MODEL.LLM.LORA.ENABLED", "MODEL.LLM.GRADIENT_CHECKPOINTING", "MODEL.VANILLA_ENCODER.FREEZE",
    "MODEL.VANILLA_ENCODER.GRADIENT_CHECKPOINTING", "SOLVER.BACKBONE_MULTIPLIER",
    "SOLVER.VANILLA_ENCODER_MULTIPLIER", "SOLVER.LLM_MULTIPLIER", "SOLVER.WEIGHT_DECAY",
    "SOLVER.WEIGHT_DECAY_NORM", "SOLVER.WEIGHT_DECAY_EMBED",
]  # fmt: skip


def _load(path):
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(path)
    return cfg


def _get(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def test_xsam_stage3_values_are_xsams():
    cfg, lora = _load(XSAM_STAGE3), _load(LORA_STAGE3)
    s = cfg.SOLVER
    # xsam_qwen3_4b_instruct_..._e1_gpu16.py: freeze_llm / freeze_vision_encoder / freeze_mask_encoder False
    assert not (cfg.MODEL.LLM.FREEZE or cfg.MODEL.LLM.LORA.ENABLED or cfg.MODEL.VANILLA_ENCODER.FREEZE)
    assert not cfg.MODEL.SAM_VIT.FREEZE and cfg.MODEL.LLM.TORCH_DTYPE == "float32"  # fp32 master weights
    # use_activation_checkpointing (XSamModel's default) covers the LLM, SigLIP2 and SAM
    assert cfg.MODEL.LLM.GRADIENT_CHECKPOINTING and cfg.MODEL.VANILLA_ENCODER.GRADIENT_CHECKPOINTING
    assert cfg.MODEL.SAM_VIT.USE_ACT_CHECKPOINT
    # deepspeed_zero2.json: gradients and optimizer state sharded, weights kept through backward
    dist = cfg.MODEL.DISTRIBUTED
    assert (dist.ENGINE, dist.RESHARD_AFTER_FORWARD, lora.MODEL.DISTRIBUTED.ENGINE) == ("fsdp", False, "ddp")
    assert s.AMP.ENABLED and s.AMP.PRECISION == "bfloat16"  # deepspeed_zero2.json bf16 "auto" on bf16 GPUs
    assert (s.OPTIMIZER, s.BASE_LR, s.WEIGHT_DECAY) == ("ADAMW", 4e-5, 0.05)  # betas: torch's (0.9, 0.999)
    assert s.WEIGHT_DECAY_NORM == s.WEIGHT_DECAY_EMBED == 0.05  # paramwise_cfg has no decay exemption
    assert (s.BACKBONE_MULTIPLIER, s.VANILLA_ENCODER_MULTIPLIER, s.LLM_MULTIPLIER) == (0.1, 0.1, 1.0)
    clip = s.CLIP_GRADIENTS
    assert clip.ENABLED and (clip.CLIP_TYPE, clip.CLIP_VALUE, clip.NORM_TYPE) == ("full_model", 1.0, 2.0)
    assert s.IMS_PER_BATCH == 64 == 4 * 16  # batch_size 4 per GPU x 16 GPUs
    assert s.WARMUP_ITERS == round(0.03 * s.MAX_ITER) and s.WARMUP_FACTOR == 1e-5  # warmup_ratio 0.03
    assert s.MAX_ITER * 64 == pytest.approx(609_000, rel=0.01)  # max_epochs 1
    # the data and modules are the LoRA variant's
    assert (
        cfg.DATASETS.TRAIN == lora.DATASETS.TRAIN
        and cfg.DATALOADER.TASK_RATIOS == lora.DATALOADER.TASK_RATIOS
    )
    assert cfg.MODEL.FLOWSEG.BAR.ENABLED and cfg.MODEL.WEIGHTS == lora.MODEL.WEIGHTS


def test_xsam_stage3_schedule_is_linear_warmup_then_cosine():
    cfg = _load(XSAM_STAGE3)
    s = cfg.SOLVER
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=s.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    got = []
    for _ in range(s.MAX_ITER):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    w, n = s.WARMUP_ITERS, s.MAX_ITER

    def mmengine(t):  # LinearLR(start_factor=1e-5, end=w) then CosineAnnealingLR(eta_min=0, begin=w, end=n)
        if t < w:
            return s.BASE_LR * (1e-5 + (1 - 1e-5) * t / w)
        return s.BASE_LR * 0.5 * (1 + math.cos(math.pi * (t - w) / (n - w)))

    for t in (0, 1, w // 2, w - 1, w, w + 1, (w + n) // 2, n - 1):
        assert got[t] == pytest.approx(mmengine(t), rel=1e-6, abs=1e-14), t


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return make_tiny_llm_dir(tmp_path_factory.mktemp("llm"))


def test_tiny_scaffold_trains_with_the_xsam_stage3_switches(llm):
    xsam = _load(XSAM_STAGE3)
    opts = [x for k in RECIPE_KEYS for x in (k, _get(xsam, k))]
    cfg = paper_scaffold_cfg(llm, *opts)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    head = model.condition_head
    assert head.vision_encoder.tower.is_gradient_checkpointing and head.llm.is_gradient_checkpointing
    frozen = {id(p) for p in model.parameters() if not p.requires_grad}
    # only what never reaches FlowSeg's output stays frozen: SAM's neck, SigLIP's pooling head, and
    # (FEATURE_LAYER -2) SigLIP's last layer and final LayerNorm
    tower = head.vision_encoder.tower
    vision_model = getattr(tower, "vision_model", tower)  # transformers 4 nests it, 5 does not
    modules = dict(model.named_modules())
    unused = [modules[n] for n in NEVER_USED_SUBMODULES]
    unused += [vision_model.encoder.layers[-1], vision_model.post_layernorm]
    assert frozen == {id(p) for m in unused for p in m.parameters()}
    opt = build_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    base = cfg.SOLVER.BASE_LR
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        slow = name.startswith(("condition_head.vision_encoder.", "backbone.")) and ".connector." not in name
        assert lr_of[id(p)] == pytest.approx(base * (0.1 if slow else 1.0)), name
        assert wd_of[id(p)] == (0.0 if "logit_scale" in name else 0.05), name
    losses = model(referring_batch())
    sum(losses.values()).backward()  # through the checkpointed SigLIP, LLM and SAM blocks
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing[:5]  # every trainable parameter gets a gradient (DDP needs no search)
