"""The BSF decoder's bookkeeping of the condition embeddings C (FlowSeg §3.3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["DecoderConditions"]


@dataclass
class DecoderConditions:
    """The decoder's view of the conditions: C sequence-first [K,B,h] (refined in place by CR),
    the valid mask [B,K], and the attention padding mask. A sample without any valid condition
    would make the attention softmax all -inf (NaN): it is unmasked for the attention and its
    semantic branch is discarded (Q_fused = Q_vis)."""

    seq: Optional[Tensor] = None
    valid: Optional[Tensor] = None
    key_padding_mask: Optional[Tensor] = None
    has_condition: Optional[Tensor] = None
    all_have_condition: bool = True

    @classmethod
    def of(
        cls, conditions: Optional[Tensor], condition_mask: Optional[Tensor], dtype: torch.dtype
    ) -> DecoderConditions:
        if conditions is None:
            return cls(valid=condition_mask)
        # The LLM side may run in another dtype (bf16); the decoder's attention needs its own.
        valid = condition_mask
        if valid is None:
            valid = torch.ones(conditions.shape[:2], dtype=torch.bool, device=conditions.device)
        valid = valid.to(torch.bool)
        has_condition = valid.any(dim=1)  # [B]
        return cls(
            seq=conditions.transpose(0, 1).to(dtype),
            valid=valid,
            key_padding_mask=~valid & has_condition[:, None],
            has_condition=has_condition,
            all_have_condition=bool(has_condition.all()),  # one host sync, not one per layer
        )

    def batch_first(self) -> Optional[Tensor]:
        return None if self.seq is None else self.seq.transpose(0, 1)
