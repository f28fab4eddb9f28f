"""``FlowSegTrainer``: Detectron2's ``DefaultTrainer`` with FlowSeg's data, optimizer and evaluators.

Differences from ``DefaultTrainer`` (everything else, incl. hooks, ``resume_or_load``, ETA printing
by ``CommonMetricPrinter``, is Detectron2's):

* the train loader is :func:`flowseg.data.mixed.build_mixed_train_loader` (a seeded, step-indexed
  stream that can resume mid-run; one training data set is read with the mapper named by
  ``INPUT.DATASET_MAPPER_NAME``), or Detectron2's loader when ``DATALOADER.SAMPLER_TRAIN`` is not
  ``TrainingSampler``; test loaders use the mapper of each test data set's kind
  (:mod:`flowseg.data.build`);
* checkpoints carry the RNG states and ``--resume`` continues the data stream where it stopped
  (:mod:`flowseg.engine.resume`): kill + resume gives the weights of an uninterrupted run;
* :func:`flowseg.engine.build_optimizer` and :func:`flowseg.engine.build_evaluator`;
* ``test`` evaluates under ``DATALOADER.ON_BAD_SAMPLE`` (:mod:`flowseg.engine.skipping`) and writes
  ``OUTPUT_DIR/metrics_<dataset>.json`` and ``OUTPUT_DIR/metrics_all.json``, each naming the
  weights (path, sha256), iteration and config hash (:mod:`flowseg.engine.provenance`)
  (``metrics.json`` is Detectron2's training log);
* ``OUTPUT_DIR/loss_curve.png`` is redrawn from ``metrics.json`` at every checkpoint and at the end
  (:mod:`flowseg.engine.loss_curve`); TensorBoard event files are written when ``tensorboard`` is
  installed (optional);
* ``MODEL.DISTRIBUTED.ENGINE`` "fsdp" shards the model with FSDP2 (:mod:`flowseg.engine.fsdp`)
  instead of wrapping it in DDP; checkpoints keep DDP's format (:mod:`flowseg.checkpoint.full_state`);
* a non-finite loss raises :class:`NonFiniteLossError` on every rank before the optimizer step
  and the last checkpoint is kept (:mod:`flowseg.engine.hooks`).
"""

from __future__ import annotations

import importlib.util
import logging
import time
import weakref
from collections import OrderedDict
from typing import Any, Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, TrainerBase, create_ddp_model, hooks
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.events import EventWriter, TensorboardXWriter, get_event_storage, has_event_storage
from detectron2.utils.logger import setup_logger

from ..checkpoint.checkpointer import FlowSegCheckpointer
from ..checkpoint.full_state import FullStateView, full_optimizer_state_dict, load_full_optimizer_state_dict
from ..data.build import build_test_mapper, build_train_mapper, guard_mapper
from ..data.mixed import build_mixed_train_loader
from .ddp import ddp_kwargs
from .evaluation import build_evaluator, check_num_classes, write_metrics_json
from .freezing import apply_stage_freezing
from .fsdp import distributed_engine, shard_model
from .hooks import CheckedAMPTrainer, CheckedSimpleTrainer, NonFiniteLossError, SafePeriodicCheckpointer
from .loss_curve import LossCurveHook
from .optimizer import build_optimizer
from .provenance import evaluation_record
from .resume import ExactResumeHook
from .shared_features import SharedImageFeatureInference, build_grouped_test_loader
from .skipping import BadSampleGuard, write_skipped

__all__ = ["AMP_PRECISIONS", "FlowSegTrainer", "amp_precision", "resolve_amp"]

logger = logging.getLogger(__name__)


AMP_PRECISIONS = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def amp_precision(cfg: CfgNode) -> torch.dtype:
    """``SOLVER.AMP.PRECISION`` as a ``torch.dtype`` (ValueError naming the key if unknown)."""
    name = str(cfg.SOLVER.AMP.PRECISION).lower()
    if name not in AMP_PRECISIONS:
        raise ValueError(f"SOLVER.AMP.PRECISION must be one of {sorted(AMP_PRECISIONS)}, got {name!r}")
    return AMP_PRECISIONS[name]


def resolve_amp(cfg: CfgNode) -> CfgNode:
    """Check ``SOLVER.AMP`` against the device; say what a run will autocast to.

    The loop autocasts on the model's device type, so a CPU run of a paper config trains under CPU
    autocast in ``SOLVER.AMP.PRECISION``. A GPU without bfloat16 (before Ampere) gets float16 with
    loss scaling instead, as X-SAM's launcher does. Modifies ``cfg`` (must be unfrozen), returns it.
    """
    if not cfg.SOLVER.AMP.ENABLED:
        return cfg
    precision = amp_precision(cfg)
    device = torch.device(cfg.MODEL.DEVICE).type
    if device == "cuda" and precision == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        logger.warning("SOLVER.AMP.PRECISION=bfloat16 but this GPU lacks bfloat16: float16 with loss scaling")
        cfg.SOLVER.AMP.PRECISION = "float16"
    logger.info("AMP: autocast on %s in %s", device, cfg.SOLVER.AMP.PRECISION)
    if device == "cpu":
        logger.warning(
            "SOLVER.AMP on the CPU: %s matrix products are slow on CPUs without native support "
            "(AVX512-BF16 / AMX); SOLVER.AMP.ENABLED False trains in float32",
            cfg.SOLVER.AMP.PRECISION,
        )
    return cfg


def _no_skip_reason(dataset_name: str) -> str:
    if MetadataCatalog.get(dataset_name).get("evaluator_type", None) == "coco_panoptic_seg":
        return "panoptic quality needs a prediction for every image of the panoptic json"
    return ""


def _shares_image_features(cfg: CfgNode) -> bool:
    return cfg.MODEL.FLOWSEG.MODE == "referring" and cfg.TEST.get("SHARED_IMAGE_FEATURES", False)


class FlowSegTrainer(DefaultTrainer):
    """See the module docstring. ``train_net.Trainer`` subclasses it."""

    def __init__(self, cfg: CfgNode) -> None:
        check_num_classes(cfg, cfg.DATASETS.TEST)  # before training, not when the final eval starts
        # DefaultTrainer.__init__ with FlowSeg's DDP arguments (flowseg.engine.ddp.ddp_kwargs:
        # find_unused_parameters only where a part can miss a step's graph, device_ids=None on
        # CPU/gloo) and the loops that check the loss on every rank.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        self.sharded = distributed_engine(cfg) == "fsdp" and comm.get_world_size() > 1
        if self.sharded:
            model = shard_model(cfg, model)  # before the optimizer: its parameters become DTensors
        elif distributed_engine(cfg) == "fsdp":
            logger.info("MODEL.DISTRIBUTED.ENGINE fsdp with one process: nothing to shard, trained as is")
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        if not self.sharded:
            model = create_ddp_model(model, **ddp_kwargs(cfg, model))
        if cfg.SOLVER.AMP.ENABLED:
            device_type = next(model.parameters()).device.type
            self._trainer = CheckedAMPTrainer(
                model, data_loader, optimizer, precision=amp_precision(cfg), device_type=device_type
            )
        else:
            self._trainer = CheckedSimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        # FlowSeg's checkpointer: converts SAM / Mask2Former / earlier-stage checkpoints and
        # reports missing keys by component
        # (a sharded model through its full-state view: checkpoints in the format of a DDP run)
        self.checkpointer = FlowSegCheckpointer(
            FullStateView(model) if self.sharded else model,
            cfg.OUTPUT_DIR,
            cfg=cfg,
            trainer=weakref.proxy(self),
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: CfgNode) -> torch.nn.Module:
        model = super().build_model(cfg)
        apply_stage_freezing(model, cfg)  # MODEL.FLOWSEG.TRAINABLE, before the optimizer is built
        return model

    def state_dict(self) -> Dict[str, Any]:
        ret = super().state_dict()
        if self.sharded:  # every rank: gathering is a collective (the checkpointer calls it on all)
            ret["_trainer"]["optimizer"] = full_optimizer_state_dict(self.model, self.optimizer)
        return ret

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if not self.sharded:
            return super().load_state_dict(state_dict)
        TrainerBase.load_state_dict(self, state_dict)  # iteration and hooks
        inner = state_dict["_trainer"]
        load_full_optimizer_state_dict(self.model, self.optimizer, inner["optimizer"])
        if "grad_scaler" in inner:
            self._trainer.grad_scaler.load_state_dict(inner["grad_scaler"])
        return None

    def build_hooks(self) -> List[hooks.HookBase]:
        # first, so that the RNG state it keeps is taken before the checkpointer saves it
        ret = [ExactResumeHook(all_ranks=self.sharded)] + super().build_hooks()
        checkpointer = SafePeriodicCheckpointer(self.checkpointer, self.cfg.SOLVER.CHECKPOINT_PERIOD)
        for i, h in enumerate(ret):
            if type(h) is hooks.PeriodicCheckpointer:
                ret[i] = checkpointer
        if self.sharded and self.cfg.DATASETS.TEST:
            # inference calls submodules of the model directly (shared image features) and ranks
            # see different numbers of test samples, both of which FSDP's collectives cannot follow
            logger.warning(
                "MODEL.DISTRIBUTED.ENGINE fsdp: no evaluation during or after training (TEST.EVAL_PERIOD "
                "ignored); evaluate the checkpoint with --eval-only, which loads it unsharded"
            )
            ret = [h for h in ret if not isinstance(h, hooks.EvalHook)]
        if self.sharded and checkpointer not in ret:
            # Detectron2 checkpoints on the main process only; a sharded save is a collective
            # that every rank joins (before the evaluation, as on the main process)
            at = next((i for i, h in enumerate(ret) if isinstance(h, hooks.EvalHook)), len(ret))
            ret.insert(at, checkpointer)
        # last: after the writers have written the step's losses to metrics.json
        ret.append(LossCurveHook(self.cfg.OUTPUT_DIR, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        return ret

    def build_writers(self) -> List[EventWriter]:
        writers = super().build_writers()  # console (with ETA), metrics.json-lines, TensorBoard
        if importlib.util.find_spec("tensorboard") is None:
            # TensorBoard is optional: without it Detectron2's writer fails at the first write.
            logger.info("tensorboard is not installed: no TensorBoard event files are written")
            writers = [w for w in writers if not isinstance(w, TensorboardXWriter)]
        return writers

    def run_step(self) -> None:
        try:
            super().run_step()
        except NonFiniteLossError as e:
            last = self.checkpointer.get_checkpoint_file() or "none (no checkpoint saved yet)"
            e.args = (f"{e.args[0]}\nLast checkpoint (kept): {last}",)
            raise

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode) -> Any:
        check_num_classes(cfg, cfg.DATASETS.TRAIN)
        mixed = len(cfg.DATASETS.TRAIN) > 1 or len(cfg.DATALOADER.TASK_RATIOS) > 0
        mixed = mixed or cfg.INPUT.EXPRESSIONS_PER_IMAGE > 1
        if mixed or cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler":
            # stage 3: every batch from one task, drawn with DATALOADER.TASK_RATIOS (and the loader
            # that reads referring data per image when EXPRESSIONS_PER_IMAGE > 1); one data set:
            # the same seeded, step-indexed stream, which is what lets --resume continue it exactly
            mappers = (
                None if mixed else {cfg.DATASETS.TRAIN[0]: guard_mapper(cfg, build_train_mapper(cfg), True)}
            )
            return build_mixed_train_loader(cfg, mappers)
        logger.warning(
            "DATALOADER.SAMPLER_TRAIN=%s: Detectron2's training loader is used; --resume restarts "
            "its sampler, so a resumed run will not repeat an uninterrupted one exactly.",
            cfg.DATALOADER.SAMPLER_TRAIN,
        )
        return build_detection_train_loader(cfg, mapper=guard_mapper(cfg, build_train_mapper(cfg), True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str) -> Any:
        check_num_classes(cfg, [dataset_name])
        mapper = guard_mapper(cfg, build_test_mapper(cfg, dataset_name), False)  # DATALOADER.ON_BAD_SAMPLE
        if _shares_image_features(cfg):
            # one image's expressions per batch (same samples, mapper and sharding)
            return build_grouped_test_loader(cfg, dataset_name, mapper=mapper)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
    ) -> DatasetEvaluator:
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(
        cls, cfg: CfgNode, model: torch.nn.Module, evaluators: Optional[List[DatasetEvaluator]] = None
    ) -> Dict:
        if _shares_image_features(cfg):
            model = SharedImageFeatureInference(
                model,
                max_expressions_per_pass=cfg.TEST.EXPRESSIONS_PER_PASS,
                share_llm_prefix=cfg.TEST.SHARED_LLM_PREFIX,
            )
        names = list(cfg.DATASETS.TEST)
        if evaluators is not None and len(evaluators) != len(names):
            raise ValueError(f"{len(evaluators)} evaluators for {len(names)} data sets of DATASETS.TEST")
        per_name: Dict[str, Any] = OrderedDict()
        seconds: Dict[str, float] = {}
        for i, name in enumerate(names):  # one at a time: skipped samples are counted per data set
            guard = BadSampleGuard(model, cfg.DATALOADER.ON_BAD_SAMPLE, _no_skip_reason(name))
            one = cfg.clone()
            one.defrost()
            one.DATASETS.TEST = (name,)
            t0 = time.perf_counter()
            res = super().test(one, guard, None if evaluators is None else [evaluators[i]])
            seconds[name] = round(time.perf_counter() - t0, 2)
            skipped = guard.pop_skipped()
            if skipped:
                res = {**res, "bad_samples": {"skipped": len(skipped)}}
                if comm.is_main_process():
                    write_skipped(cfg.OUTPUT_DIR, name, skipped)
            per_name[name] = res
        results = per_name[names[0]] if len(names) == 1 else per_name
        if comm.is_main_process() and cfg.TEST.SAVE_METRICS_JSON and names:
            # DefaultTrainer.test unwraps a single data set's results; wrap them again by name.
            per_dataset = {names[0]: results} if len(names) == 1 else dict(results)
            # inside training (EvalHook) the storage knows the iteration; --eval-only has none
            iteration = get_event_storage().iter if has_event_storage() else None
            run = evaluation_record(cfg, iteration, seconds)
            paths = write_metrics_json(cfg.OUTPUT_DIR, per_dataset, iteration, run)
            logger.info(f"Metrics written to {paths['all']}")
        return results
