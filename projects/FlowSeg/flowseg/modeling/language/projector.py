"""Projectors between the LLM and the other parts, and span pooling.

* ``φ_vis``: vanilla-encoder features → LLM input space, Linear(D_vis, D_llm) – GELU – Linear(D_llm, D_llm).
* ``φ_llm`` (paper eq. 11): LLM hidden states → decoder space, Linear(D_llm, h) – GELU – Linear(h, 256).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class MLPProjector(nn.Sequential):
    """Two-layer MLP ``Linear(in, hidden) → GELU → Linear(hidden, out)`` (paper eq. 11)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The LLM may run in bf16 while the projector trains in fp32: compute in the projector's dtype.
        return super().forward(x.to(self[0].weight.dtype))


def pool_spans(hidden: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Mean of ``hidden`` ``[T, D]`` over each span ``(start, end)`` (inclusive) → ``[K, D]``.

    This is X-SAM's condition pooling when ``hidden`` holds the ``φ_llm``-projected last hidden
    states and the spans run from ``<p>`` to ``</p>`` (markers included). One matmul with a
    ``[K, T]`` averaging matrix keeps it differentiable and fast for many spans (133 COCO classes).
    """
    if not spans:
        return hidden.new_zeros(0, hidden.shape[-1])
    weights = hidden.new_zeros(len(spans), hidden.shape[0])
    for k, (start, end) in enumerate(spans):
        if not 0 <= start <= end < hidden.shape[0]:
            raise ValueError(f"span {(start, end)} out of range for {hidden.shape[0]} tokens")
        weights[k, start : end + 1] = 1.0 / (end - start + 1)
    return weights @ hidden


def pixel_unshuffle_tokens(x: torch.Tensor, downsample: float = 0.5) -> torch.Tensor:
    """``[B, C, H, W]`` feature map → ``[B, H·s · W·s, C / s²]`` tokens, ``s = downsample``.

    Each output token of grid cell ``(i, j)`` concatenates the ``r × r`` input pixels it covers
    (``r = 1 / s``), in the channel order of X-SAM's (InternVL's) ``pixel_shuffle`` so that its
    ``seg_projector`` weights apply unchanged::

        out[b, i * (W·s) + j, (dy * r + dx) * C + c] = x[b, c, r·i + dy, r·j + dx]

    (the row offset ``dy`` is the slower index). Tokens are row-major over the output grid.
    """
    r = round(1.0 / downsample)
    if r < 1 or abs(r * downsample - 1.0) > 1e-6:
        raise ValueError(f"MODEL.LLM.SAM_TOKENS.DOWNSAMPLE must be 1/r for an integer r, got {downsample}")
    b, c, h, w = x.shape
    if h % r or w % r:
        raise ValueError(
            f"a {h}x{w} SAM token grid is not divisible by {r} (pad the input to a multiple of {16 * r})"
        )
    x = x.reshape(b, c, h // r, r, w // r, r).permute(0, 2, 4, 3, 5, 1)  # b, i, j, dy, dx, c
    return x.reshape(b, (h // r) * (w // r), r * r * c)
