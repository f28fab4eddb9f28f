"""The benchmarked models: LLM / vision-tower configs at the paper's (or the tests') sizes, a
tokenizer, the Detectron2 config of each variant, and building them (``meta``: shapes only)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from typing import Dict, Optional

import torch

from . import ROOT

PAPER_CONFIG = os.path.join(ROOT, "configs", "flowseg_refcoco.yaml")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny", "flowseg_refer_tiny.yaml")
VARIANTS = ("baseline", "flowseg")

#: Qwen3-4B (hf.co/Qwen/Qwen3-4B config.json); tied input/output embeddings.
QWEN3_4B = dict(
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
#: ``len()`` of Qwen3's tokenizer: 151,643 BPE tokens + 26 special ones. The LLM's embedding
#: matrix is padded to 151,936 rows; X-SAM resizes it to ``len(tokenizer)`` after adding
#: ``<SEG>``, ``<p>``, ``</p>``: 151,672 rows in Table 9's count.
QWEN3_TOKENIZER_LEN = 151_669
#: SigLIP2-so400m vision tower; patch 14 at 384 (27x27 = 729 tokens, fixed resolution, the
#: paper's config) or the NaFlex patch-16 variant (24x24 = 576 tokens at 384).
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16)


def write_model_files(workdir: str, tiny: bool, vision: str) -> Dict[str, str]:
    """LLM / vision configs (json) and a tokenizer under ``workdir``; returns their paths."""
    from flowseg.utils.tiny_models import (
        CHATML_TEMPLATE,
        make_tokenizer,
        tiny_qwen3_config,
        tiny_siglip2_vision_config,
        tiny_siglip_vision_config,
    )
    from transformers import Qwen3Config, Siglip2VisionConfig, SiglipVisionConfig

    tok = make_tokenizer(CHATML_TEMPLATE)  # Qwen's chat format (ChatML)
    if not tiny:
        tok = pad_vocabulary(tok, QWEN3_TOKENIZER_LEN)
    paths = {"tokenizer": os.path.join(workdir, "tokenizer")}
    tok.save_pretrained(paths["tokenizer"])
    if tiny:
        llm = tiny_qwen3_config(len(tok))
        vis = tiny_siglip_vision_config() if vision == "patch14-384" else tiny_siglip2_vision_config()
    else:
        llm = Qwen3Config(**QWEN3_4B)
        if vision == "patch14-384":
            vis = SiglipVisionConfig(**SO400M, image_size=384, patch_size=14)
        else:
            vis = Siglip2VisionConfig(**SO400M, num_patches=(384 // 16) ** 2, patch_size=16)
    for key, config in (("llm_config", llm), ("vision_config", vis)):
        paths[key] = os.path.join(workdir, f"{key}.json")
        with open(paths[key], "w") as f:
            json.dump(config.to_dict(), f)
    return paths


def pad_vocabulary(tokenizer, size: int):
    """``tokenizer`` (a fast BPE) with filler entries appended to its vocabulary up to ``size``:
    ``len()`` of the result is ``size`` and text tokenises as before (no merge reaches a filler)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab.update({f"<|filler_{i}|>": i for i in range(len(vocab), size)})
    padded = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
    )
    padded.chat_template = tokenizer.chat_template
    return padded


def build_config(variant: str, args: argparse.Namespace, files: Dict[str, str]):
    """The Detectron2 config of ``variant`` ("baseline" / "flowseg")."""
    from detectron2.config import get_cfg
    from flowseg import add_flowseg_config

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(TINY_CONFIG if args.tiny else PAPER_CONFIG)
    on = variant == "flowseg"
    dtype = "float32" if args.dtype == "float32" else "bfloat16"
    cfg.merge_from_list(
        [
            "MODEL.DEVICE", args.device,
            "MODEL.WEIGHTS", "",
            "MODEL.SAM_VIT.CHECKPOINT", "",
            "MODEL.LLM.PATH", "",
            "MODEL.LLM.CONFIG", files["llm_config"],
            "MODEL.LLM.TOKENIZER_PATH", files["tokenizer"],
            "MODEL.LLM.TORCH_DTYPE", dtype,
            "MODEL.VANILLA_ENCODER.ENABLED", True,
            "MODEL.VANILLA_ENCODER.PATH", "",
            "MODEL.VANILLA_ENCODER.CONFIG", files["vision_config"],
            "MODEL.FLOWSEG.SEMANTIC_REFINEMENT", on,
            "MODEL.FLOWSEG.CONDITION_REFINEMENT", on,
            "MODEL.FLOWSEG.BAR.ENABLED", on,
            "MODEL.SAM_VIT.USE_ACT_CHECKPOINT", args.sam_act_checkpoint,
            "DATASETS.TRAIN", "()",
            "DATASETS.TEST", "()",
        ]
    )  # fmt: skip
    if args.tiny:
        from flowseg.utils.tiny_models import TINY_IMAGE_SIZE

        cfg.MODEL.VANILLA_ENCODER.IMAGE_SIZE = TINY_IMAGE_SIZE
    elif args.vision == "patch14-384":
        # so400m-patch14-384 reads 384 px as 27x27 patches (the stride-14 conv drops 6 px);
        # VanillaEncoder wants a multiple of the patch: 378 = 27 x 14 gives the same 729 tokens.
        cfg.MODEL.VANILLA_ENCODER.IMAGE_SIZE = 378
    return cfg


@contextlib.contextmanager
def parameters_on_meta():
    """Every parameter registered inside lives on the ``meta`` device (shapes, no memory), like
    ``accelerate.init_empty_weights``: ``torch.device("meta")`` itself cannot build the model
    (Detectron2's ViT reads ``.item()`` of a tensor at construction)."""
    register = torch.nn.Module.register_parameter

    def to_meta(module: torch.nn.Module, name: str, param: Optional[torch.nn.Parameter]) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            kwargs = dict(p.__dict__, requires_grad=p.requires_grad)
            module._parameters[name] = type(p)(p.to("meta"), **kwargs)

    from torch.fx.experimental import _config as fx_config

    # Data-dependent ops at build time (boolean-mask indexing of the embedding rows) need a
    # shape on meta: any shape will do, nothing is read.
    nonzero = fx_config.meta_nonzero_assume_all_nonzero
    torch.nn.Module.register_parameter = to_meta
    fx_config.meta_nonzero_assume_all_nonzero = True
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register
        fx_config.meta_nonzero_assume_all_nonzero = nonzero


def build(cfg, device: str) -> torch.nn.Module:
    """``build_model`` with every tensor created on ``device`` directly (a random init of 4B
    parameters takes seconds on the GPU, minutes on the CPU); ``meta``: shapes only."""
    import logging

    from detectron2.modeling import build_model

    torch.manual_seed(0)
    if device == "meta":
        with parameters_on_meta():
            return build_model(cfg)  # cfg.MODEL.DEVICE "meta" moves the buffers too
    try:
        with torch.device(device):
            return build_model(cfg)
    except Exception as e:  # a build step that needs CPU tensors: build there, then move
        logging.getLogger(__name__).warning("building on %s failed (%s); building on the CPU", device, e)
        torch.manual_seed(0)
        return build_model(cfg)
