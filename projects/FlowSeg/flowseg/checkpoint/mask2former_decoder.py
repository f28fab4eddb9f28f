"""Mask2Former transformer-decoder weights -> FlowSeg's ``BSFTransformerDecoder``.

Two sources:

* **Original (Detectron2) Mask2Former checkpoints** (``model_final_*.pkl`` / ``.pth``): FlowSeg keeps
  the original module names, so ``sem_seg_head.pixel_decoder.*`` and ``sem_seg_head.predictor.*``
  load as they are. :func:`convert_d2_mask2former_checkpoint` drops the backbone (FlowSeg's is
  SAM), the criterion buffers, a ``class_embed`` trained for another class count, and renames the
  pre-v2 ``static_query`` to ``query_feat``.
* **Hugging Face** ``Mask2FormerModel`` / ``Mask2FormerForUniversalSegmentation``:
  :func:`convert_hf_mask2former_transformer_decoder` renames its transformer module (relative to
  ``transformer_module.``; the ``model.`` prefix of the universal-segmentation model is accepted):

HF -> FlowSeg / original Mask2Former (``L.n`` = ``decoder.layers.{n}``):

* ``queries_features`` -> ``query_feat``; ``queries_embedder`` -> ``query_embed``;
  ``level_embed`` -> ``level_embed``; ``input_projections.{i}`` -> ``input_proj.{i}``
* ``L.n.cross_attn.*`` -> ``transformer_cross_attention_layers.{n}.multihead_attn.*``;
  ``L.n.cross_attn_layer_norm`` -> ``transformer_cross_attention_layers.{n}.norm``
* ``L.n.self_attn.{q,k,v}_proj`` -> ``transformer_self_attention_layers.{n}.self_attn.in_proj_*``
  (q, k, v concatenated in that order); ``L.n.self_attn.out_proj`` -> ``....self_attn.out_proj``;
  ``L.n.self_attn_layer_norm`` -> ``transformer_self_attention_layers.{n}.norm``
* ``L.n.fc1`` / ``fc2`` / ``final_layer_norm`` -> ``transformer_ffn_layers.{n}.linear1`` /
  ``linear2`` / ``norm``
* ``decoder.layernorm`` -> ``decoder_norm``;
  ``decoder.mask_predictor.mask_embedder.{j}.0`` -> ``mask_embed.layers.{j}``
* ``class_predictor`` (universal-segmentation model) -> ``class_embed``

Layer counts: HF's ``config.decoder_layers`` follows Mask2Former's yamls (10 means 9 layers,
``decoder.layers`` has ``decoder_layers - 1`` entries); FlowSeg's ``DEC_LAYERS`` is the layer count
itself, so an HF model with ``decoder_layers=D`` maps onto ``DEC_LAYERS = D - 1``.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Dict, Mapping, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "D2_PREDICTOR_PREFIX",
    "convert_d2_mask2former_checkpoint",
    "convert_hf_mask2former_transformer_decoder",
]

logger = logging.getLogger(__name__)

D2_PREDICTOR_PREFIX = "sem_seg_head.predictor."
_HF_MODULE = "transformer_module."

_HF_RULES = [
    (r"^queries_features\.weight$", r"query_feat.weight"),
    (r"^queries_embedder\.weight$", r"query_embed.weight"),
    (r"^level_embed\.weight$", r"level_embed.weight"),
    (r"^input_projections\.(\d+)\.(weight|bias)$", r"input_proj.\1.\2"),
    (
        r"^decoder\.layers\.(\d+)\.cross_attn\.(in_proj_weight|in_proj_bias)$",
        r"transformer_cross_attention_layers.\1.multihead_attn.\2",
    ),
    (
        r"^decoder\.layers\.(\d+)\.cross_attn\.out_proj\.(weight|bias)$",
        r"transformer_cross_attention_layers.\1.multihead_attn.out_proj.\2",
    ),
    (
        r"^decoder\.layers\.(\d+)\.cross_attn_layer_norm\.(weight|bias)$",
        r"transformer_cross_attention_layers.\1.norm.\2",
    ),
    (
        r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)$",
        r"transformer_self_attention_layers.\1.self_attn.out_proj.\2",
    ),
    (
        r"^decoder\.layers\.(\d+)\.self_attn_layer_norm\.(weight|bias)$",
        r"transformer_self_attention_layers.\1.norm.\2",
    ),
    (r"^decoder\.layers\.(\d+)\.fc1\.(weight|bias)$", r"transformer_ffn_layers.\1.linear1.\2"),
    (r"^decoder\.layers\.(\d+)\.fc2\.(weight|bias)$", r"transformer_ffn_layers.\1.linear2.\2"),
    (r"^decoder\.layers\.(\d+)\.final_layer_norm\.(weight|bias)$", r"transformer_ffn_layers.\1.norm.\2"),
    (r"^decoder\.layernorm\.(weight|bias)$", r"decoder_norm.\1"),
    (r"^decoder\.mask_predictor\.mask_embedder\.(\d+)\.0\.(weight|bias)$", r"mask_embed.layers.\1.\2"),
]
_HF_COMPILED = [(re.compile(p), r) for p, r in _HF_RULES]
# HF's self-attention keeps q/k/v as three Linear layers; nn.MultiheadAttention packs them.
_HF_QKV = re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def _as_tensor(v: Any) -> Any:
    # Detectron2 model-zoo .pkl files hold numpy arrays.
    return torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v


def convert_hf_mask2former_transformer_decoder(
    hf_state_dict: Mapping[str, Tensor], prefix: str = ""
) -> Dict[str, Tensor]:
    """Rename a Hugging Face Mask2Former transformer module's weights to ``BSFTransformerDecoder``'s.

    Args:
        hf_state_dict: state dict of ``Mask2FormerForUniversalSegmentation`` (``model.transformer_module.*``
            and ``class_predictor.*``), of ``Mask2FormerModel`` (``transformer_module.*``) or of the
            transformer module itself. Other keys (backbone, pixel decoder, criterion) are ignored.
        prefix: prepended to every output key (e.g. ``"sem_seg_head.predictor."``).

    Returns:
        A state dict for ``BSFTransformerDecoder`` with SR/CR off and ``class_embed`` (when
        ``class_predictor`` is present). Raises ``KeyError`` on an unknown transformer-module key.
    """
    keys = list(hf_state_dict)
    has_module_prefix = any(_HF_MODULE in k for k in keys)
    out: Dict[str, Tensor] = {}
    qkv: Dict[tuple, Dict[str, Tensor]] = {}
    for key, value in hf_state_dict.items():
        value = _as_tensor(value)
        if key.split(".")[-2:-1] == ["class_predictor"]:
            out[prefix + "class_embed." + key.rsplit(".", 1)[1]] = value
            continue
        if has_module_prefix:
            if _HF_MODULE not in key:
                continue  # backbone / pixel decoder / criterion
            rel = key.split(_HF_MODULE, 1)[1]
        else:
            rel = key
        m = _HF_QKV.match(rel)
        if m:
            layer, which, kind = m.groups()
            qkv.setdefault((layer, kind), {})[which] = value
            continue
        for pattern, repl in _HF_COMPILED:
            if pattern.match(rel):
                out[prefix + pattern.sub(repl, rel)] = value
                break
        else:
            raise KeyError(f"unexpected key in the Hugging Face Mask2Former transformer module: {key!r}")

    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise KeyError(f"self_attn of decoder layer {layer} lacks some of q/k/v_proj.{kind}")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{prefix}transformer_self_attention_layers.{layer}.self_attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def convert_d2_mask2former_checkpoint(
    state_dict: Mapping[str, Any], num_classes: Optional[int] = None
) -> Dict[str, Any]:
    """Prepare an original Detectron2 Mask2Former checkpoint for FlowSeg.

    Args:
        state_dict: the checkpoint's model dict (``backbone.*``, ``sem_seg_head.pixel_decoder.*``,
            ``sem_seg_head.predictor.*``, ...), or the whole checkpoint with it under ``"model"``.
        num_classes: FlowSeg's class count; a ``class_embed`` with a different output size
            (``!= num_classes + 1``) is dropped so that it is trained from scratch. None keeps it.

    Returns:
        The ``sem_seg_head.*`` entries under their original names (FlowSeg's head uses the same
        module names), numpy arrays turned into tensors, ``static_query`` renamed to
        ``query_feat``. Backbone (FlowSeg uses SAM) and other entries (criterion buffers) are dropped.
    """
    if "model" in state_dict and isinstance(state_dict["model"], Mapping):
        state_dict = state_dict["model"]
    out: Dict[str, Any] = {}
    dropped: Dict[str, int] = {}
    for key, value in state_dict.items():
        if not key.startswith("sem_seg_head."):
            top = key.split(".", 1)[0]
            dropped[top] = dropped.get(top, 0) + 1
            continue
        new_key = key.replace(".static_query.", ".query_feat.")
        if new_key != key:
            logger.info(f"Mask2Former checkpoint: renamed {key} -> {new_key}")
        out[new_key] = _as_tensor(value)
    if dropped:
        logger.info(
            "Mask2Former checkpoint: dropped "
            + ", ".join(f"{n} '{top}.*' entries" for top, n in sorted(dropped.items()))
            + " (FlowSeg's backbone is SAM; criterion buffers are rebuilt)."
        )

    if num_classes is not None:
        weight_key = D2_PREDICTOR_PREFIX + "class_embed.weight"
        if weight_key in out and out[weight_key].shape[0] != num_classes + 1:
            logger.warning(
                f"Mask2Former checkpoint: class_embed has {out[weight_key].shape[0] - 1} classes, "
                f"the model {num_classes}: class_embed dropped (trained from scratch)."
            )
            for suffix in ("weight", "bias"):
                out.pop(D2_PREDICTOR_PREFIX + "class_embed." + suffix, None)
    return out
