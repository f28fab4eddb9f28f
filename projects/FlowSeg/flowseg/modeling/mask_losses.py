"""Mask loss terms of the set criterion (paper eq. 10: ``λ_mask·BCE + λ_dice·Dice``) on sampled
points, PointRend's uncertainty that chooses the points, and the matched target masks they read.

:class:`~flowseg.modeling.criterion.SetCriterion` samples the points and combines the terms.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Indices", "calculate_uncertainty", "dice_loss", "gather_target_masks", "sigmoid_ce_loss"]

#: per image, (matched query indices, matched target indices), as the Hungarian matcher returns
Indices = List[Tuple[Tensor, Tensor]]


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss ``1 − (2Σ p·t + 1) / (Σ p + Σ t + 1)`` per mask, summed and divided by ``num_masks``.

    Args:
        inputs: [N, P] mask logits at P points.
        targets: [N, P] targets in [0, 1] at the same points.
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy with logits, mean over points, summed over masks, divided by ``num_masks``.

    Args:
        inputs: [N, P] mask logits at P points.
        targets: [N, P] targets in [0, 1].
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """PointRend uncertainty of class-agnostic logits [N, 1, ...]: ``−|logit|`` (highest at 0)."""
    assert logits.shape[1] == 1, f"expected class-agnostic logits [N, 1, ...], got {tuple(logits.shape)}"
    return -torch.abs(logits)


def gather_target_masks(
    targets: Sequence[Dict[str, Tensor]], indices: Indices, device: torch.device
) -> Tensor:
    """Matched target masks [N, H, W] (float32), zero-padded to a common size if images differ."""
    picked = [t["masks"][j.to(t["masks"].device)] for t, (_, j) in zip(targets, indices)]
    h = max(m.shape[-2] for m in picked)
    w = max(m.shape[-1] for m in picked)
    # Predictions cover the padded batch canvas, so smaller targets are padded bottom/right with
    # background (as Mask2Former's nested tensors do); the data pipeline usually pads already.
    picked = [
        F.pad(m.to(device=device, dtype=torch.float32), (0, w - m.shape[-1], 0, h - m.shape[-2]))
        for m in picked
    ]
    return torch.cat(picked, dim=0)
