#!/usr/bin/env python
"""Train / evaluate FlowSeg with Detectron2's ``DefaultTrainer``.

    python projects/FlowSeg/train_net.py --config-file configs/flowseg_coco_panoptic.yaml --num-gpus 8
    python projects/FlowSeg/train_net.py --config-file ... --eval-only MODEL.WEIGHTS model_final.pth
    python projects/FlowSeg/train_net.py --config-file ... --resume          # continue OUTPUT_DIR
    # multi-node: --num-machines 2 --machine-rank {0,1} --dist-url tcp://HOST:PORT

The pieces live in :mod:`flowseg.engine` (optimizer, evaluators, metrics JSON, NaN guards); this
file only wires them into ``Trainer``. Evaluation results are also written to
``OUTPUT_DIR/metrics_<dataset>.json`` and ``OUTPUT_DIR/metrics_all.json``
(``OUTPUT_DIR/metrics.json`` stays Detectron2's training log).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

if importlib.util.find_spec("flowseg") is None:  # a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flowseg  # noqa: F401,E402  (registers FlowSeg's models, datasets and mappers)
from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from flowseg import add_flowseg_config
from flowseg.checkpoint import FlowSegCheckpointer, check_evaluation_weights
from flowseg.engine import FlowSegTrainer, resolve_amp
from flowseg.utils.inference import check_device
from flowseg.utils.log_files import plain_log_files, setup_plain_log_files


class Trainer(FlowSegTrainer):
    """The extension point of a run: override ``DefaultTrainer``'s class methods here
    (``build_train_loader``, ``build_test_loader``, ``build_evaluator``, ``build_optimizer``,
    ``test``); :class:`flowseg.engine.FlowSegTrainer` holds FlowSeg's versions."""


def setup(args: Any) -> CfgNode:
    """Config from ``--config-file`` and the trailing ``KEY VALUE`` opts, then Detectron2's setup."""
    cfg = get_cfg()
    add_flowseg_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    check_device(cfg)  # MODEL.DEVICE cuda without a GPU: say which key to change
    resolve_amp(cfg)  # SOLVER.AMP.PRECISION against the device (bf16 autocast on CPU too)
    cfg.freeze()
    setup_plain_log_files(cfg.OUTPUT_DIR, comm.get_rank())  # log.txt without colour codes
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="flowseg")
    plain_log_files()
    return cfg


def main(args: Any) -> Any:
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = FlowSegCheckpointer(model, save_dir=cfg.OUTPUT_DIR, cfg=cfg)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        # parts left at their initialisation (a checkpoint of another stage or task) are an error
        # unless TEST.ALLOW_UNTRAINED_PARTS
        check_evaluation_weights(model, cfg, checkpointer.last_report)
        if args.resume and checkpointer.has_checkpoint():
            # the metrics files name the weights evaluated: OUTPUT_DIR's last checkpoint here
            cfg = cfg.clone()
            cfg.defrost()
            cfg.MODEL.WEIGHTS = checkpointer.get_checkpoint_file()
            cfg.freeze()
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def invoke_main() -> None:
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    invoke_main()
