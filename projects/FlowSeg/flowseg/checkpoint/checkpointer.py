"""``FlowSegCheckpointer``: one ``MODEL.WEIGHTS`` key for every checkpoint a FlowSeg run starts from.

It is Detectron2's ``DetectionCheckpointer`` (same ``save`` / ``load`` / ``resume_or_load``, same
file layout, so ``--resume`` and the periodic checkpoints are unchanged) plus:

* **Source formats**, recognised by their key names (:func:`~.formats.detect_checkpoint_format`)
  and converted to FlowSeg's names (:mod:`.conversions`): FlowSeg checkpoints of any stage, SAM
  (official or Hugging Face), Mask2Former (Detectron2 or Hugging Face) and X-SAM checkpoints.
  ``.safetensors`` files and Hugging Face model folders are read as well.
* **LLM wrapper layouts**: keys are matched across peft's layouts (LoRA on / off) and the trained
  rows of the new tokens move between a full embedding matrix and peft's token deltas
  (:mod:`.peft_layout`), so that e.g. a stage-2 checkpoint starts a stage-3 model with every
  trained tensor.
* **Position tables** of the SAM encoder saved at another input size are resampled
  (:mod:`.position_tables`).
* **A load report grouped by component** (:class:`~.report.LoadReport`, kept as
  ``checkpointer.last_report``): absences a stage transition or the source format explains
  (:mod:`.missing_keys`) are logged at INFO, everything else at WARNING. Tensors whose shapes
  differ are skipped, each named with both shapes; for a FlowSeg checkpoint that is an error
  (:class:`CheckpointShapeError`) unless partial loading is asked for.

**What a FlowSeg checkpoint contains.** With ``SOLVER.CHECKPOINT_TRAINABLE_ONLY`` (the default;
``trainable_only=True``) the trainer's checkpoints hold what training changes plus the names and
fingerprints of the frozen tensors and the files they come from (:mod:`.trainable`; loading one
rebuilds the full model from those files). Otherwise, and for a checkpointer made without a config,
a checkpoint is the model's *full* state dict (~10 GB at the paper's sizes: Qwen3-4B in bf16
≈ 8 GB, SigLIP2-so400m ≈ 0.8 GB, SAM-L encoder + heads in fp32 ≈ 1.3 GB);
``tools/export_full_checkpoint.py`` turns any checkpoint into one.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Dict, Mapping, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from .components import group_keys_by_component
from .conversions import prepare_state_dict
from .full_state import is_sharded
from .missing_keys import is_pretrained, missing_reason
from .report import LoadReport, shape_error_message
from .sam import model_sam_neck
from .trainable import (
    MANIFEST_KEY,
    loaded_checkpoint_info,
    note_loaded_checkpoint,
    outside_run,
    restore_frozen_base,
    trainable_state_dict,
)

__all__ = ["CheckpointShapeError", "FlowSegCheckpointer", "NotACheckpointError"]

logger = logging.getLogger(__name__)

_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class NotACheckpointError(ValueError):
    """``MODEL.WEIGHTS`` names a file that holds no model weights."""


class CheckpointShapeError(ValueError):
    """A FlowSeg checkpoint's tensors do not fit the model (a checkpoint of another config)."""


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


class FlowSegCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` for FlowSeg; see the module docstring.

    Args:
        model, save_dir, save_to_disk, checkpointables: as for ``DetectionCheckpointer``.
        cfg: optional; ``MODEL.LLM.PATH`` / ``MODEL.VANILLA_ENCODER.PATH`` then say whether LLM /
            vision-tower weights absent from a checkpoint come from a pretrained folder (INFO) or
            stay randomly initialised (WARNING). Without it this is read off the models themselves.
        allow_partial: load a FlowSeg checkpoint whose tensors' shapes differ from the model's
            (skipping those); default ``cfg.MODEL.WEIGHTS_PARTIAL_LOAD`` (False without cfg): a
            :class:`CheckpointShapeError` otherwise.
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        cfg: Optional[CfgNode] = None,
        allow_partial: Optional[bool] = None,
        trainable_only: Optional[bool] = None,
        **checkpointables: Any,
    ) -> None:
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.cfg = cfg
        self.allow_partial = allow_partial
        self.last_report: Optional[LoadReport] = None
        self._source = ""
        if trainable_only is None:  # the config decides; without one, full state dicts
            trainable_only = bool(cfg is not None and cfg.SOLVER.get("CHECKPOINT_TRAINABLE_ONLY", False))
        self.trainable_only = trainable_only

    @property
    def source(self) -> str:
        """The checkpoint file being (or last) loaded."""
        return self._source

    @classmethod
    def from_checkpointer(
        cls, other: DetectionCheckpointer, cfg: Optional[CfgNode] = None
    ) -> FlowSegCheckpointer:
        """The same model, save folder and checkpointables (e.g. ``DefaultTrainer``'s) in a FlowSegCheckpointer."""
        return cls(
            other.model, other.save_dir, save_to_disk=other.save_to_disk, cfg=cfg, **other.checkpointables
        )

    # ------------------------------------------------------------------ writing
    def save(self, name: str, **kwargs: Any) -> None:
        """``Checkpointer.save``; with ``trainable_only`` the model part is
        :func:`.trainable.trainable_state_dict` and the manifest of the frozen tensors is added.
        A sharded model (:class:`.full_state.FullStateView`) is gathered on every rank (call it
        on all of them) and the main process writes the same format as an unsharded run."""
        sharded = is_sharded(self.model)
        if not self.trainable_only and not sharded:
            return super().save(name, **kwargs)
        if not self.save_dir or not (self.save_to_disk or sharded):
            return None
        if self.trainable_only:
            loaded = outside_run(loaded_checkpoint_info(self.model), self.save_dir)
            state, manifest = trainable_state_dict(self.model, self.cfg, loaded)
            data: Dict[str, Any] = {"model": state, MANIFEST_KEY: manifest}
        else:
            data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        if not self.save_to_disk:
            return None
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        if self.trainable_only:
            self.logger.info(
                "Saving trainable-only checkpoint to %s (%d tensors; %d frozen ones named with their source)",
                save_file,
                manifest["num_saved"],
                manifest["num_left_out"],
            )
        else:
            self.logger.info("Saving checkpoint to %s", save_file)
        with self.path_manager.open(save_file, "wb") as f:
            torch.save(data, f)
        self.tag_last_checkpoint(os.path.basename(save_file))
        return None

    # ------------------------------------------------------------------ reading
    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        """``DetectionCheckpointer.load``; ``path`` may also be a Hugging Face model folder
        (its single ``model.safetensors`` or ``pytorch_model.bin``)."""
        if path and os.path.isdir(path):
            for name in _HF_WEIGHT_FILES:
                if os.path.isfile(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise FileNotFoundError(
                    f"{path} is a folder without {' or '.join(_HF_WEIGHT_FILES)} (sharded files are not "
                    "supported: point MODEL.WEIGHTS at a single checkpoint file)"
                )
        return super().load(path, *args, **kwargs)

    # fvcore's file-reading hook, meant for subclasses: it records the source for the report, reads
    # .safetensors and names a file that holds no weights.
    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._source = filename
        try:
            if filename.endswith(".safetensors"):
                from safetensors.torch import load_file

                loaded = {"model": load_file(filename, device="cpu")}
            else:
                loaded = super()._load_file(filename)
        except FileNotFoundError:
            raise
        except Exception as e:  # torch.load / pickle / safetensors raise many types for other files
            raise NotACheckpointError(
                f"{filename} is not a checkpoint (MODEL.WEIGHTS / --weights): it cannot be read as a "
                f"torch, pickle or safetensors file ({type(e).__name__}: {str(e)[:300]})"
            ) from e
        model = loaded.get("model") if isinstance(loaded, dict) else None
        if not isinstance(model, Mapping) or not model:
            raise NotACheckpointError(f"{filename} is not a checkpoint (MODEL.WEIGHTS): it holds no weights")
        return loaded

    def load_weights(self, path: str) -> None:
        """Load only the model tensors of the checkpoint file ``path`` (no checkpointables, nothing
        logged; the report is ``last_report``), e.g. the base of a trainable-only checkpoint while
        that one is being loaded (:attr:`source` is kept)."""
        source = self._source
        self._load_model(self._load_file(path))
        self._source = source

    # fvcore's hook between reading a file and loading the model (it has no public one): sources
    # are converted and the grouped report is built here.
    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        # a trainable-only checkpoint: its base loaded first, its frozen tensors filled in
        checkpoint, pending = restore_frozen_base(self, checkpoint)
        model = _unwrap(self.model)
        state_dict: Dict[str, torch.Tensor] = dict(checkpoint["model"])
        self._convert_ndarray_to_tensor(state_dict)
        fmt, state_dict, report = prepare_state_dict(state_dict, model, self._source)
        present = set(group_keys_by_component(state_dict))
        checkpoint["model"] = state_dict
        incompatible = super()._load_model(checkpoint)

        neck = model_sam_neck(model)
        pretrained = functools.partial(is_pretrained, cfg=self.cfg, model=model)
        loaded = report.record_load(
            incompatible,
            state_dict,
            model,
            lambda component, key: missing_reason(component, key, present, fmt, neck, pretrained),
        )
        self.last_report = report
        if report.incorrect_shapes and fmt == "flowseg" and not self._allow_partial():
            raise CheckpointShapeError(shape_error_message(report))
        note_loaded_checkpoint(model, pending, loaded)
        return incompatible

    def _allow_partial(self) -> bool:
        if self.allow_partial is not None:
            return self.allow_partial
        return bool(self.cfg is not None and self.cfg.MODEL.get("WEIGHTS_PARTIAL_LOAD", False))

    # fvcore's logging hook: the grouped report replaces its flat key lists.
    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        if self.last_report is not None:
            self.last_report.log(logger)
        else:  # pragma: no cover - _load_model always sets it
            super()._log_incompatible_keys(incompatible)
