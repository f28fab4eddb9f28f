"""Condition extraction (paper §3.1 and eq. 11): the condition embeddings ``C = φ_llm(C_LLM)`` and
the segmentation embedding ``S = φ_llm(S_LLM)`` from the LLM's last hidden states ``H_LLM``.

``C_k`` is the mean of ``φ_llm(H_t)`` over the tokens ``t`` of the ``k``-th ``<p>…</p>`` span,
markers included (X-SAM's pooling convention); ``S`` is ``φ_llm`` at the ``<SEG>`` token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .projector import MLPProjector, pool_spans

__all__ = ["pool_conditions"]


def pool_conditions(
    hidden: torch.Tensor,
    span_positions: list[list[tuple[int, int]]],
    seg_positions: list[int | None],
    llm_projector: MLPProjector,
    hidden_dim: int,
) -> dict:
    """C and S from the last hidden states [B,T,D] with ``llm_projector`` (φ_llm, output width
    ``hidden_dim``). Returns ``conditions`` [B,K,h] (zero-padded), ``condition_mask``,
    ``seg_embed`` [B,h], ``seg_mask``, and the positions."""
    bsz, device = hidden.shape[0], hidden.device
    num_k = max((len(s) for s in span_positions), default=0)
    proj_dtype = llm_projector[0].weight.dtype
    zero_cond = hidden.new_zeros(num_k, hidden_dim, dtype=proj_dtype)
    zero_seg = hidden.new_zeros(hidden_dim, dtype=proj_dtype)
    condition_mask = torch.zeros(bsz, num_k, dtype=torch.bool, device=device)
    seg_mask = torch.zeros(bsz, dtype=torch.bool, device=device)
    cond_rows, seg_rows = [], []
    for b in range(bsz):
        spans, seg = span_positions[b], seg_positions[b]
        points = [p for span in spans for p in span] + ([seg] if seg is not None else [])
        if not points:
            cond_rows.append(zero_cond)
            seg_rows.append(zero_seg)
            continue
        # Project only the stretch that holds the spans and <SEG> (not the image tokens before it).
        lo, hi = min(points), max(points)
        proj = llm_projector(hidden[b, lo : hi + 1])
        pooled = pool_spans(proj, [(s - lo, e - lo) for s, e in spans])
        cond_rows.append(F.pad(pooled, (0, 0, 0, num_k - pooled.shape[0])))
        condition_mask[b, : len(spans)] = True
        seg_rows.append(proj[seg - lo] if seg is not None else zero_seg)
        seg_mask[b] = seg is not None
    empty = hidden.new_zeros(0, num_k, hidden_dim, dtype=proj_dtype)
    return {
        "conditions": torch.stack(cond_rows) if bsz else empty,
        "condition_mask": condition_mask,
        "seg_embed": torch.stack(seg_rows) if bsz else empty[:, 0],
        "seg_mask": seg_mask,
        "span_positions": span_positions,
        "seg_positions": seg_positions,
    }
