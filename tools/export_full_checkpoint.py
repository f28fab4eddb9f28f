#!/usr/bin/env python
"""Write a self-contained (full) FlowSeg checkpoint from any checkpoint the project can load.

Training writes trainable-only checkpoints (``SOLVER.CHECKPOINT_TRAINABLE_ONLY``): the trained
tensors plus the names and fingerprints of the frozen ones and of the files they come from (the
LLM / vision-tower folders, the checkpoint the run started from). This builds the model from the
config, loads the checkpoint through :class:`flowseg.checkpoint.FlowSegCheckpointer` (which
restores the frozen tensors from those files and checks them) and saves the model's full state
dict, loadable with ``MODEL.WEIGHTS`` without any of those files (``MODEL.LLM.PATH`` then only
provides the tokenizer and the architecture). ``--merge-lora`` folds the LoRA adapters into the
base weights (peft's ``merge_and_unload``): the file then has the key layout of a model without
LoRA (``MODEL.LLM.LORA.ENABLED False``), which FlowSeg's checkpointer also loads into a model with
LoRA on (the adapters then start from zero, i.e. the same function).

    python tools/export_full_checkpoint.py --config-file configs/flowseg_refcoco.yaml \\
        --weights output/flowseg_refcoco/model_final.pth --output model_full.pth [--merge-lora]
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "projects", "FlowSeg"))

import torch  # noqa: E402

__all__ = ["export_full_checkpoint", "main"]


def _merge_lora(model: torch.nn.Module) -> None:
    head = getattr(model, "condition_head", None)
    llm = getattr(head, "llm", None)
    if llm is None or not hasattr(llm, "merge_and_unload"):
        raise ValueError("--merge-lora: the model's LLM has no peft adapters to merge")
    head.llm = llm.merge_and_unload()


def export_full_checkpoint(
    config_file: str, weights: str, output: str, opts: Optional[List[Any]] = None, merge_lora: bool = False
) -> Dict[str, Any]:
    """Build, load ``weights`` and save the full state dict to ``output`` (``{"model": ...}``).
    Returns ``{"num_tensors", "bytes"}`` of what was written."""
    import flowseg  # noqa: F401  (registers FlowSeg's components)
    from detectron2.modeling import build_model
    from flowseg.checkpoint import FlowSegCheckpointer
    from flowseg.utils.inference import build_cfg

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"checkpoint file not found: {weights}")
    cfg = build_cfg(config_file, weights, list(opts or []))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg).eval()
    FlowSegCheckpointer(model, cfg=cfg).load(weights)
    if merge_lora:
        _merge_lora(model)
    state = model.state_dict()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    torch.save({"model": state}, output)
    return {"num_tensors": len(state), "bytes": os.path.getsize(output)}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the config the checkpoint was trained with")
    p.add_argument("--weights", required=True, help="checkpoint to export (trainable-only or full)")
    p.add_argument("--output", required=True, help="where to write the full checkpoint (.pth)")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the LLM's base weights")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="extra KEY VALUE config options")
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    res = export_full_checkpoint(args.config_file, args.weights, args.output, args.opts, args.merge_lora)
    print(f"wrote {args.output}: {res['num_tensors']} tensors, {res['bytes'] / 2**20:.1f} MiB")
    return res


if __name__ == "__main__":
    main()
