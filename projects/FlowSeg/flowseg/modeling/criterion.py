"""Set criterion of FlowSeg (paper §3.5, eq. 10): Hungarian matching + CE + point-sampled BCE/Dice.

``L_seg = λ_cls·CE + λ_mask·BCE + λ_dice·Dice`` on the matched pairs, the same terms on every
decoder layer's prediction (deep supervision), and — when the Boundary-Aware Refiner is on — the
mask terms again on the refined mask logits of the final layer's matched queries.

Convention (Mask2Former): :meth:`SetCriterion.forward` returns the losses **unweighted**;
``SetCriterion.weight_dict`` holds the weight of each key and the meta-architecture multiplies
(and drops keys without a weight). Non-finite losses are returned as they are: what to do with
them is the trainer's decision.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils import comm
from torch import Tensor, nn

from ..config import uses_class_head
from .from_scratch import segment_class_loss
from .mask_losses import Indices, calculate_uncertainty, dice_loss, gather_target_masks, sigmoid_ce_loss
from .matcher import HungarianMatcher, build_matcher

__all__ = [
    "SetCriterion",
    "build_criterion",
    "build_weight_dict",
    "calculate_uncertainty",
    "dice_loss",
    "sigmoid_ce_loss",
]

logger = logging.getLogger(__name__)

RefineFn = Callable[[Tensor, Tensor], Tensor]


class SetCriterion(nn.Module):
    """Losses of a set-prediction segmenter (Mask2Former recipe, FlowSeg §3.5).

    1. Hungarian-match the final layer's predictions to the targets (and each aux layer's, with
       suffix ``_i``); the final matching is kept in :attr:`last_indices`.
    2. ``loss_ce``: cross-entropy over ``K + 1`` classes, the last one "no object" with weight ``eos_coef``.
    3. ``loss_mask`` / ``loss_dice``: BCE and Dice on ``num_points`` points per matched mask,
       chosen by PointRend uncertainty (oversample + importance sampling), normalised by the
       number of target masks averaged over processes.
    4. ``loss_mask_refined`` / ``loss_dice_refined``: the same on ``outputs["refine_fn"](b, q)``.

    Losses are returned **unweighted**; multiply by :attr:`weight_dict` (the meta-architecture does).

    Args:
        num_classes: K, or ``None`` for a dynamic K read from the logits' width on each call
            (language-conditioned mode: one column per condition embedding, padded columns at −1e4).
        matcher: the Hungarian matcher.
        weight_dict: loss name → weight (see :func:`build_weight_dict`).
        eos_coef: class weight of the "no object" column.
        losses: which loss groups to compute, from ``("labels", "masks")``.
        num_points: points per mask for the mask losses.
        oversample_ratio, importance_sample_ratio: PointRend point selection parameters.
        deep_supervision: apply the losses to ``outputs["aux_outputs"]`` too.
    """

    _LOSS_GROUPS = ("labels", "masks")

    def __init__(
        self,
        num_classes: Optional[int],
        matcher: HungarianMatcher,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        unknown = [name for name in losses if name not in self._LOSS_GROUPS]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {self._LOSS_GROUPS}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"SetCriterion: num_classes must be >= 1 or None, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = float(eos_coef)
        self.losses = list(losses)
        self.num_points = int(num_points)
        self.oversample_ratio = float(oversample_ratio)
        self.importance_sample_ratio = float(importance_sample_ratio)
        self.deep_supervision = bool(deep_supervision)
        if num_classes is not None:
            empty_weight = torch.ones(num_classes + 1)
            empty_weight[-1] = self.eos_coef
            self.register_buffer("empty_weight", empty_weight, persistent=False)
        else:
            self.register_buffer("empty_weight", None, persistent=False)
        self.last_indices: Optional[Indices] = None
        self._warned_unweighted = False

    # ------------------------------------------------------------------ helpers
    def _class_weight(self, num_columns: int, device: torch.device) -> Tensor:
        """CE class weights for logits with ``num_columns = K + 1`` columns (validates a fixed K)."""
        if self.num_classes is not None:
            if num_columns != self.num_classes + 1:
                raise ValueError(
                    f"SetCriterion: pred_logits has {num_columns} columns but num_classes={self.num_classes} "
                    f"expects {self.num_classes + 1} (K classes + no-object). Use num_classes=None for "
                    "language-conditioned logits whose width changes per batch."
                )
            return self.empty_weight.to(device)
        weight = torch.ones(num_columns, device=device)
        weight[-1] = self.eos_coef
        return weight

    @staticmethod
    def _src_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        """(batch_idx, query_idx) of all matched predictions, concatenated over images."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for src, _ in indices])
        return batch_idx, src_idx

    @staticmethod
    def _check_labels(targets: Sequence[Dict[str, Tensor]], num_columns: int) -> None:
        """Labels must index a real class column (< K); K itself is the no-object column."""
        labels = [t["labels"].reshape(-1) for t in targets if t["labels"].numel()]
        if not labels:
            return
        all_labels = torch.cat([lab.to(labels[0].device) for lab in labels])
        lo, hi = torch.stack([all_labels.min(), all_labels.max()]).tolist()  # one host sync
        if lo < 0 or hi >= num_columns - 1:
            raise ValueError(
                f"SetCriterion: target labels span [{lo}, {hi}] but the logits have "
                f"K={num_columns - 1} classes (+1 no-object column)"
            )

    def _num_masks(self, targets: Sequence[Dict[str, Tensor]], device: torch.device) -> float:
        """Number of target masks, averaged over processes (so every rank normalises alike), ≥ 1."""
        num = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = comm.get_world_size()
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(num)
            num = num / world
        return max(float(num.item()), 1.0)

    def _point_losses(self, src_masks: Tensor, tgt_masks: Tensor, num_masks: float) -> Tuple[Tensor, Tensor]:
        """(BCE, Dice) of mask logits [N, H, W] vs targets [N, H', W'] on uncertainty-chosen points."""
        src = src_masks.float()[:, None]
        with torch.no_grad():
            # Points where the prediction is least certain (+ some random ones), as in PointRend.
            coords = get_uncertain_point_coords_with_randomness(
                src,
                calculate_uncertainty,
                self.num_points,
                self.oversample_ratio,
                self.importance_sample_ratio,
            )
            point_labels = point_sample(tgt_masks[:, None], coords, align_corners=False)[:, 0]
        point_logits = point_sample(src, coords, align_corners=False)[:, 0]
        return (
            sigmoid_ce_loss(point_logits, point_labels, num_masks),
            dice_loss(point_logits, point_labels, num_masks),
        )

    # ------------------------------------------------------------------ losses
    def loss_labels(
        self,
        outputs: Dict[str, Any],
        targets: Sequence[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """``loss_ce``: weighted CE over [B, Q, K+1]; unmatched queries target the no-object class K."""
        logits = outputs["pred_logits"].float()  # float32 so −1e4 padding and softmax stay exact
        num_columns = logits.shape[-1]
        weight = self._class_weight(num_columns, logits.device)
        target_classes = torch.full(
            logits.shape[:2], num_columns - 1, dtype=torch.int64, device=logits.device
        )
        batch_idx, src_idx = self._src_permutation_idx(indices)
        if src_idx.numel():
            matched = torch.cat(
                [t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, indices)]
            )
            target_classes[batch_idx.to(logits.device), src_idx.to(logits.device)] = matched.to(logits.device)
        loss = F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        return {"loss_ce": loss}

    def loss_masks(
        self,
        outputs: Dict[str, Any],
        targets: Sequence[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        """``loss_mask`` (BCE) and ``loss_dice`` on the matched masks (zero, graph-connected, if none)."""
        pred_masks: Tensor = outputs["pred_masks"]
        batch_idx, src_idx = self._src_permutation_idx(indices)
        if src_idx.numel() == 0:
            # Keep the graph connected (DDP expects every parameter used) while adding nothing.
            zero = pred_masks.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}
        src_masks = pred_masks[batch_idx.to(pred_masks.device), src_idx.to(pred_masks.device)]
        tgt_masks = gather_target_masks(targets, indices, pred_masks.device)
        loss_mask, loss_dice = self._point_losses(src_masks, tgt_masks, num_masks)
        return {"loss_mask": loss_mask, "loss_dice": loss_dice}

    def loss_refined_masks(
        self,
        refine_fn: RefineFn,
        targets: Sequence[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
        device: torch.device,
    ) -> Dict[str, Tensor]:
        """``loss_mask_refined`` / ``loss_dice_refined`` on ``refine_fn(batch_idx, query_idx)`` [N, H, W].

        The indices are int64 tensors on ``device`` (the predictions' device). ``refine_fn`` is called
        even with empty indices (it must return [0, H, W] then) so that the refiner's parameters
        stay in the graph on batches without targets.
        """
        batch_idx, src_idx = (idx.to(device) for idx in self._src_permutation_idx(indices))
        refined = refine_fn(batch_idx, src_idx)
        if refined.dim() != 3 or refined.shape[0] != src_idx.numel():
            raise ValueError(
                f"SetCriterion: refine_fn must return [N={src_idx.numel()}, H, W] mask logits, "
                f"got {tuple(refined.shape)}"
            )
        if src_idx.numel() == 0:
            zero = refined.sum() * 0.0
            return {"loss_mask_refined": zero, "loss_dice_refined": zero.clone()}
        tgt_masks = gather_target_masks(targets, indices, refined.device)
        loss_mask, loss_dice = self._point_losses(refined, tgt_masks, num_masks)
        return {"loss_mask_refined": loss_mask, "loss_dice_refined": loss_dice}

    def get_loss(
        self,
        loss: str,
        outputs: Dict[str, Any],
        targets: Sequence[Dict[str, Tensor]],
        indices: Indices,
        num_masks: float,
    ) -> Dict[str, Tensor]:
        if loss == "labels":
            return self.loss_labels(outputs, targets, indices, num_masks)
        if loss == "masks":
            return self.loss_masks(outputs, targets, indices, num_masks)
        raise ValueError(f"SetCriterion: unknown loss {loss!r}")

    # ------------------------------------------------------------------ forward
    def forward(self, outputs: Dict[str, Any], targets: Sequence[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """Compute all losses (unweighted).

        Args:
            outputs: ``pred_logits`` [B, Q, K+1], ``pred_masks`` [B, Q, H, W]; optionally
                ``aux_outputs`` (list of dicts with the same two keys, one per earlier prediction)
                and ``refine_fn`` (callable ``(batch_idx, query_idx) -> [N, H, W]`` refined logits
                of the final layer's matched queries).
            targets: per image ``labels`` [T] int64 and ``masks`` [T, H', W'].
        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice``, ``loss_{ce,mask,dice}_{i}`` per aux output,
            ``loss_{mask,dice}_refined`` when ``refine_fn`` is given (and "masks" is in ``losses``),
            ``loss_segment_aux`` when ``outputs["aux_class_logits"]`` (per-pixel class logits) is given.
        """
        if len(targets) != outputs["pred_logits"].shape[0]:
            raise ValueError(
                f"SetCriterion: {len(targets)} targets for a batch of {outputs['pred_logits'].shape[0]}"
            )
        self._check_labels(targets, outputs["pred_logits"].shape[-1])
        final = {k: outputs[k] for k in ("pred_logits", "pred_masks")}
        indices = self.matcher(final, targets)
        self.last_indices = indices
        num_masks = self._num_masks(targets, outputs["pred_logits"].device)

        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, final, targets, indices, num_masks))

        refine_fn: Optional[RefineFn] = outputs.get("refine_fn")
        if refine_fn is not None and "masks" in self.losses:
            device = outputs["pred_masks"].device
            losses.update(self.loss_refined_masks(refine_fn, targets, indices, num_masks, device))

        if outputs.get("aux_class_logits") is not None:
            losses["loss_segment_aux"] = segment_class_loss(outputs["aux_class_logits"], targets)

        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs") or []):
                aux_indices = self.matcher(aux, targets)
                for loss in self.losses:
                    aux_losses = self.get_loss(loss, aux, targets, aux_indices, num_masks)
                    losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})

        if not self._warned_unweighted:
            missing = sorted(k for k in losses if k not in self.weight_dict)
            if missing:
                # The meta-arch drops unweighted keys; a silent drop usually means a DEC_LAYERS mismatch.
                logger.warning("SetCriterion: losses without a weight (will be ignored): %s", missing)
                self._warned_unweighted = True
        return losses

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}, "
            f"deep_supervision={self.deep_supervision}"
        )


def build_weight_dict(cfg) -> Dict[str, float]:
    """Loss weights from ``cfg``: CE/BCE/Dice (2/5/5), refined BCE/Dice (if BAR), and ``_i`` copies.

    With deep supervision there are ``L = MODEL.MASK_FORMER.DEC_LAYERS`` aux predictions (the
    one before the first layer and after layers 1..L−1), keyed ``_0`` .. ``_{L−1}``.
    """
    mf = cfg.MODEL.MASK_FORMER
    weight_dict: Dict[str, float] = {
        "loss_ce": float(mf.CLASS_WEIGHT),
        "loss_mask": float(mf.MASK_WEIGHT),
        "loss_dice": float(mf.DICE_WEIGHT),
    }
    if mf.DEEP_SUPERVISION:
        base = dict(weight_dict)
        for i in range(mf.DEC_LAYERS):
            weight_dict.update({f"{k}_{i}": v for k, v in base.items()})
    flowseg = getattr(cfg.MODEL, "FLOWSEG", None)
    if flowseg is not None and flowseg.BAR.ENABLED:
        weight_dict["loss_mask_refined"] = float(mf.MASK_WEIGHT)
        weight_dict["loss_dice_refined"] = float(mf.DICE_WEIGHT)
    if mf.get("SEGMENT_AUX_WEIGHT", 0.0) > 0:
        weight_dict["loss_segment_aux"] = float(mf.SEGMENT_AUX_WEIGHT)
    return weight_dict


def build_criterion(cfg, num_classes: Optional[int] = -1) -> SetCriterion:
    """SetCriterion wired from ``cfg``.

    Args:
        num_classes: ``-1`` (default) = decide like the decoder does: a learnable class head with
            ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` columns only for ``MODEL.FLOWSEG.MODE == "generic"``
            without an LLM (``MODEL.LLM.PATH`` and ``CONFIG`` empty); otherwise the logits are
            condition similarities and K is dynamic (``None``). Pass an int or ``None`` to override.
    """
    mf = cfg.MODEL.MASK_FORMER
    if num_classes == -1:
        # a plain Mask2Former config (no FlowSeg keys) always has a class head
        class_head = getattr(cfg.MODEL, "FLOWSEG", None) is None or uses_class_head(cfg)
        num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES) if class_head else None
    return SetCriterion(
        num_classes=num_classes,
        matcher=build_matcher(cfg),
        weight_dict=build_weight_dict(cfg),
        eos_coef=mf.NO_OBJECT_WEIGHT,
        losses=["labels", "masks"],
        num_points=mf.TRAIN_NUM_POINTS,
        oversample_ratio=mf.OVERSAMPLE_RATIO,
        importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        deep_supervision=mf.DEEP_SUPERVISION,
    )
