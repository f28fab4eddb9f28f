"""Overlay pictures for referring / reasoning results (Detectron2's ``Visualizer``).

A translucent fill alone disappears on objects of its own colour or on busy texture, so each
mask is also outlined: a dark band under a bright line is visible on light, dark and coloured
pixels alike.
"""

import textwrap
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.utils.visualizer import ColorMode, Visualizer

PRED_COLOR = (0.1, 0.45, 1.0)  # blue fill: prediction
GT_COLOR = (0.1, 0.85, 0.2)  # green fill: ground truth
OUTLINE_COLOR = (255, 235, 0)  # yellow line over a black band
OUTLINE_BAND = (0, 0, 0)


def outline_width(height: int, width: int) -> int:
    """Outline thickness in pixels: about 0.6% of the image's shorter side, at least 2."""
    return max(2, int(round(0.006 * min(height, width))))


def caption_font_size(height: int, width: int) -> float:
    """Caption font size in pixels: readable on small and large pictures alike."""
    return max(10.0, 0.045 * min(height, width))


def draw_outline(image_rgb: np.ndarray, mask: np.ndarray, thickness: int) -> np.ndarray:
    """Return a copy of ``image_rgb`` with the mask's contours drawn as a bright line on a
    dark band (twice as wide), so the boundary stands out on any background."""
    contours, _ = cv2.findContours(np.asarray(mask, np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    out = np.ascontiguousarray(image_rgb.copy())
    cv2.drawContours(out, contours, -1, OUTLINE_BAND, 2 * thickness)
    cv2.drawContours(out, contours, -1, OUTLINE_COLOR, thickness)
    return out


def _panel(
    image_rgb: np.ndarray, mask: Optional[np.ndarray], color: Tuple, label: str, scale: float
) -> np.ndarray:
    h, w = image_rgb.shape[:2]
    vis = Visualizer(image_rgb, scale=scale, instance_mode=ColorMode.IMAGE)
    has_mask = mask is not None and np.asarray(mask).any()
    if has_mask:
        vis.draw_binary_mask(np.asarray(mask).astype(np.uint8), color=color, edge_color=color, alpha=0.45)
    font = caption_font_size(h, w) * 0.8  # Visualizer scales text by its own output scale
    vis.draw_text(label, (4, 2), horizontal_alignment="left", color="white", font_size=font)
    panel = vis.get_output().get_image()
    if has_mask:
        big = cv2.resize(
            np.asarray(mask, np.uint8), (panel.shape[1], panel.shape[0]), interpolation=cv2.INTER_NEAREST
        )
        panel = draw_outline(panel, big, outline_width(*panel.shape[:2]))
    return panel


def wrap_caption(lines: Sequence[str], width: int, font: float) -> List[str]:
    """Break caption lines so that each fits ``width`` pixels (a glyph averages ~0.65 em
    in Detectron2's sans-serif font)."""
    chars = max(8, int((width - 8) / (0.75 * font)))
    return [part for line in lines for part in textwrap.wrap(line, chars) or [""]]


def _caption(lines: Sequence[str], width: int, font: float) -> np.ndarray:
    lines = wrap_caption(lines, width, font)
    line_h = int(round(1.5 * font))
    canvas = np.full((line_h * len(lines) + int(font // 2), width, 3), 255, np.uint8)
    cap = Visualizer(canvas, scale=1.0)
    for i, text in enumerate(lines):
        cap.draw_text(text, (4, 2 + i * line_h), horizontal_alignment="left", color="white", font_size=font)
    return cap.get_output().get_image()


def draw_referring_overlay(
    image_rgb: np.ndarray,
    expression: str,
    pred_mask: np.ndarray,
    gt_mask: Optional[np.ndarray] = None,
    score: Optional[float] = None,
    iou: Optional[float] = None,
    scale: float = 1.0,
) -> np.ndarray:
    """Image with the predicted mask (blue fill, outlined) and, when given, the ground-truth mask
    beside it (green fill, outlined), over a caption with the expression and score / IoU. The
    caption's font grows with the picture. Returns an RGB uint8 array."""
    stats = [] if score is None else [f"score {score:.2f}"]
    if iou is not None:
        stats.append(f"IoU {100 * iou:.1f}")
    panels = [_panel(image_rgb, pred_mask, PRED_COLOR, "prediction", scale)]
    if gt_mask is not None:
        panels.append(_panel(image_rgb, gt_mask, GT_COLOR, "ground truth", scale))
    body = np.concatenate(panels, axis=1)
    font = caption_font_size(*image_rgb.shape[:2]) * scale
    lines = [expression] + (["  ".join(stats)] if stats else [])
    return np.concatenate([body, _caption(lines, body.shape[1], font)], axis=0)
