"""Prediction heads of the BSF transformer decoder: per-query masks and class logits.

Class logits come either from Mask2Former's learnable ``class_embed`` or, with condition logits,
from the similarity of each query to the K condition embeddings plus a no-object logit (the
query-condition matching s_i = sim(Q_i, C) of FlowSeg §3.1-3.2). The heads are a mixin of the
decoder rather than a sub-module so that their parameters keep Mask2Former's top-level names
(``class_embed``, ``mask_embed``, ...) and original checkpoints load unchanged.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..from_scratch import MASK_POSITION_FEATURE_DIM, mask_position, mask_position_features
from .layers import MLP

__all__ = ["CONDITION_LOGIT_TYPES", "PADDED_CONDITION_LOGIT", "PredictionHeads"]

# Logit given to padded conditions: very negative but finite, so softmax / CE never see -inf - -inf.
PADDED_CONDITION_LOGIT = -1e4
_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP's clamp: exp(logit_scale) <= 100
_MAX_BACKGROUND_HEAD_LOGIT = 50.0  # X-SAM's clamp of the cosine logits
CONDITION_LOGIT_TYPES = ("background", "projected")


class PredictionHeads:
    """Mixin of :class:`~flowseg.modeling.transformer_decoder.BSFTransformerDecoder`.

    Reads the decoder's ``decoder_norm``, ``num_heads``, ``mask_classification``,
    ``condition_logits`` and ``condition_logit_type``; :meth:`_build_prediction_heads` adds the
    head parameters.
    """

    def _build_prediction_heads(
        self,
        hidden_dim: int,
        mask_dim: int,
        num_classes: int,
        logit_scale_init: float,
        mask_position_logits: bool,
    ) -> None:
        # Creation order is part of the seeded initialisation: keep it.
        if self.mask_classification:
            if self.condition_logits:
                projected = self.condition_logit_type == "projected"
                if projected:
                    self.cond_query_proj = nn.Linear(hidden_dim, hidden_dim)
                if mask_position_logits:
                    self.mask_position_proj = nn.Linear(MASK_POSITION_FEATURE_DIM, hidden_dim)
                    nn.init.zeros_(self.mask_position_proj.weight)
                    nn.init.zeros_(self.mask_position_proj.bias)
                if projected:
                    self.no_object_embed = nn.Linear(hidden_dim, 1)
                else:
                    # the no-object class is one more condition (X-SAM's bg_embeds)
                    self.background_embed = nn.Embedding(1, hidden_dim)
                self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale_init)))
            else:
                self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)
        self.mask_position_logits = bool(
            mask_position_logits and self.mask_classification and self.condition_logits
        )

    def condition_class_logits(
        self, query_embeds: Tensor, conditions: Tensor, condition_mask: Optional[Tensor] = None
    ) -> Tensor:
        """Logits over K conditions + no-object.

        ``"background"``: ``clamp(exp(s) * cos(q, c_k), -50, 50)`` for c_k in
        ``[conditions; background_embed]``; ``"projected"``: ``exp(min(s, ln 100)) *
        cos(proj(q), c_k)`` and ``no_object_embed(q)``. ``query_embeds`` [B,Q,h] (decoder_norm
        output), ``conditions`` [B,K,h], ``condition_mask`` [B,K] (True = valid). Returns
        [B,Q,K+1], no-object last; padded conditions get ``PADDED_CONDITION_LOGIT``.
        """
        if self.condition_logit_type == "background":
            background = self.background_embed.weight.to(conditions.dtype)
            c = torch.cat([conditions, background.expand(conditions.shape[0], 1, -1)], dim=1)
            cos = torch.einsum("bqc,bkc->bqk", F.normalize(query_embeds, dim=-1), F.normalize(c, dim=-1))
            logits = (self.logit_scale.exp() * cos).clamp(
                -_MAX_BACKGROUND_HEAD_LOGIT, _MAX_BACKGROUND_HEAD_LOGIT
            )
            if condition_mask is not None:
                valid = torch.cat([condition_mask, condition_mask.new_ones(condition_mask.shape[0], 1)], 1)
                logits = logits.masked_fill(~valid[:, None, :], PADDED_CONDITION_LOGIT)
            return logits
        q = F.normalize(self.cond_query_proj(query_embeds), dim=-1)
        c = F.normalize(conditions, dim=-1)
        scale = self.logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()
        logits = scale * torch.einsum("bqc,bkc->bqk", q, c)
        if condition_mask is not None:
            logits = logits.masked_fill(~condition_mask[:, None, :], PADDED_CONDITION_LOGIT)
        return torch.cat([logits, self.no_object_embed(query_embeds)], dim=-1)

    def forward_prediction_heads(
        self,
        output: Tensor,
        mask_features: Tensor,
        attn_mask_target_size: Optional[Tuple[int, int]],
        conditions: Optional[Tensor] = None,
        condition_mask: Optional[Tensor] = None,
    ) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor], Tensor]:
        """Predictions from queries ``output`` [Q,B,h].

        Returns ``(class logits or None, mask logits [B,Q,H,W], attention mask [B*heads,Q,h*w] for the
        next layer (None if ``attn_mask_target_size`` is None), decoder_norm output [B,Q,h])``.
        ``conditions`` are [B,K,h] (only read with condition logits).
        """
        decoder_output = self.decoder_norm(output).transpose(0, 1)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        outputs_class = None
        if self.mask_classification:
            if self.condition_logits:
                query = decoder_output
                if self.mask_position_logits:
                    position = mask_position_features(mask_position(outputs_mask.detach()))
                    query = query + self.mask_position_proj(position)
                outputs_class = self.condition_class_logits(query, conditions, condition_mask)
            else:
                outputs_class = self.class_embed(decoder_output)

        attn_mask = None
        if attn_mask_target_size is not None:
            # The mask is predicted at the mask features' scale; the next cross-attention reads another level.
            m = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
            # [B,Q,h,w] -> [B*heads,Q,h*w]; True = may NOT attend (outside the predicted foreground).
            m = m.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
            attn_mask = m.detach()
        return outputs_class, outputs_mask, attn_mask, decoder_output
