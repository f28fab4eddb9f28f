"""Config and model loading for inference scripts (the demo, the analysis tools, tests).

* :func:`check_cfg_args` / :func:`build_cfg`: FlowSeg's Detectron2 config from a yaml file,
  ``KEY VALUE`` overrides (a script's :func:`add_opts_argument`) and an optional checkpoint path;
* :func:`load_model`: ``build_model`` with ``MODEL.WEIGHTS`` loaded, in eval mode.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, List, Optional, Sequence

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..checkpoint.checkpointer import FlowSegCheckpointer
from ..config import add_flowseg_config

__all__ = ["add_opts_argument", "check_cfg_args", "check_device", "build_cfg", "load_model"]

logger = logging.getLogger(__name__)


def add_opts_argument(parser: argparse.ArgumentParser, example: str = "MODEL.DEVICE cuda") -> None:
    """``--opts KEY VALUE ...``: config overrides, the rest of the command line (default ``[]``)."""
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        metavar="KEY VALUE",
        help=f"config overrides, e.g. --opts {example} (must come last)",
    )


def check_cfg_args(config_file: str, opts: Sequence[Any] = ()) -> List[str]:
    """The checks :func:`build_cfg` makes before reading anything; returns ``opts`` as strings.

    Raises ``FileNotFoundError`` when ``config_file`` does not exist and ``ValueError`` when
    ``opts`` is not a list of ``KEY VALUE`` pairs.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"config file not found: {config_file}")
    opts = [str(o) for o in opts]
    if len(opts) % 2:
        raise ValueError(f"--opts needs KEY VALUE pairs, got an odd number of items: {opts}")
    return opts


def build_cfg(config_file: str, weights: Optional[str] = None, opts: Sequence[Any] = ()) -> CfgNode:
    """Detectron2 config with FlowSeg's keys, ``config_file`` merged, then ``opts``, then ``weights``
    (as ``MODEL.WEIGHTS``, when given). Not frozen. See :func:`check_cfg_args` for the errors."""
    opts = check_cfg_args(config_file, opts)
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    if weights is not None:
        cfg.MODEL.WEIGHTS = weights
    return cfg


def check_device(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming ``MODEL.DEVICE`` when it asks for CUDA that this torch lacks."""
    device = str(cfg.MODEL.DEVICE)
    if not device.startswith("cuda"):
        return
    if not torch.cuda.is_available():
        build = (
            "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
        )
        raise ValueError(
            f"MODEL.DEVICE is {device!r} but torch {torch.__version__} ({build}) has no CUDA device: "
            "set MODEL.DEVICE cpu (e.g. append `MODEL.DEVICE cpu` to the command line)"
        )
    index = device.partition(":")[2]
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(
            f"MODEL.DEVICE is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
        )


def load_model(cfg: CfgNode, log: logging.Logger = logger) -> torch.nn.Module:
    """``build_model(cfg)`` with ``cfg.MODEL.WEIGHTS`` loaded by ``FlowSegCheckpointer`` (trainable-only
    checkpoints included), eval mode.

    With no weights the model stays randomly initialised, with a warning on ``log``.
    """
    check_device(cfg)
    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        # FlowSeg's checkpointer: converted sources, the full model rebuilt from a trainable-only
        # checkpoint, and a checkpoint of another config is an error
        FlowSegCheckpointer(model, cfg=cfg).load(cfg.MODEL.WEIGHTS)
    else:
        log.warning("MODEL.WEIGHTS is empty: the model is randomly initialised")
    return model.eval()
