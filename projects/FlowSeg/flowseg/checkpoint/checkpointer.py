"""``FlowSegCheckpointer``: one ``MODEL.WEIGHTS`` key for every checkpoint a FlowSeg run starts from.

It is Detectron2's ``DetectionCheckpointer`` (same ``save`` / ``load`` / ``resume_or_load``, same
file layout, so ``--resume`` and the periodic checkpoints are unchanged) plus:

* **Source formats**, recognised by their key names (:func:`detect_checkpoint_format`):

  - ``"flowseg"``: this project's checkpoints, of any stage;
  - ``"sam"``: an official ``segment_anything`` checkpoint (``image_encoder.*``) or a Hugging Face
    ``SamModel`` one (``vision_encoder.*``), converted by :func:`convert_sam_checkpoint` to
    ``backbone.*`` (prompt encoder / mask decoder dropped);
  - ``"mask2former_d2"`` (original Mask2Former Detectron2 ``.pkl`` / ``.pth``) and
    ``"mask2former_hf"`` (Hugging Face ``Mask2Former*`` state dict), converted by
    :func:`convert_mask2former_checkpoint` to ``sem_seg_head.*`` (their backbone is dropped);
  - ``"xsam"``: X-SAM's ``pytorch_model.bin`` of any stage, either key generation, converted by
    :func:`~flowseg.checkpoint.xsam.convert_xsam_checkpoint`; the report lists the converted keys
    per component (``LoadReport.converted``) and FlowSeg's own modules, which X-SAM does not have,
    as newly initialised (``LoadReport.newly_initialised``: BSF and BAR).

  ``.safetensors`` files are read as well.
* **LLM wrapper layouts.** peft names the LLM's tensors after its wrappers:
  ``condition_head.llm.model.layers.0.self_attn.q_proj.weight`` without LoRA,
  ``condition_head.llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` with it.
  Keys are matched across these layouts (:func:`canonical_key`), and the trained rows of the new
  tokens (``<p>``, ``</p>``, ``<SEG>``) move between a full embedding matrix and peft's
  ``trainable_tokens_delta``, so that e.g. a stage-2 checkpoint (LoRA off) starts a stage-3 model
  (LoRA on) with every trained tensor.
* **Position tables** of the SAM encoder (absolute ``pos_embed``, relative ``rel_pos_h/w``) saved
  at another input size are resampled, as Detectron2's ViT does at run time.
* **A load report grouped by component** (:func:`group_keys_by_component`, :class:`LoadReport`,
  kept as ``checkpointer.last_report``): missing and unexpected keys per component with counts and
  example names. Absences a stage transition explains are logged at INFO (BSF + BAR + condition
  head when stage 3 starts from a stage-1 checkpoint; LLM / vision-tower weights that come from
  ``MODEL.LLM.PATH`` / ``MODEL.VANILLA_ENCODER.PATH``; parts a SAM or Mask2Former checkpoint does
  not have), everything else at WARNING. Tensors whose shapes differ (``class_embed`` after a
  class-count change, an embedding matrix of another vocabulary size) are skipped, each named with
  both shapes; the generic class head of a checkpoint trained without an LLM is dropped (INFO)
  when the model classifies by query–condition similarity instead, and so is the auxiliary
  segment classifier (``MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT``) when the model has none.

**What a FlowSeg checkpoint contains.** With ``SOLVER.CHECKPOINT_TRAINABLE_ONLY`` (the default;
``trainable_only=True``) the trainer's checkpoints hold what training changes plus the names and
fingerprints of the frozen tensors and the files they come from (:mod:`.trainable`; loading one
rebuilds the full model from those files). Otherwise, and for a checkpointer made without a config,
a checkpoint is the model's *full* state dict (~10 GB at the paper's sizes: Qwen3-4B in bf16
≈ 8 GB, SigLIP2-so400m ≈ 0.8 GB, SAM-L encoder + heads in fp32 ≈ 1.3 GB);
``tools/export_full_checkpoint.py`` turns any checkpoint into one.
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from fvcore.common.checkpoint import _IncompatibleKeys
from torch import nn

from .mask2former import convert_hf_mask2former
from .mask2former_decoder import convert_d2_mask2former_checkpoint
from .sam import _resize_pos_embed, _resize_rel_pos, convert_sam_checkpoint, sam_neck_prefix
from .xsam import XSamConversion, convert_xsam_checkpoint, is_xsam_checkpoint

try:  # fvcore's handling of tied parameters (one tensor, several names) in the missing-key list
    from fvcore.common.checkpoint import _filter_reused_missing_keys
except ImportError:  # pragma: no cover - older fvcore

    def _filter_reused_missing_keys(model: nn.Module, keys: List[str]) -> List[str]:
        return list(keys)


__all__ = [
    "COMPONENTS",
    "CheckpointShapeError",
    "FlowSegCheckpointer",
    "NotACheckpointError",
    "LoadReport",
    "align_llm_layout",
    "canonical_key",
    "component_of",
    "detect_checkpoint_format",
    "group_keys_by_component",
    "resample_position_tables",
    "transfer_token_rows",
]

logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# ----------------------------------------------------------------------------------- components
#: Component id -> label used in the load report, in report order.
COMPONENTS: Dict[str, str] = OrderedDict(
    [
        ("segmentation_encoder", "segmentation encoder (SAM-ViT)"),
        ("pixel_decoder", "pixel decoder"),
        ("transformer_decoder", "transformer decoder"),
        ("transformer_decoder.bsf", "transformer decoder / BSF modules (SR, fusion gates, CR)"),
        ("transformer_decoder.condition_logits", "transformer decoder / condition-logit head"),
        ("transformer_decoder.class_head", "transformer decoder / class head (class_embed)"),
        ("aux_classifier", "auxiliary segment classifier (MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT)"),
        ("condition_head.llm_base", "condition head / LLM base weights"),
        ("condition_head.lora", "condition head / LoRA"),
        ("condition_head.token_rows", "condition head / new-token rows (<p>, </p>, <SEG>)"),
        ("condition_head.projectors", "condition head / projectors (phi_vis, phi_llm, SAM-token projector)"),
        ("condition_head.vision_tower", "condition head / vision tower"),
        ("condition_head", "condition head (other)"),
        ("refiner", "refiner (BAR)"),
        ("other", "other"),
    ]
)

_PREDICTOR = "sem_seg_head.predictor."
_AUX_CLASSIFIER = "sem_seg_head.aux_classifier."
# FlowSeg's additions to X-SAM's scaffold: never in an X-SAM checkpoint
_NEW_MODULES = ("transformer_decoder.bsf", "refiner")
_PROJECTOR_SCOPES = (
    "condition_head.vis_projector.",
    "condition_head.llm_projector.",
    "condition_head.sam_projector.",
)
_BSF_MODULES = ("semantic_cross_attention_layers", "fusion_gates", "condition_refinement_layers")
_CONDITION_LOGIT_MODULES = (
    "cond_query_proj",
    "no_object_embed",
    "background_embed",
    "logit_scale",
    "mask_position_proj",
)
_LLM = "condition_head.llm."
# peft adapter tensors: lora_A/B, lora_embedding_A/B, DoRA's lora_magnitude_vector
_LORA_RE = re.compile(r"\.lora_[A-Za-z_]+\.")
_TOKEN_DELTA_RE = re.compile(r"^(?P<layer>.+)\.trainable_tokens_delta\.(?P<adapter>[^.]+)$")


def component_of(key: str) -> str:
    """The component id (a key of :data:`COMPONENTS`) of one FlowSeg state-dict key."""
    if key.startswith("backbone."):
        return "segmentation_encoder"
    if key.startswith("sem_seg_head.pixel_decoder."):
        return "pixel_decoder"
    if key.startswith(_AUX_CLASSIFIER):
        return "aux_classifier"
    if key.startswith(_PREDICTOR):
        module = key[len(_PREDICTOR) :].split(".", 1)[0]
        if module in _BSF_MODULES:
            return "transformer_decoder.bsf"
        if module in _CONDITION_LOGIT_MODULES:
            return "transformer_decoder.condition_logits"
        if module == "class_embed":
            return "transformer_decoder.class_head"
        return "transformer_decoder"
    if key.startswith(_LLM):
        if _LORA_RE.search(key):
            return "condition_head.lora"
        if ".trainable_tokens_" in key:
            return "condition_head.token_rows"
        return "condition_head.llm_base"
    if key.startswith(_PROJECTOR_SCOPES):
        return "condition_head.projectors"
    if key.startswith("condition_head.vision_encoder."):
        return "condition_head.vision_tower"
    if key.startswith("condition_head."):
        return "condition_head"
    if key.startswith("refiner."):
        return "refiner"
    return "other"


def group_keys_by_component(keys: Iterable[str]) -> Dict[str, List[str]]:
    """Group state-dict keys by FlowSeg component (non-empty groups only, in :data:`COMPONENTS` order).

    Ids: ``segmentation_encoder``, ``pixel_decoder``, ``transformer_decoder`` (and within it
    ``transformer_decoder.bsf``, ``.condition_logits``, ``.class_head``), ``condition_head.llm_base``,
    ``condition_head.lora``, ``condition_head.token_rows``, ``condition_head.projectors``,
    ``condition_head.vision_tower``, ``condition_head`` (other), ``refiner``, ``other``.
    """
    groups: Dict[str, List[str]] = {c: [] for c in COMPONENTS}
    for key in keys:
        groups[component_of(key)].append(key)
    return {c: sorted(v) for c, v in groups.items() if v}


# ----------------------------------------------------------------------------------- formats
_FLOWSEG_MARKERS = ("backbone.net.", "backbone.simfp_", "condition_head.", "refiner.")
_SAM_SCOPES = ("image_encoder.", "vision_encoder.", "prompt_encoder.", "mask_decoder.")
_SAM_BARE_KEYS = ("patch_embed.proj.weight", "patch_embed.projection.weight")


def detect_checkpoint_format(keys: Iterable[str]) -> str:
    """``"flowseg"``, ``"xsam"``, ``"sam"``, ``"mask2former_hf"`` or ``"mask2former_d2"``, from the
    key names.

    FlowSeg's own names win (its vision tower lives under ``condition_head.vision_encoder``, a name
    SAM's Hugging Face port also uses at the top level), then X-SAM's (whose SigLIP is also under
    ``vision_encoder.``). Unknown layouts count as ``"flowseg"``:
    they are loaded by name and whatever does not match is reported.
    """
    keys = list(keys)
    if any(k.startswith(_FLOWSEG_MARKERS) for k in keys):
        return "flowseg"
    if is_xsam_checkpoint(keys):
        return "xsam"
    if any(k.startswith(_SAM_SCOPES) or k in _SAM_BARE_KEYS for k in keys):
        return "sam"
    if any("transformer_module." in k or "pixel_level_module." in k for k in keys):
        return "mask2former_hf"
    if any(k.startswith("sem_seg_head.") for k in keys):
        return "mask2former_d2"
    return "flowseg"


def canonical_key(key: str) -> str:
    """``key`` without peft's wrapper names (``base_model.model.``, ``token_adapter``, ``base_layer``).

    Two LLM keys with the same canonical name hold the same base tensor in different peft layouts
    (LoRA on/off, trainable-token rows or not). Keys outside ``condition_head.llm.`` are unchanged.
    """
    if not key.startswith(_LLM):
        return key
    rest = key[len(_LLM) :]
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model.") :]
    return _LLM + rest.replace(".token_adapter.", ".").replace(".base_layer.", ".")


# ----------------------------------------------------------------------------------- report
_EXAMPLES = 3
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def _shape_hint(key: str) -> str:
    if ".class_embed." in key:
        return " - another class count (MODEL.SEM_SEG_HEAD.NUM_CLASSES): trained from scratch"
    if key.startswith(_LLM) and ("embed_tokens" in key or "lm_head" in key):
        return " - another vocabulary size (tokenizer / added special tokens)"
    if "pos_embed" in key or "rel_pos" in key:
        return " - position table of another input size that could not be resampled"
    return ""


@dataclass
class LoadReport:
    """What one :meth:`FlowSegCheckpointer.load` did, grouped by component (see :data:`COMPONENTS`).

    ``missing_expected`` / ``missing_unexpected``: model keys the checkpoint did not provide, split by
    whether the stage transition / source format explains them (``missing_reasons`` says how);
    ``unexpected``: checkpoint keys the model has no use for; ``dropped``: checkpoint keys removed on
    purpose (``dropped_reasons``); ``incorrect_shapes``: (key, checkpoint shape, model shape) skipped;
    ``notes``: renames, row transfers, resampling; ``converted``: (X-SAM checkpoints) model keys
    renamed from the source format, by component.
    """

    source: str = ""
    source_format: str = "flowseg"
    num_loaded: int = 0
    num_model_keys: int = 0
    missing_expected: Dict[str, List[str]] = field(default_factory=dict)
    missing_unexpected: Dict[str, List[str]] = field(default_factory=dict)
    missing_reasons: Dict[str, str] = field(default_factory=dict)
    unexpected: Dict[str, List[str]] = field(default_factory=dict)
    dropped: Dict[str, List[str]] = field(default_factory=dict)
    dropped_reasons: Dict[str, str] = field(default_factory=dict)
    incorrect_shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    converted: Dict[str, List[str]] = field(default_factory=dict)

    @property
    def newly_initialised(self) -> Dict[str, List[str]]:
        """FlowSeg's own modules that the source format has no weights for (BSF, BAR), by component."""
        return {c: v for c, v in self.missing_expected.items() if c in _NEW_MODULES}

    @property
    def missing(self) -> Dict[str, List[str]]:
        """All missing keys by component (expected and not)."""
        keys = [k for g in (self.missing_expected, self.missing_unexpected) for v in g.values() for k in v]
        return group_keys_by_component(keys)

    @property
    def clean(self) -> bool:
        """True when nothing needs a WARNING (no unexplained missing/unexpected key, no shape skip)."""
        return not (self.missing_unexpected or self.unexpected or self.incorrect_shapes)

    @staticmethod
    def _group_line(component: str, keys: Sequence[str], reason: str = "") -> str:
        examples = ", ".join(keys[:_EXAMPLES]) + (", ..." if len(keys) > _EXAMPLES else "")
        line = f"  {COMPONENTS[component]}: {len(keys)} key{'s' if len(keys) != 1 else ''} ({examples})"
        return f"{line}\n      -> {reason}" if reason else line

    def info_text(self) -> str:
        lines = [
            f"Loaded {self.num_loaded} of {self.num_model_keys} model tensors from {self.source or 'checkpoint'}"
            f" (format: {self.source_format})."
        ]
        lines += [f"  note: {n}" for n in self.notes]
        if self.converted:
            lines.append(f"Converted from the {self.source_format} names:")
            lines += [self._group_line(c, v) for c, v in self.converted.items()]
        if self.missing_expected:
            lines.append(
                "Not in the checkpoint, as expected (kept at their initialisation / pretrained weights):"
            )
            lines += [
                self._group_line(c, v, self.missing_reasons.get(c, ""))
                for c, v in self.missing_expected.items()
            ]
        if self.dropped:
            lines.append("Checkpoint tensors dropped on purpose:")
            lines += [
                self._group_line(c, v, self.dropped_reasons.get(c, "")) for c, v in self.dropped.items()
            ]
        return "\n".join(lines)

    def warning_text(self) -> str:
        lines: List[str] = []
        if self.incorrect_shapes:
            lines.append(
                "Skipped tensors whose shape differs from the model's (they keep their initialisation):"
            )
            lines += [
                f"  {k}: checkpoint {tuple(a)} vs model {tuple(b)} [{COMPONENTS[component_of(k)]}]{_shape_hint(k)}"
                for k, a, b in self.incorrect_shapes
            ]
        if self.missing_unexpected:
            lines.append("Model tensors NOT found in the checkpoint (left at their initialisation):")
            lines += [self._group_line(c, v) for c, v in self.missing_unexpected.items()]
        if self.unexpected:
            lines.append("Checkpoint tensors the model does not use:")
            lines += [self._group_line(c, v) for c, v in self.unexpected.items()]
        return "\n".join(lines)

    def log(self, log: logging.Logger = logger) -> None:
        log.info(self.info_text())
        warning = self.warning_text()
        if warning:
            log.warning(f"{self.source or 'checkpoint'}:\n{warning}")


# ----------------------------------------------------------------------------------- helpers
def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _hf_pretrained(module: Optional[nn.Module]) -> bool:
    """Whether a transformers model was loaded with ``from_pretrained`` from a weights folder (a
    model built ``from_config`` remembers the config json, or nothing, as its name)."""
    if module is None:
        return False
    base = module.get_base_model() if hasattr(module, "get_base_model") else module
    name = str(getattr(getattr(base, "config", None), "_name_or_path", "") or "")
    return bool(name) and not name.endswith(".json")


def _special_token_rows(model: nn.Module) -> Optional[List[int]]:
    # The rows peft trains for the new tokens, in the order LLMConditionHead passes them.
    ids = getattr(getattr(model, "condition_head", None), "token_ids", None)
    if ids is None:
        return None
    return [int(ids.p_start), int(ids.p_end), int(ids.seg)]


def align_llm_layout(state_dict: StateDict, model_keys: Iterable[str]) -> Tuple[StateDict, int]:
    """Rename checkpoint LLM keys to the model's peft layout when only the wrapper names differ.

    Returns the new dict and the number of renamed keys.
    """
    model_keys = set(model_keys)
    by_canonical: Dict[str, str] = {}
    for k in model_keys:
        if k.startswith(_LLM):
            by_canonical.setdefault(canonical_key(k), k)
    out: StateDict = {}
    renamed = 0
    for key, value in state_dict.items():
        target = key
        if key not in model_keys and key.startswith(_LLM):
            candidate = by_canonical.get(canonical_key(key))
            if candidate is not None and candidate not in state_dict and candidate not in out:
                target, renamed = candidate, renamed + 1
        out[target] = value
    return out, renamed


def _base_weight_key(layer: str, by_canonical: Mapping[str, str]) -> Optional[str]:
    # canonical name of the layer's weight (the layer path itself may end in a wrapper name)
    return by_canonical.get(canonical_key(layer + ".weight"))


def transfer_token_rows(state_dict: StateDict, model: nn.Module) -> List[str]:
    """Move the trained rows of the new tokens between peft's ``trainable_tokens_delta`` and full
    embedding matrices, in place; returns notes for the report.

    * model has a delta the checkpoint lacks, checkpoint has the full matrix: delta = its rows;
    * checkpoint has a delta the model lacks (model without peft token adapters): the rows are
      written into the matrix (the model's special-token ids give their positions).
    """
    model_sd_keys = list(model.state_dict().keys())
    by_canonical = {canonical_key(k): k for k in model_sd_keys if k.startswith(_LLM)}
    model_keys = set(model_sd_keys)
    notes: List[str] = []
    for key in model_sd_keys:
        m = _TOKEN_DELTA_RE.match(key)
        if m is None or not key.startswith(_LLM) or key in state_dict:
            continue
        base = _base_weight_key(m.group("layer"), by_canonical)
        layer = model.get_submodule(m.group("layer"))
        indices = getattr(layer, "token_indices", {}).get(m.group("adapter"))
        if base is None or base not in state_dict or not indices:
            continue
        weight = state_dict[base]
        if weight.dim() != 2 or weight.shape[0] <= max(indices):
            continue
        state_dict[key] = weight[list(indices)].clone()
        notes.append(
            f"new-token rows {list(indices)} of {m.group('layer')} taken from the checkpoint's {base}"
        )
    rows = _special_token_rows(model)
    for key in [k for k in state_dict if k.startswith(_LLM) and k not in model_keys]:
        m = _TOKEN_DELTA_RE.match(canonical_key(key))
        if m is None:
            continue
        base = _base_weight_key(m.group("layer"), by_canonical)
        delta = state_dict[key]
        if base is None or base not in state_dict or rows is None or len(rows) != delta.shape[0]:
            continue
        if state_dict[base].shape[0] <= max(rows) or state_dict[base].shape[1:] != delta.shape[1:]:
            continue
        merged = state_dict[base].clone()
        merged[rows] = delta.to(merged.dtype)
        state_dict[base] = merged
        del state_dict[key]
        notes.append(f"new-token rows {rows} of the checkpoint's {key} written into {base}")
    return notes


def resample_position_tables(state_dict: StateDict, model_state: Mapping[str, torch.Tensor]) -> List[str]:
    """Resample SAM-ViT ``pos_embed`` / ``rel_pos_{h,w}`` saved at another input size, in place."""
    notes = []
    for key, value in list(state_dict.items()):
        want = model_state.get(key)
        if not key.startswith("backbone.") or want is None or want.shape == value.shape:
            continue
        if value.dim() != want.dim() or value.shape[-1] != want.shape[-1]:
            continue
        if key.endswith("pos_embed") and value.dim() == 3:
            side = int(round(value.shape[1] ** 0.5))
            if side * side != value.shape[1] or int(round(want.shape[1] ** 0.5)) ** 2 != want.shape[1]:
                continue
            state_dict[key] = _resize_pos_embed(value, want.shape[1])
        elif key.endswith(("rel_pos_h", "rel_pos_w")) and value.dim() == 2:
            state_dict[key] = _resize_rel_pos(value, want.shape[0])
        else:
            continue
        notes.append(f"resampled {key} from {tuple(value.shape)} to {tuple(want.shape)}")
    return notes


# Missing components a FlowSeg checkpoint of an earlier stage explains, when it has none of their keys.
_STAGE_REASONS = {
    "transformer_decoder.bsf": "Bidirectional Semantic Flow is introduced in stage 3 (paper A.3): new modules",
    "refiner": "BAR is introduced in stage 3 (paper A.3): new module",
    "transformer_decoder.condition_logits": (
        "query-condition similarity replaces the class head of a checkpoint trained without an LLM"
    ),
    "transformer_decoder.class_head": "the checkpoint classified by condition similarity: new class head",
    "condition_head.lora": "LoRA starts from its initialisation (B = 0: the base LLM unchanged)",
    "condition_head.projectors": "checkpoint without a condition head: projectors start fresh (stage 2 trains them)",
    "condition_head": "checkpoint without a condition head",
}


# ----------------------------------------------------------------------------------- checkpointer
class NotACheckpointError(ValueError):
    """``MODEL.WEIGHTS`` names a file that holds no model weights."""


class CheckpointShapeError(ValueError):
    """A FlowSeg checkpoint's tensors do not fit the model (a checkpoint of another config)."""


def _shape_error(report: LoadReport) -> str:
    shown = "; ".join(f"{k}: checkpoint {a} vs model {b}" for k, a, b in report.incorrect_shapes[:5])
    return (
        f"{report.source}: {len(report.incorrect_shapes)} tensors have other shapes than the model's "
        f"(a checkpoint of another config?), e.g. {shown}. Loading it would leave them randomly "
        "initialised. Use the config the checkpoint was trained with, or set "
        "MODEL.WEIGHTS_PARTIAL_LOAD True to load only the tensors whose shapes match."
    )


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
        self._xsam = XSamConversion()
        self._source = ""
        if trainable_only is None:  # the config decides; without one, full state dicts
            trainable_only = bool(cfg is not None and cfg.SOLVER.get("CHECKPOINT_TRAINABLE_ONLY", False))
        self.trainable_only = trainable_only

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
        :func:`.trainable.trainable_state_dict` and the manifest of the frozen tensors is added."""
        if not self.trainable_only:
            return super().save(name, **kwargs)
        from .trainable import MANIFEST_KEY, loaded_checkpoint_info, outside_run, trainable_state_dict

        if not self.save_dir or not self.save_to_disk:
            return None
        loaded = outside_run(loaded_checkpoint_info(self.model), self.save_dir)
        state, manifest = trainable_state_dict(self.model, self.cfg, loaded)
        data: Dict[str, Any] = {"model": state, MANIFEST_KEY: manifest}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        save_file = os.path.join(self.save_dir, f"{name}.pth")
        self.logger.info(
            "Saving trainable-only checkpoint to %s (%d tensors; %d frozen ones named with their source)",
            save_file,
            manifest["num_saved"],
            manifest["num_left_out"],
        )
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

    def _convert_source(self, state_dict: StateDict, fmt: str) -> StateDict:
        if fmt == "sam":
            backbone = getattr(self.model, "backbone", None)
            neck = sam_neck_prefix(backbone) if backbone is not None else None
            return convert_sam_checkpoint(state_dict, prefix_out="backbone.", neck_prefix=neck or "simfp_4")
        if fmt == "mask2former_d2":
            # num_classes=None: a class head of another size is reported as a shape mismatch below
            return convert_d2_mask2former_checkpoint(state_dict)
        if fmt == "mask2former_hf":
            return convert_hf_mask2former(state_dict)
        if fmt == "xsam":
            state_dict, self._xsam = convert_xsam_checkpoint(
                state_dict, _unwrap(self.model).state_dict().keys()
            )
        return state_dict

    def _report_xsam(self, report: LoadReport, state_dict: StateDict) -> None:
        """Converted / dropped keys of an X-SAM checkpoint in ``report``."""
        info: XSamConversion = self._xsam
        report.source_format = f"xsam ({info.generation} key names)"
        report.converted = group_keys_by_component(k for k in info.converted if k in state_dict)
        if info.dropped:
            report.dropped["other"] = sorted(info.dropped)
            report.dropped_reasons["other"] = "SAM's prompt positional table: FlowSeg has no prompt encoder"

    def _pretrained(self, which: str) -> bool:
        if self.cfg is not None:
            node = self.cfg.MODEL.LLM if which == "llm" else self.cfg.MODEL.VANILLA_ENCODER
            return bool(node.PATH)
        head = getattr(self.model, "condition_head", None)
        if which == "llm":
            return _hf_pretrained(getattr(head, "llm", None))
        return _hf_pretrained(getattr(getattr(head, "vision_encoder", None), "tower", None))

    def _missing_reason(self, component: str, key: str, present: Set[str], fmt: str, neck: str) -> str:
        """Why ``key`` is expected to be missing ("" = it is not)."""
        if fmt == "xsam" and component in _NEW_MODULES:
            return "FlowSeg's addition to X-SAM's scaffold (BSF / BAR): newly initialised"
        if fmt == "sam":
            if component != "segmentation_encoder":
                return "not part of a SAM image-encoder checkpoint"
            if not key.startswith(("backbone.net.", f"backbone.{neck}.")):
                return "feature-path layers SAM has no weights for (pyramid stages other than its neck, connector)"
            return ""
        if fmt.startswith("mask2former"):
            if component == "segmentation_encoder":
                return "a Mask2Former checkpoint has no SAM encoder (load it with MODEL.SAM_VIT.CHECKPOINT)"
            if component in ("pixel_decoder", "transformer_decoder") or component in present:
                return ""
            return "not part of a Mask2Former checkpoint"
        if component in present:
            return ""  # partly there: a real mismatch
        if component == "condition_head.llm_base":
            return "loaded from MODEL.LLM.PATH" if self._pretrained("llm") else ""
        if component == "condition_head.vision_tower":
            return "loaded from MODEL.VANILLA_ENCODER.PATH" if self._pretrained("vision") else ""
        if component == "condition_head.token_rows":
            if "condition_head.llm_base" not in present and self._pretrained("llm"):
                return "initialised with the LLM from MODEL.LLM.PATH (mean embedding row)"
            return ""
        return _STAGE_REASONS.get(component, "")

    # ------------------------------------------------------------------ loading
    def _load_model(self, checkpoint: Any) -> _IncompatibleKeys:
        from .trainable import note_loaded_checkpoint, restore_frozen_base

        # a trainable-only checkpoint: its base loaded first, its frozen tensors filled in
        checkpoint, pending = restore_frozen_base(self, checkpoint)
        model = _unwrap(self.model)
        state_dict: StateDict = dict(checkpoint["model"])
        self._convert_ndarray_to_tensor(state_dict)
        if state_dict and all(k.startswith("module.") for k in state_dict):
            state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # saved from DDP
        fmt = detect_checkpoint_format(state_dict)
        state_dict = self._convert_source(state_dict, fmt)
        model_state = model.state_dict()
        report = LoadReport(source=self._source, source_format=fmt, num_model_keys=len(model_state))
        if fmt == "xsam":
            self._report_xsam(report, state_dict)

        state_dict, renamed = align_llm_layout(state_dict, model_state.keys())
        if renamed:
            report.notes.append(f"{renamed} LLM tensors renamed between peft layouts (LoRA / token adapters)")
        report.notes += transfer_token_rows(state_dict, model)
        report.notes += resample_position_tables(state_dict, model_state)

        def drop(component: str, keys: List[str], reason: str) -> None:
            for k in keys:
                del state_dict[k]
            report.dropped[component] = sorted(keys)
            report.dropped_reasons[component] = reason

        # The generic class head of a checkpoint trained without an LLM has no place in a model that
        # classifies by query-condition similarity: drop it knowingly instead of calling it unexpected.
        head_keys = [k for k in state_dict if k.startswith(_PREDICTOR + "class_embed.")]
        if head_keys and not any(k in model_state for k in head_keys):
            if _PREDICTOR + "logit_scale" in model_state:
                drop(
                    "transformer_decoder.class_head",
                    head_keys,
                    "generic-mode class head; this model scores queries against condition embeddings",
                )
        # The auxiliary segment classifier only trains the stage-1 segmentor's features.
        aux_keys = [k for k in state_dict if k.startswith(_AUX_CLASSIFIER) and k not in model_state]
        if aux_keys:
            drop("aux_classifier", aux_keys, "training aid of the checkpoint's stage; this model has none")

        present = set(group_keys_by_component(state_dict))
        checkpoint["model"] = state_dict
        incompatible = super()._load_model(checkpoint)

        shape_skipped = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [
            k for k in _filter_reused_missing_keys(model, incompatible.missing_keys) if k not in shape_skipped
        ]
        backbone = getattr(model, "backbone", None)
        neck = (sam_neck_prefix(backbone) if backbone is not None else None) or "simfp_4"
        expected: List[str] = []
        for k in missing:
            reason = self._missing_reason(component_of(k), k, present, fmt, neck)
            if reason:
                expected.append(k)
                report.missing_reasons.setdefault(component_of(k), reason)
        expected_set = set(expected)
        report.missing_expected = group_keys_by_component(expected)
        report.missing_unexpected = group_keys_by_component(k for k in missing if k not in expected_set)
        report.unexpected = group_keys_by_component(incompatible.unexpected_keys)
        report.incorrect_shapes = [(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes]
        unused = set(incompatible.unexpected_keys)
        report.num_loaded = sum(1 for k in state_dict if k not in unused and k not in shape_skipped)
        self.last_report = report
        if report.incorrect_shapes and fmt == "flowseg" and not self._allow_partial():
            raise CheckpointShapeError(_shape_error(report))
        note_loaded_checkpoint(model, pending, (k for k in state_dict if k not in unused | shape_skipped))
        return incompatible

    def _allow_partial(self) -> bool:
        if self.allow_partial is not None:
            return self.allow_partial
        return bool(self.cfg is not None and self.cfg.MODEL.get("WEIGHTS_PARTIAL_LOAD", False))

    def _log_incompatible_keys(self, incompatible: _IncompatibleKeys) -> None:
        # Replaces fvcore's flat lists by the grouped report built in _load_model.
        if self.last_report is not None:
            self.last_report.log(logger)
        else:  # pragma: no cover - _load_model always sets it
            super()._log_incompatible_keys(incompatible)
