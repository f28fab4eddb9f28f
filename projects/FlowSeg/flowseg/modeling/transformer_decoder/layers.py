"""Building blocks of the BSF transformer decoder.

The first four classes reproduce Mask2Former's decoder layers (``SelfAttentionLayer``,
``CrossAttentionLayer``, ``FFNLayer``, ``MLP``) with the *same attribute names*
(``self_attn`` / ``multihead_attn``, ``norm``, ``linear1``, ``linear2``, ``layers.N``) so that
``sem_seg_head.predictor.*`` keys of an original Mask2Former checkpoint load unchanged.

The last two are FlowSeg's Bidirectional Semantic Flow additions (paper §3.3):
``SemanticCrossAttentionLayer`` (eq. 1) and ``ConditionRefinementLayer`` (eq. 5).

All tensors are sequence-first (``[L, B, C]``), as in Mask2Former, because
``nn.MultiheadAttention`` is used with ``batch_first=False``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "activation_fn",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "SemanticCrossAttentionLayer",
    "ConditionRefinementLayer",
]


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


def _xavier_init(module: nn.Module) -> None:
    # Mask2Former initialises every matrix of its decoder layers with xavier-uniform.
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The FFN activation of a config name (``"relu"``, ``"gelu"``, ``"glu"``)."""
    acts = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in acts:
        raise ValueError(f"activation must be one of {sorted(acts)}, got {name!r}")
    return acts[name]


class SelfAttentionLayer(nn.Module):
    """Query self-attention with residual + LayerNorm (post-norm by default), eq. 4."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos(x, query_pos)
        out = self.self_attn(
            q, k, value=x, attn_mask=tgt_mask, key_padding_mask=tgt_key_padding_mask, need_weights=False
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Query -> pixel-feature (masked) cross-attention with residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.multihead_attn(
            query=_with_pos(x, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
            need_weights=False,
        )[0]
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Two-layer feed-forward block with residual + LayerNorm."""

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_init(self)

    def forward(self, tgt: Tensor) -> Tensor:
        x = self.norm(tgt) if self.normalize_before else tgt
        out = self.linear2(self.dropout(self.activation(self.linear1(x))))
        tgt = tgt + self.dropout(out)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU in between (Mask2Former's ``mask_embed``)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        dims_in = [input_dim] + [hidden_dim] * (num_layers - 1)
        dims_out = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims_in, dims_out))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x


class SemanticCrossAttentionLayer(nn.Module):
    """Eq. 1: ``Q_sem = LN(MHA(Q_vis + query_pos, K, V))``.

    ``K = V = C`` (condition embeddings) for FlowSeg; for the Table 11 control the same module
    reads pixel-decoder features instead (then ``pos`` is their sine embedding, added to the keys
    like in the visual cross-attention). There is no residual here: the fusion gate (eq. 2-3)
    decides how much of ``Q_sem`` replaces ``Q_vis``.
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        _xavier_init(self)

    def forward(
        self,
        query: Tensor,
        memory: Tensor,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
        need_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``query`` [Q,B,C], ``memory`` [K,B,C], key padding mask [B,K] (True = ignore).

        Returns ``(Q_sem [Q,B,C], head-averaged attention [B,Q,K] or None)``.
        """
        out, weights = self.multihead_attn(
            query=_with_pos(query, query_pos),
            key=_with_pos(memory, pos),
            value=memory,
            key_padding_mask=memory_key_padding_mask,
            need_weights=need_weights,
        )
        return self.norm(out), weights


class ConditionRefinementLayer(nn.Module):
    """Eq. 5: ``C <- C + MHA(LN(C), Q_s + query_pos, Q_s)`` (pre-norm on the condition query).

    ``zero_init``: the attention's output projection starts at zero, so the layer starts as the
    identity on ``C`` (the residual of eq. 5 then carries C(0) until training learns an update).
    """

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0, zero_init: bool = False) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        _xavier_init(self)
        if zero_init:
            nn.init.zeros_(self.multihead_attn.out_proj.weight)  # its bias is zero already

    def forward(
        self,
        conditions: Tensor,
        queries: Tensor,
        query_pos: Optional[Tensor] = None,
        condition_valid: Optional[Tensor] = None,
        need_weights: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        """``conditions`` [K,B,C], ``queries`` (= Q_s) [Q,B,C], ``condition_valid`` [B,K] (True = real).

        Returns ``(C_new [K,B,C], head-averaged attention [B,K,Q] or None)``. Padded condition rows
        are left unchanged (they are never read, keeping them fixed makes that obvious).
        """
        delta, weights = self.multihead_attn(
            query=self.norm(conditions),
            key=_with_pos(queries, query_pos),
            value=queries,
            need_weights=need_weights,
        )
        delta = self.dropout(delta)
        if condition_valid is not None:
            delta = torch.where(condition_valid.transpose(0, 1).unsqueeze(-1), delta, torch.zeros_like(delta))
        return conditions + delta, weights
