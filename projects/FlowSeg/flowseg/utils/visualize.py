"""Overlay pictures for referring / reasoning results (Detectron2's ``Visualizer``)."""

from typing import Optional

import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer

PRED_COLOR = (0.1, 0.45, 1.0)  # blue: prediction
GT_COLOR = (0.1, 0.85, 0.2)  # green: ground truth


def draw_referring_overlay(
    image_rgb: np.ndarray,
    expression: str,
    pred_mask: np.ndarray,
    gt_mask: Optional[np.ndarray] = None,
    score: Optional[float] = None,
    iou: Optional[float] = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Image with the expression as a title, the predicted mask (blue) and, when given, the
    ground-truth mask side by side (green). Returns an RGB uint8 array."""
    stats = [] if score is None else [f"score {score:.2f}"]
    if iou is not None:
        stats.append(f"IoU {100 * iou:.1f}")

    def panel(mask: np.ndarray, color, label: str) -> np.ndarray:
        vis = Visualizer(image_rgb, scale=scale, instance_mode=ColorMode.IMAGE)
        if mask is not None and np.asarray(mask).any():
            vis.draw_binary_mask(np.asarray(mask).astype(np.uint8), color=color, alpha=0.5)
        vis.draw_text(label, (4, 2), horizontal_alignment="left", color="white", font_size=8)
        return vis.get_output().get_image()

    panels = [panel(pred_mask, PRED_COLOR, "prediction")]
    if gt_mask is not None:
        panels.append(panel(gt_mask, GT_COLOR, "ground truth"))
    body = np.concatenate(panels, axis=1)
    # caption strip under the panels (expression, then score / IoU), drawn by a second Visualizer
    # on a blank canvas that is already at output size
    font = 6 * scale
    lines = [expression] + (["  ".join(stats)] if stats else [])
    line_h = int(round(1.6 * font))
    canvas = np.full((line_h * len(lines) + 4, body.shape[1], 3), 255, np.uint8)
    cap = Visualizer(canvas, scale=1.0)
    for i, text in enumerate(lines):
        cap.draw_text(text, (4, 2 + i * line_h), horizontal_alignment="left", color="black", font_size=font)
    return np.concatenate([body, cap.get_output().get_image()], axis=0)
