"""A source checkpoint's state dict -> the names and layouts of the FlowSeg model it is loaded into.

Source formats (:func:`~.formats.detect_checkpoint_format`):

- ``"flowseg"``: this project's checkpoints, of any stage, loaded by name;
- ``"sam"``: an official ``segment_anything`` checkpoint (``image_encoder.*``) or a Hugging Face
  ``SamModel`` one (``vision_encoder.*``), converted by :func:`~.sam.convert_sam_checkpoint` to
  ``backbone.*`` (prompt encoder / mask decoder dropped);
- ``"mask2former_d2"`` (original Mask2Former Detectron2 ``.pkl`` / ``.pth``) and
  ``"mask2former_hf"`` (Hugging Face ``Mask2Former*`` state dict), converted by the
  :mod:`.mask2former` converters to ``sem_seg_head.*`` (their backbone is dropped);
- ``"xsam"``: X-SAM's ``pytorch_model.bin`` of any stage, either key generation, converted by
  :func:`~.xsam.convert_xsam_checkpoint`; the report lists the converted keys per component
  (``LoadReport.converted``) and FlowSeg's own modules, which X-SAM does not have, as newly
  initialised (``LoadReport.newly_initialised``: BSF and BAR).

Then LLM keys are matched to the model's peft layout (:mod:`.peft_layout`), SAM-ViT position tables
saved at another input size are resampled (:mod:`.position_tables`), and heads the model has no
place for are dropped on purpose: the generic class head of a checkpoint trained without an LLM
when the model classifies by query-condition similarity instead, and the auxiliary segment
classifier (``MODEL.MASK_FORMER.SEGMENT_AUX_WEIGHT``) when the model has none.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .components import AUX_CLASSIFIER_PREFIX, PREDICTOR_PREFIX, group_keys_by_component
from .formats import detect_checkpoint_format
from .mask2former import convert_hf_mask2former
from .mask2former_decoder import convert_d2_mask2former_checkpoint
from .peft_layout import align_llm_layout, transfer_token_rows
from .position_tables import resample_position_tables
from .report import LoadReport
from .sam import convert_sam_checkpoint, model_sam_neck
from .xsam import XSamConversion, convert_xsam_checkpoint

__all__ = ["convert_source", "prepare_state_dict"]

StateDict = Dict[str, torch.Tensor]


def convert_source(
    state_dict: StateDict, fmt: str, model: nn.Module
) -> Tuple[StateDict, Optional[XSamConversion]]:
    """``state_dict`` of source format ``fmt`` under FlowSeg's names (and, for X-SAM, what the
    conversion did)."""
    if fmt == "sam":
        return convert_sam_checkpoint(
            state_dict, prefix_out="backbone.", neck_prefix=model_sam_neck(model)
        ), None
    if fmt == "mask2former_d2":
        # num_classes=None: a class head of another size is reported as a shape mismatch on loading
        return convert_d2_mask2former_checkpoint(state_dict), None
    if fmt == "mask2former_hf":
        return convert_hf_mask2former(state_dict), None
    if fmt == "xsam":
        return convert_xsam_checkpoint(state_dict, model.state_dict().keys())
    return state_dict, None


def _record_xsam(report: LoadReport, info: XSamConversion, state_dict: StateDict) -> None:
    report.source_format = f"xsam ({info.generation} key names)"
    report.converted = group_keys_by_component(k for k in info.converted if k in state_dict)
    if info.dropped:
        report.dropped["other"] = sorted(info.dropped)
        report.dropped_reasons["other"] = "SAM's prompt positional table: FlowSeg has no prompt encoder"


def _drop(state_dict: StateDict, report: LoadReport, component: str, keys: List[str], reason: str) -> None:
    for k in keys:
        del state_dict[k]
    report.dropped[component] = sorted(keys)
    report.dropped_reasons[component] = reason


def _drop_heads_without_place(
    state_dict: StateDict, model_state: Mapping[str, torch.Tensor], report: LoadReport
) -> None:
    # The generic class head of a checkpoint trained without an LLM has no place in a model that
    # classifies by query-condition similarity: drop it knowingly instead of calling it unexpected.
    head_keys = [k for k in state_dict if k.startswith(PREDICTOR_PREFIX + "class_embed.")]
    if head_keys and not any(k in model_state for k in head_keys):
        if PREDICTOR_PREFIX + "logit_scale" in model_state:
            _drop(
                state_dict,
                report,
                "transformer_decoder.class_head",
                head_keys,
                "generic-mode class head; this model scores queries against condition embeddings",
            )
    # The auxiliary segment classifier only trains the stage-1 segmentor's features.
    aux_keys = [k for k in state_dict if k.startswith(AUX_CLASSIFIER_PREFIX) and k not in model_state]
    if aux_keys:
        _drop(
            state_dict,
            report,
            "aux_classifier",
            aux_keys,
            "training aid of the checkpoint's stage; this model has none",
        )


def prepare_state_dict(
    state_dict: StateDict, model: nn.Module, source: str
) -> Tuple[str, StateDict, LoadReport]:
    """Bring a checkpoint's state dict (tensors) to ``model``'s names, layouts and shapes.

    Returns the detected source format, the new state dict and a :class:`~.report.LoadReport` of
    ``source`` holding what was converted, renamed, resampled and dropped.
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}  # saved from DDP
    fmt = detect_checkpoint_format(state_dict)
    state_dict, xsam = convert_source(state_dict, fmt, model)
    model_state = model.state_dict()
    report = LoadReport(source=source, source_format=fmt, num_model_keys=len(model_state))
    if xsam is not None:
        _record_xsam(report, xsam, state_dict)

    state_dict, renamed = align_llm_layout(state_dict, model_state.keys())
    if renamed:
        report.notes.append(f"{renamed} LLM tensors renamed between peft layouts (LoRA / token adapters)")
    report.notes += transfer_token_rows(state_dict, model)
    report.notes += resample_position_tables(state_dict, model_state)
    _drop_heads_without_place(state_dict, model_state, report)
    return fmt, state_dict, report
