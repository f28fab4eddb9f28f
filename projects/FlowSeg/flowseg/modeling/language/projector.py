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
