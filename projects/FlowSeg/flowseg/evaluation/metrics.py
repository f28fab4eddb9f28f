"""Mask metrics of referring / reasoning segmentation as pure numpy functions.

Conventions (those of LISA's and X-SAM's evaluation code):

* Per-sample IoU = I / U over the foreground (target = 1); a sample whose prediction and ground
  truth are both empty (U = 0) counts IoU 1.0 (LISA: ``acc_iou[union == 0] += 1.0``).
* cIoU = ΣI / ΣU over all samples (1.0 when ΣU = 0, as in X-SAM's ``IouStat``);
  gIoU = mean of the per-sample IoUs.
* Ignore pixels (ReasonSeg "ignore" polygons) are left out of both I and U (LISA sets them to
  255 in prediction and target before counting).
* Pr@t = fraction of samples with IoU >= t. This is the convention of the referring-segmentation
  code that reports Pr@k (the TF RMI/RRN evaluation and its descendants LAVT, ReLA:
  ``seg_correct += (this_iou >= eval_seg_iou)``); LISA itself reports no Pr@k.
* Boundary IoU (Cheng et al., CVPR 2021, official ``boundary-iou-api``): the boundary band of a
  mask is the mask minus its erosion by ``d = max(1, round(ratio * image_diagonal))`` pixels,
  computed by padding 1 px of zeros (so a mask cut by the image border has a boundary there),
  eroding with a 3x3 kernel ``d`` times and cropping. BIoU = |Gb ∩ Pb| / |Gb ∪ Pb|, with the
  same empty/empty = 1.0 rule (the official API would divide by zero).

All functions return fractions in [0, 1]; the evaluators convert to percent.
"""

from typing import Dict, Iterable, Optional, Sequence, Tuple

import cv2
import numpy as np

__all__ = [
    "PR_THRESHOLDS",
    "as_bool_array",
    "intersection_union",
    "candidates_intersection_union",
    "iou_from_iu",
    "boundary_width",
    "mask_to_boundary",
    "boundary_intersection_union",
    "cumulative_iou",
    "mean_iou",
    "precision_at",
]

PR_THRESHOLDS: Tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def as_bool_array(mask: object) -> np.ndarray:
    """numpy bool array of a mask given as numpy array, torch tensor (any device) or nested list."""
    if hasattr(mask, "detach"):  # torch.Tensor without importing torch here
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask).astype(bool, copy=False)


def _valid(shape: Tuple[int, ...], ignore: Optional[np.ndarray]) -> Optional[np.ndarray]:
    if ignore is None:
        return None
    ignore = as_bool_array(ignore)
    if ignore.shape != shape[-2:]:
        raise ValueError(f"ignore mask {ignore.shape} does not match mask {shape[-2:]}")
    return ~ignore


def _check_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"{what}: prediction {a.shape[-2:]} and ground truth {b.shape[-2:]} differ in size")


def intersection_union(pred: object, gt: object, ignore: Optional[object] = None) -> Tuple[int, int]:
    """Foreground intersection and union of two [H, W] masks, ignore pixels left out of both."""
    pred, gt = as_bool_array(pred), as_bool_array(gt)
    _check_same(pred, gt, "intersection_union")
    inter = pred & gt
    union = pred | gt
    valid = _valid(gt.shape, ignore)
    if valid is not None:
        inter &= valid
        union &= valid
    return int(inter.sum()), int(union.sum())


def candidates_intersection_union(
    candidates: object, gt: object, ignore: Optional[object] = None
) -> Tuple[np.ndarray, np.ndarray]:
    """I and U of each of N candidate masks [N, H, W] against one ground truth [H, W] -> two int64 [N]."""
    cand, gt = as_bool_array(candidates), as_bool_array(gt)
    if cand.ndim != 3:
        raise ValueError(f"candidates must be [N, H, W], got {cand.shape}")
    _check_same(cand, gt, "candidates_intersection_union")
    valid = _valid(gt.shape, ignore)
    gt_valid = gt if valid is None else gt & valid
    cand_valid = cand if valid is None else cand & valid
    inter = (cand_valid & gt_valid).sum(axis=(1, 2), dtype=np.int64)
    # |C ∪ G| = |C| + |G| - |C ∩ G| (avoids an [N, H, W] union array)
    union = cand_valid.sum(axis=(1, 2), dtype=np.int64) + int(gt_valid.sum()) - inter
    return inter, union


def iou_from_iu(intersection: object, union: object) -> np.ndarray:
    """Element-wise I / U with U = 0 (empty prediction and empty ground truth) -> 1.0."""
    i = np.asarray(intersection, dtype=np.float64)
    u = np.asarray(union, dtype=np.float64)
    return np.where(u > 0, i / np.maximum(u, 1.0), 1.0)


def boundary_width(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """Boundary band width d = max(1, round(ratio * image diagonal)) (boundary-iou-api)."""
    return max(1, int(round(dilation_ratio * float(np.sqrt(height**2 + width**2)))))


def mask_to_boundary(mask: object, dilation_ratio: float = 0.02, width: Optional[int] = None) -> np.ndarray:
    """Inner boundary band of a binary [H, W] mask: mask minus its erosion by ``d`` pixels.

    ``width`` overrides ``d`` (otherwise from ``dilation_ratio`` and the mask's own diagonal).
    """
    m = as_bool_array(mask).astype(np.uint8)
    h, w = m.shape
    d = boundary_width(h, w, dilation_ratio) if width is None else int(width)
    # Pad with zeros: cv2.erode's default border would not erode from outside the image.
    padded = cv2.copyMakeBorder(m, 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    eroded = cv2.erode(padded, np.ones((3, 3), dtype=np.uint8), iterations=d)[1 : h + 1, 1 : w + 1]
    return (m > 0) & ~(eroded > 0)


def boundary_intersection_union(
    pred: object,
    gt: object,
    dilation_ratio: float = 0.02,
    ignore: Optional[object] = None,
) -> Tuple[int, int]:
    """|Gb ∩ Pb| and |Gb ∪ Pb| of the boundary bands of prediction and ground truth.

    The bands are computed on the full masks (the official definition); ignore pixels are then
    left out of the counts, as for the region IoU.
    """
    pred, gt = as_bool_array(pred), as_bool_array(gt)
    _check_same(pred, gt, "boundary_intersection_union")
    d = boundary_width(gt.shape[0], gt.shape[1], dilation_ratio)
    return intersection_union(mask_to_boundary(pred, width=d), mask_to_boundary(gt, width=d), ignore)


def cumulative_iou(intersections: Iterable[float], unions: Iterable[float]) -> float:
    """ΣI / ΣU (cIoU); 1.0 when ΣU = 0 (every sample empty/empty), NaN for no samples."""
    i = np.asarray(list(intersections), dtype=np.float64)
    u = np.asarray(list(unions), dtype=np.float64)
    if i.size == 0:
        return float("nan")
    return float(i.sum() / u.sum()) if u.sum() > 0 else 1.0


def mean_iou(intersections: Iterable[float], unions: Iterable[float]) -> float:
    """Mean of the per-sample IoUs (gIoU), empty/empty counting 1.0; NaN for no samples."""
    ious = iou_from_iu(list(intersections), list(unions))
    return float(ious.mean()) if ious.size else float("nan")


def precision_at(ious: Iterable[float], thresholds: Sequence[float] = PR_THRESHOLDS) -> Dict[float, float]:
    """{t: fraction of samples with IoU >= t} (Pr@t); NaN for no samples."""
    ious = np.asarray(list(ious), dtype=np.float64)
    if ious.size == 0:
        return {float(t): float("nan") for t in thresholds}
    return {float(t): float((ious >= t).mean()) for t in thresholds}
