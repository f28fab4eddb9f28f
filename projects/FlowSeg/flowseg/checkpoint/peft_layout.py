"""Match the condition head's LLM tensors across peft's wrapper layouts.

peft names the LLM's tensors after its wrappers:
``condition_head.llm.model.layers.0.self_attn.q_proj.weight`` without LoRA,
``condition_head.llm.base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` with it.
Keys are matched across these layouts (:func:`canonical_key`), and the trained rows of the new
tokens (``<p>``, ``</p>``, ``<SEG>``) move between a full embedding matrix and peft's
``trainable_tokens_delta``, so that e.g. a stage-2 checkpoint (LoRA off) starts a stage-3 model
(LoRA on) with every trained tensor.
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn

from .components import LLM_PREFIX

__all__ = ["align_llm_layout", "canonical_key", "transfer_token_rows"]

StateDict = Dict[str, torch.Tensor]

_TOKEN_DELTA_RE = re.compile(r"^(?P<layer>.+)\.trainable_tokens_delta\.(?P<adapter>[^.]+)$")


def canonical_key(key: str) -> str:
    """``key`` without peft's wrapper names (``base_model.model.``, ``token_adapter``, ``base_layer``).

    Two LLM keys with the same canonical name hold the same base tensor in different peft layouts
    (LoRA on/off, trainable-token rows or not). Keys outside ``condition_head.llm.`` are unchanged.
    """
    if not key.startswith(LLM_PREFIX):
        return key
    rest = key[len(LLM_PREFIX) :]
    if rest.startswith("base_model.model."):
        rest = rest[len("base_model.model.") :]
    return LLM_PREFIX + rest.replace(".token_adapter.", ".").replace(".base_layer.", ".")


def align_llm_layout(state_dict: StateDict, model_keys: Iterable[str]) -> Tuple[StateDict, int]:
    """Rename checkpoint LLM keys to the model's peft layout when only the wrapper names differ.

    Returns the new dict and the number of renamed keys.
    """
    model_keys = set(model_keys)
    by_canonical: Dict[str, str] = {}
    for k in model_keys:
        if k.startswith(LLM_PREFIX):
            by_canonical.setdefault(canonical_key(k), k)
    out: StateDict = {}
    renamed = 0
    for key, value in state_dict.items():
        target = key
        if key not in model_keys and key.startswith(LLM_PREFIX):
            candidate = by_canonical.get(canonical_key(key))
            if candidate is not None and candidate not in state_dict and candidate not in out:
                target, renamed = candidate, renamed + 1
        out[target] = value
    return out, renamed


def _special_token_rows(model: nn.Module) -> Optional[List[int]]:
    # The rows peft trains for the new tokens, in the order LLMConditionHead passes them.
    ids = getattr(getattr(model, "condition_head", None), "token_ids", None)
    if ids is None:
        return None
    return [int(ids.p_start), int(ids.p_end), int(ids.seg)]


def _base_weight_key(layer: str, by_canonical: Mapping[str, str]) -> Optional[str]:
    # canonical name of the layer's weight (the layer path itself may end in a wrapper name)
    return by_canonical.get(canonical_key(layer + ".weight"))


def _rows_into_deltas(
    state_dict: StateDict, model: nn.Module, model_keys: List[str], by_canonical: Mapping[str, str]
) -> List[str]:
    """Fill each token delta the model has and the checkpoint lacks from the checkpoint's matrix."""
    notes: List[str] = []
    for key in model_keys:
        m = _TOKEN_DELTA_RE.match(key)
        if m is None or not key.startswith(LLM_PREFIX) or key in state_dict:
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
    return notes


def _deltas_into_rows(
    state_dict: StateDict, model: nn.Module, model_keys: List[str], by_canonical: Mapping[str, str]
) -> List[str]:
    """Write each checkpoint token delta the model has no place for into the full matrix."""
    known = set(model_keys)
    rows = _special_token_rows(model)
    notes: List[str] = []
    for key in [k for k in state_dict if k.startswith(LLM_PREFIX) and k not in known]:
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


def transfer_token_rows(state_dict: StateDict, model: nn.Module) -> List[str]:
    """Move the trained rows of the new tokens between peft's ``trainable_tokens_delta`` and full
    embedding matrices, in place; returns notes for the report.

    * model has a delta the checkpoint lacks, checkpoint has the full matrix: delta = its rows;
    * checkpoint has a delta the model lacks (model without peft token adapters): the rows are
      written into the matrix (the model's special-token ids give their positions).
    """
    model_keys = list(model.state_dict().keys())
    by_canonical = {canonical_key(k): k for k in model_keys if k.startswith(LLM_PREFIX)}
    notes = _rows_into_deltas(state_dict, model, model_keys, by_canonical)
    return notes + _deltas_into_rows(state_dict, model, model_keys, by_canonical)
