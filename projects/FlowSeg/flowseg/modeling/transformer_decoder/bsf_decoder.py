"""Mask2Former's masked-attention decoder with Bidirectional Semantic Flow (FlowSeg §3.3).

One decoder layer (Algorithm 1), every BSF part behind its own switch::

    Q_vis   = MaskedCrossAttn(Q, F)                          # Mask2Former
    Q_sem   = LN(MHA(Q_vis + pos_q, C, C))                   # eq. 1   (SR)
    g       = sigmoid(W_g [Q_vis || Q_sem])                  # eq. 2   (SR)
    Q_fused = g * Q_vis + (1 - g) * Q_sem                    # eq. 3   (SR; off: Q_fused = Q_vis)
    Q_s     = SelfAttn(Q_fused)                              # eq. 4
    C       = C + MHA(LN(C), Q_s + pos_q, Q_s)               # eq. 5   (CR; off: C unchanged)
    Q       = FFN(Q_s)

With both switches off the module *is* Mask2Former's ``MultiScaleMaskedTransformerDecoder``:
same attribute names (an original ``sem_seg_head.predictor.*`` checkpoint loads unchanged),
same computation, L+1 predictions (one before the first layer, one after each layer).

Note on ``dec_layers``: here it is the number of decoder layers L (the paper's L = 9).
Mask2Former's own ``from_config`` subtracts one from ``DEC_LAYERS`` (its yamls say 10 for 9
layers); FlowSeg's config key already means L, so nothing is subtracted.

Algorithm 1 is :meth:`BSFTransformerDecoder.forward` with :meth:`~BSFTransformerDecoder.bsf_layer`;
the rest lives beside it: the layers of eq. 1 / 4 / 5 (:mod:`.layers`), the query-condition
logits and mask head (:mod:`.prediction_heads`), the pixel-feature memory with its position
embeddings (:mod:`.multi_scale_memory`), C's validity bookkeeping (:mod:`.conditions`) and the
config switches (:mod:`.bsf_config`).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from torch import Tensor, nn

# Re-exported: callers and tests import the mask-position features from this module.
from ..from_scratch import mask_position, mask_position_features  # noqa: F401
from ..registry import TRANSFORMER_DECODER_REGISTRY
from .bsf_config import bsf_decoder_config, check_bsf_arguments
from .conditions import DecoderConditions
from .layers import (
    ConditionRefinementLayer,
    CrossAttentionLayer,
    FFNLayer,
    SelfAttentionLayer,
    SemanticCrossAttentionLayer,
)
from .multi_scale_memory import MultiScaleMemory
from .position_encoding import PositionEmbeddingSine
from .prediction_heads import CONDITION_LOGIT_TYPES, PADDED_CONDITION_LOGIT, PredictionHeads

__all__ = [
    "BSFTransformerDecoder",
    "CONDITION_LOGIT_TYPES",
    "PADDED_CONDITION_LOGIT",
]

logger = logging.getLogger(__name__)


@TRANSFORMER_DECODER_REGISTRY.register()
class BSFTransformerDecoder(PredictionHeads, MultiScaleMemory, nn.Module):
    """Masked-attention transformer decoder with Bidirectional Semantic Flow.

    Inputs of :meth:`forward`: 3 multi-scale pixel-decoder maps (1/32, 1/16, 1/8, in that order),
    mask features (1/4 or 1/8 scale), and optionally condition embeddings ``C`` [B,K,h] with a validity
    mask [B,K] and a segmentation embedding ``S`` [B,h] (added to the initial queries).

    Args:
        in_channels: channels of the multi-scale input maps.
        mask_classification: predict per-query logits (``pred_logits``) besides masks.
        num_classes: classes of the learnable class head (``condition_logits=False``).
        hidden_dim, num_queries, nheads, dim_feedforward, pre_norm, mask_dim,
        enforce_input_project: as in Mask2Former.
        dec_layers: number of decoder layers L (L+1 predictions are made).
        semantic_refinement: SR, eq. 1-3 (queries read the conditions through a fusion gate).
        condition_refinement: CR, eq. 5 (conditions read the queries).
        visual_cross_attn_control: Table 11 control - the SR modules read the current level's
            pixel-decoder features instead of C (same parameters as SR); needs
            ``semantic_refinement=True`` and ``condition_refinement=False``.
        condition_logits: logits = scaled cosine(query, condition) over K conditions plus a
            no-object logit (referring mode, generic mode with an LLM) instead of ``class_embed``.
        condition_logit_type: the form of those logits (:meth:`condition_class_logits`):
            ``"background"`` (X-SAM's: a learned background embedding is condition K + 1) or
            ``"projected"`` (a linear projection of the query, a linear no-object logit).
        add_seg_embed_to_queries: ``Q(0) <- Q(0) + S`` when ``seg_embed`` is given (off: S is ignored).
        logit_scale_init: initial value of the log-space logit scale (CLIP's ln(1/0.07)).
        cr_zero_init: start CR's attention output projection at zero (C(l) = C(0) at init).
        gate_bias_init: initial bias of the fusion gates W_g (0: g ~ 0.5; > 0 favours Q_vis).
        mask_position_logits: not in the paper. Condition logits read each query's embedding
            plus a projection of where its predicted mask lies (:func:`mask_position_features`);
            Mask2Former queries carry no location in their content, which words like
            "leftmost" need. The projection starts at zero (the paper's logits at init).
    """

    _version = 2

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        semantic_refinement: bool = False,
        condition_refinement: bool = False,
        visual_cross_attn_control: bool = False,
        condition_logits: bool = False,
        condition_logit_type: str = "projected",
        add_seg_embed_to_queries: bool = True,
        logit_scale_init: float = math.log(1 / 0.07),
        cr_zero_init: bool = True,
        gate_bias_init: float = 0.0,
        mask_position_logits: bool = False,
    ) -> None:
        super().__init__()
        check_bsf_arguments(
            semantic_refinement,
            condition_refinement,
            visual_cross_attn_control,
            dec_layers,
            condition_logit_type,
        )
        self.mask_classification = mask_classification
        self.semantic_refinement = semantic_refinement
        self.condition_refinement = condition_refinement
        self.visual_cross_attn_control = visual_cross_attn_control
        self.condition_logits = condition_logits
        self.condition_logit_type = condition_logit_type
        self.add_seg_embed_to_queries = add_seg_embed_to_queries

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)
        self.num_heads = nheads
        self.num_layers = dec_layers
        # Sub-modules are created in Mask2Former's order: with a fixed seed, the same random init.
        self._build_mask2former_layers(hidden_dim, nheads, dim_feedforward, pre_norm)
        self._build_bsf_layers(hidden_dim, nheads, gate_bias_init, cr_zero_init)
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features Q(0)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positional embedding

        self._build_memory_inputs(in_channels, hidden_dim, enforce_input_project)
        self._build_prediction_heads(
            hidden_dim, mask_dim, num_classes, logit_scale_init, mask_position_logits
        )

    def _build_mask2former_layers(self, hidden_dim: int, nheads: int, dim_feedforward: int, pre_norm: bool):
        """Masked cross-attention, self-attention (eq. 4) and FFN of every layer, as in Mask2Former."""
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(self.num_layers):
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(hidden_dim, nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0, normalize_before=pre_norm)
            )

    def _build_bsf_layers(self, hidden_dim: int, nheads: int, gate_bias_init: float, cr_zero_init: bool):
        """SR (eq. 1-3) and CR (eq. 5) modules of every layer, each only when switched on, so that
        "all off" has exactly the baseline's parameters."""
        if self.semantic_refinement:
            self.semantic_cross_attention_layers = nn.ModuleList(
                SemanticCrossAttentionLayer(hidden_dim, nheads) for _ in range(self.num_layers)
            )
            # W_g of eq. 2: [Q_vis || Q_sem] (2h) -> per-channel gate (h).
            self.fusion_gates = nn.ModuleList(
                nn.Linear(2 * hidden_dim, hidden_dim) for _ in range(self.num_layers)
            )
            for gate in self.fusion_gates:
                nn.init.xavier_uniform_(gate.weight)
                nn.init.constant_(gate.bias, float(gate_bias_init))
        if self.condition_refinement:
            self.condition_refinement_layers = nn.ModuleList(
                ConditionRefinementLayer(hidden_dim, nheads, zero_init=cr_zero_init)
                for _ in range(self.num_layers)
            )

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> Dict[str, Any]:
        return bsf_decoder_config(cfg, in_channels, mask_classification)

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        # Early Mask2Former checkpoints (version < 2) call the query features "static_query".
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            old = prefix + "static_query.weight"
            if old in state_dict:
                state_dict[prefix + "query_feat.weight"] = state_dict.pop(old)
                logger.warning(f"{type(self).__name__}: renamed old key 'static_query' -> 'query_feat'.")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ------------------------------------------------------------------ inputs
    def needs_conditions(self) -> bool:
        """Whether :meth:`forward` must be given ``conditions``."""
        uses_c_inside = (
            self.semantic_refinement and not self.visual_cross_attn_control
        ) or self.condition_refinement
        return uses_c_inside or (self.mask_classification and self.condition_logits)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: List[Tensor],
        mask_features: Tensor,
        mask: Optional[Tensor] = None,
        conditions: Optional[Tensor] = None,
        condition_mask: Optional[Tensor] = None,
        seg_embed: Optional[Tensor] = None,
        return_intermediates: bool = False,
    ) -> Dict[str, Any]:
        """
        Args:
            x: 3 maps [B,C_in,H_l,W_l] ordered 1/32, 1/16, 1/8 (the pixel decoder's multi-scale output).
            mask_features: [B,mask_dim,H/s,W/s] (s = 4 or 8).
            mask: unused (as in Mask2Former: padding is not masked in the decoder).
            conditions: C(0) [B,K,h]; required when SR / CR / condition logits are on.
            condition_mask: [B,K] bool, True = valid condition (default: all valid).
            seg_embed: S [B,h]; ``Q(0) <- Q(0) + S``.
            return_intermediates: also return ``gates``, ``conditions``, ``sem_attn``, ``cond_attn``.

        Returns:
            dict with ``pred_logits`` [B,Q,num_classes+1] or [B,Q,K+1] (None without mask
            classification), ``pred_masks`` [B,Q,H/s,W/s], ``aux_outputs`` (the first L of the
            L+1 predictions, each a dict of ``pred_logits``/``pred_masks``), ``query_embeds``
            (final decoder_norm output [B,Q,h]); with ``return_intermediates``: ``gates`` (L x
            [B,Q,h]), ``conditions`` (L+1 x [B,K,h], C(0)..C(L)), ``sem_attn`` (L x [B,Q,K], or
            [B,Q,h*w] for the visual control), ``cond_attn`` (L x [B,K,Q]). Lists are empty for
            switched-off parts.
        """
        del mask  # Mask2Former does not mask padding in the decoder either
        self._check_inputs(x, conditions)
        src, pos, size_list = self._memory(x)
        query_embed, output = self._initial_queries(src[0].shape[1], seg_embed)
        cond = DecoderConditions.of(conditions, condition_mask, output.dtype)
        inter: Dict[str, List[Tensor]] = {}
        if return_intermediates:
            inter = {"gates": [], "conditions": [], "sem_attn": [], "cond_attn": []}
        if inter and cond.seq is not None:
            inter["conditions"].append(cond.batch_first())

        predictions_class: List[Optional[Tensor]] = []
        predictions_mask: List[Tensor] = []
        outputs_class, outputs_mask, attn_mask, _ = self.forward_prediction_heads(
            output, mask_features, size_list[0], cond.batch_first(), cond.valid
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            output = self.bsf_layer(i, output, cond, attn_mask, src[level], pos[level], query_embed, inter)
            last = i == self.num_layers - 1
            outputs_class, outputs_mask, attn_mask, decoder_output = self.forward_prediction_heads(
                output,
                mask_features,
                None if last else size_list[(i + 1) % self.num_feature_levels],
                cond.batch_first(),  # prediction l is matched against C(l) (deep supervision per layer)
                cond.valid,
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        out: Dict[str, Any] = {
            "pred_logits": predictions_class[-1],
            "pred_masks": predictions_mask[-1],
            "aux_outputs": self._set_aux_loss(predictions_class, predictions_mask),
            "query_embeds": decoder_output,
        }
        out.update(inter)
        return out

    def _check_inputs(self, x: List[Tensor], conditions: Optional[Tensor]) -> None:
        if len(x) != self.num_feature_levels:
            raise ValueError(f"expected {self.num_feature_levels} feature levels, got {len(x)}")
        if conditions is None and self.needs_conditions():
            raise ValueError(
                "BSFTransformerDecoder: conditions are required (semantic_refinement="
                f"{self.semantic_refinement}, condition_refinement={self.condition_refinement}, "
                f"condition_logits={self.condition_logits}); pass conditions=[B,K,hidden] "
                "or switch these off."
            )

    def _initial_queries(self, bs: int, seg_embed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """Query positional embeddings and query features Q(0), both [Q,B,h]."""
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, bs, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, bs, 1)
        if seg_embed is not None and self.add_seg_embed_to_queries:
            output = output + seg_embed.to(output.dtype).unsqueeze(0)  # Q(0) <- Q(0) + S (paper §3.1)
        return query_embed, output

    def bsf_layer(
        self,
        i: int,
        output: Tensor,
        cond: DecoderConditions,
        attn_mask: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        query_embed: Tensor,
        inter: Dict[str, List[Tensor]],
    ) -> Tensor:
        """Decoder layer ``i`` of Algorithm 1 on queries ``output`` [Q,B,h]; refines ``cond.seq``
        (CR) in place and returns the layer's output queries. ``inter`` (when not empty) collects
        gates, attention weights and C(l)."""
        # A query whose mask covers nothing would attend to nothing: let it attend everywhere.
        attn_mask = attn_mask & ~attn_mask.all(dim=-1, keepdim=True)
        q_vis = self.transformer_cross_attention_layers[i](
            output,
            memory,
            memory_mask=attn_mask,
            memory_key_padding_mask=None,  # padded pixels are not masked (as in Mask2Former)
            pos=memory_pos,
            query_pos=query_embed,
        )
        q_fused = q_vis
        if self.semantic_refinement:
            q_fused = self._semantic_refinement(i, q_vis, cond, memory, memory_pos, query_embed, inter)
        q_s = self.transformer_self_attention_layers[i](
            q_fused, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_embed
        )  # eq. 4
        if self.condition_refinement:
            cond.seq, cond_w = self.condition_refinement_layers[i](
                cond.seq, q_s, query_pos=query_embed, condition_valid=cond.valid, need_weights=bool(inter)
            )  # eq. 5
            if inter:
                inter["cond_attn"].append(cond_w)
        if inter and cond.seq is not None:
            inter["conditions"].append(cond.batch_first())
        return self.transformer_ffn_layers[i](q_s)

    def _semantic_refinement(
        self,
        i: int,
        q_vis: Tensor,
        cond: DecoderConditions,
        memory: Tensor,
        memory_pos: Tensor,
        query_embed: Tensor,
        inter: Dict[str, List[Tensor]],
    ) -> Tensor:
        """Eq. 1-3: semantic cross-attention to C (or, for the Table 11 control, to the pixel
        features of this layer's level) and the fusion gate."""
        if self.visual_cross_attn_control:
            mem, mem_pos, mem_kpm = memory, memory_pos, None
        else:
            mem, mem_pos, mem_kpm = cond.seq, None, cond.key_padding_mask
        q_sem, sem_w = self.semantic_cross_attention_layers[i](
            q_vis,
            mem,
            memory_key_padding_mask=mem_kpm,
            pos=mem_pos,
            query_pos=query_embed,
            need_weights=bool(inter),
        )  # eq. 1
        gate = torch.sigmoid(self.fusion_gates[i](torch.cat([q_vis, q_sem], dim=-1)))  # eq. 2
        q_fused = gate * q_vis + (1.0 - gate) * q_sem  # eq. 3
        if not self.visual_cross_attn_control and not cond.all_have_condition:
            q_fused = torch.where(cond.has_condition[None, :, None], q_fused, q_vis)
        if inter:
            inter["gates"].append(gate.transpose(0, 1))
            inter["sem_attn"].append(sem_w)
        return q_fused

    @torch.jit.unused
    def _set_aux_loss(
        self, outputs_class: List[Optional[Tensor]], outputs_seg_masks: List[Tensor]
    ) -> List[Dict[str, Tensor]]:
        if self.mask_classification:
            return [
                {"pred_logits": a, "pred_masks": b}
                for a, b in zip(outputs_class[:-1], outputs_seg_masks[:-1])
            ]
        return [{"pred_masks": b} for b in outputs_seg_masks[:-1]]
