"""Hungarian matcher between predicted queries and ground-truth masks (FlowSeg §3.5).

Follows Mask2Former's matching cost: for each image,
``C = w_class · (−p(target class)) + w_mask · BCE + w_dice · Dice``, where the mask terms are
evaluated on ``num_points`` uniformly sampled points (the same points for every prediction and
every target of the image), then ``scipy.optimize.linear_sum_assignment`` on CPU.

The class term works with a *dynamic* number of classes: the logits' width may change from batch
to batch (language-conditioned mode, one column per condition embedding + "no object").
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import point_sample
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost", "build_matcher"]

# Stand-in for non-finite cost entries: scipy refuses NaN/inf, and a diverged prediction should
# still let training reach the (non-finite) loss, which is where the trainer decides what to do.
_INVALID_COST = 1e8


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise dice cost ``1 − (2|p∩t| + 1) / (|p| + |t| + 1)``.

    Args:
        inputs: [Q, P] mask logits at P points.
        targets: [T, P] binary (or soft) targets at the same points.
    Returns:
        [Q, T] cost matrix. Computed with one matrix product (no [Q, T, P] tensor).
    """
    probs = inputs.sigmoid()
    numerator = 2.0 * probs @ targets.t()
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1.0 - (numerator + 1.0) / (denominator + 1.0)


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean binary cross-entropy (with logits) over points.

    ``BCE(x, t) = t·softplus(−x) + (1 − t)·softplus(x)`` is linear in ``t``, so the [Q, T]
    matrix is two matrix products instead of a [Q, T, P] broadcast.

    Args:
        inputs: [Q, P] mask logits.
        targets: [T, P] targets in [0, 1].
    Returns:
        [Q, T] cost matrix.
    """
    num_points = inputs.shape[1]
    pos = F.softplus(-inputs)  # BCE against target 1
    neg = F.softplus(inputs)  # BCE against target 0
    cost = pos @ targets.t() + neg @ (1.0 - targets).t()
    return cost / max(num_points, 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets (Mask2Former-style costs).

    Args:
        cost_class: weight of the classification cost (−softmax probability of the target class).
        cost_mask: weight of the point-sampled sigmoid BCE cost.
        cost_dice: weight of the point-sampled dice cost.
        num_points: number of uniformly random points per image used by the mask costs.
    """

    def __init__(
        self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0, num_points: int = 0
    ) -> None:
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: all costs are 0, the matching would be arbitrary")
        if (cost_mask != 0 or cost_dice != 0) and num_points <= 0:
            raise ValueError(f"HungarianMatcher: num_points must be > 0 for mask costs, got {num_points}")
        self.cost_class = float(cost_class)
        self.cost_mask = float(cost_mask)
        self.cost_dice = float(cost_dice)
        self.num_points = int(num_points)

    def _cost_matrix(self, logits: Tensor, masks: Tensor, tgt_labels: Tensor, tgt_masks: Tensor) -> Tensor:
        """[Q, T] matching cost for one image (float32)."""
        cost = logits.new_zeros((logits.shape[0], tgt_labels.shape[0]), dtype=torch.float32)
        if self.cost_class != 0:
            probs = logits.float().softmax(-1)
            cost = cost + self.cost_class * (-probs[:, tgt_labels])
        if self.cost_mask != 0 or self.cost_dice != 0:
            # One shared set of points so that every (pred, target) pair is compared on the same pixels.
            coords = torch.rand(1, self.num_points, 2, device=masks.device)
            tgt = tgt_masks.to(device=masks.device, dtype=torch.float32)[:, None]
            tgt_pts = point_sample(tgt, coords.expand(tgt.shape[0], -1, -1), align_corners=False)[:, 0]
            out = masks.float()[:, None]
            out_pts = point_sample(out, coords.expand(out.shape[0], -1, -1), align_corners=False)[:, 0]
            if self.cost_mask != 0:
                cost = cost + self.cost_mask * batch_sigmoid_ce_cost(out_pts, tgt_pts)
            if self.cost_dice != 0:
                cost = cost + self.cost_dice * batch_dice_cost(out_pts, tgt_pts)
        return cost

    @torch.no_grad()
    def forward(
        self, outputs: Dict[str, Any], targets: Sequence[Dict[str, Tensor]]
    ) -> List[Tuple[Tensor, Tensor]]:
        """Match each image's predictions to its targets.

        Args:
            outputs: ``pred_logits`` [B, Q, K+1] and ``pred_masks`` [B, Q, H, W] (logits).
            targets: one dict per image with ``labels`` [T] (int64, < K) and ``masks`` [T, H', W'];
                the target resolution may differ from the predictions' (point sampling handles it).
        Returns:
            One ``(pred_idx, tgt_idx)`` pair of int64 CPU tensors per image, each of length
            ``min(Q, T)``; ``pred_idx`` is sorted ascending. Images without targets give empty tensors.
        """
        pred_logits: Tensor = outputs["pred_logits"]
        pred_masks: Tensor = outputs["pred_masks"]
        indices: List[Tuple[Tensor, Tensor]] = []
        # Matching must be done in float32 even under mixed precision (softmax / softplus ranges).
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            for b, tgt in enumerate(targets):
                labels = tgt["labels"].to(pred_logits.device)
                if labels.numel() == 0:
                    empty = torch.empty(0, dtype=torch.int64)
                    indices.append((empty, empty.clone()))
                    continue
                cost = self._cost_matrix(pred_logits[b], pred_masks[b], labels, tgt["masks"])
                cost = torch.nan_to_num(cost, nan=_INVALID_COST, posinf=_INVALID_COST, neginf=-_INVALID_COST)
                rows, cols = linear_sum_assignment(cost.cpu().numpy())
                indices.append(
                    (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
                )
        return indices

    def extra_repr(self) -> str:
        return (
            f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points}"
        )


def build_matcher(cfg) -> HungarianMatcher:
    """Matcher with the cost weights of ``cfg.MODEL.MASK_FORMER`` (costs = loss weights, as Mask2Former)."""
    mf = cfg.MODEL.MASK_FORMER
    return HungarianMatcher(
        cost_class=mf.CLASS_WEIGHT,
        cost_mask=mf.MASK_WEIGHT,
        cost_dice=mf.DICE_WEIGHT,
        num_points=mf.TRAIN_NUM_POINTS,
    )
