"""The tiny paper scaffold for tests: ``configs/tiny/flowseg_refer_tiny.yaml`` switched to the paper
configs' segmentor and language scaffold (SAM-ViT connector, square padding, 1/8 mask features,
cosine/background class head, BAR, X-SAM prompts, projector widths and SAM tokens), plus a
two-expression referring batch."""

from __future__ import annotations

import os
from typing import Any, Dict, List, Tuple

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.structures import BitMasks, Instances
from flowseg import add_flowseg_config
from flowseg.utils.tiny_models import tiny_llm_cfg_overrides

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_REFER = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")

#: the segmentor scaffold of the paper configs at tiny widths
XSAM_TINY = [
    "MODEL.SAM_VIT.FEATURE_PATH", "connector",
    "MODEL.SAM_VIT.CONNECTOR.LAYERS", [2, 3, 4],
    "MODEL.SAM_VIT.CONNECTOR.HIDDEN_DIM", 32,
    "MODEL.SAM_VIT.SQUARE_PAD", 128,
    "MODEL.SAM_VIT.RETURN_SAM_TOKENS", True,
    "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["p3", "p4", "p5"],
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", ["p3", "p4", "p5"],
    "MODEL.SEM_SEG_HEAD.NUM_FPN_LEVELS", 1,
    "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8,
    "MODEL.FLOWSEG.CONDITION_LOGITS", "background",
    "MODEL.FLOWSEG.BAR.STRIDE", 4,
]  # fmt: skip

#: X-SAM's language scaffold at tiny widths (prompts, projector MLP width, SAM tokens)
XSAM_LANGUAGE_TINY = [
    "MODEL.LLM.PROMPT_STYLE", "xsam",
    "MODEL.LLM.PROJ_HIDDEN_DIM", 16,
    "MODEL.LLM.SAM_TOKENS.ENABLED", True,
    "MODEL.VANILLA_ENCODER.FEATURE_LAYER", -2,
]  # fmt: skip


def paper_scaffold_cfg(llm: Dict[str, str], *opts: Any, lora: bool = False) -> CfgNode:
    """The tiny paper scaffold's config (``llm``: :func:`flowseg.utils.tiny_models.make_tiny_llm_dir`);
    ``lora``: LoRA on a frozen LLM, else full fine-tuning."""
    cfg = add_flowseg_config(get_cfg())
    cfg.merge_from_file(TINY_REFER)
    cfg.merge_from_list(
        tiny_llm_cfg_overrides(llm, lora=lora)
        + XSAM_TINY
        + XSAM_LANGUAGE_TINY
        + ["MODEL.LLM.FREEZE", lora, "MODEL.DEVICE", "cpu", *opts]
    )
    return cfg


def referring_batch(hw: Tuple[int, int] = (96, 128)) -> List[Dict[str, Any]]:
    """Two referring samples (same seeded image content each call) with one target mask each."""
    g = torch.Generator().manual_seed(0)
    out = []
    for k, expression in enumerate(("the small red circle", "the leftmost star")):
        inst = Instances(hw)
        masks = torch.zeros(1, *hw, dtype=torch.bool)
        masks[0, 20 + 10 * k : 60 + 10 * k, 30:70] = True
        inst.gt_masks, inst.gt_classes = BitMasks(masks), torch.zeros(1, dtype=torch.long)
        image = torch.randint(0, 255, (3, *hw), dtype=torch.uint8, generator=g)
        out.append({"image": image, "instances": inst, "expression": expression, "task": "referring"})
    return out
