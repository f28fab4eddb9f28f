"""Overlay pictures for referring / reasoning results (Detectron2's ``Visualizer``).

A translucent fill alone disappears on objects of its own colour or on busy texture, so each
mask is filled with stripes of its colour and of white, and outlined: a dark band under a bright
line is visible on light, dark and coloured pixels alike. Panel names are written in the caption
below the picture, never over it.

:func:`draw_expressions_overlay` draws several expressions of one image, each in its own colour,
with a legend (colour, expression, score or "no target") below the picture, so that nothing is
drawn over the objects. Text goes through :mod:`.fonts` (CJK, emoji and other scripts).
"""

import textwrap
import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from detectron2.utils.visualizer import VisImage, Visualizer
from matplotlib.patches import Rectangle

from .fonts import unicode_font_families

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


def hatch_fill(image_rgb: np.ndarray, mask: np.ndarray, color: Tuple, alpha: float = 0.55) -> np.ndarray:
    """Return a copy of ``image_rgb`` with the mask filled by diagonal stripes alternating between
    ``color`` (RGB in [0, 1]) and white: on an object of the fill's own colour the white stripes
    still show the mask, on a white one the coloured stripes do."""
    h, w = image_rgb.shape[:2]
    period = max(4, min(h, w) // 24)
    yy, xx = np.mgrid[:h, :w]
    on_color = ((xx + yy) // period) % 2 == 0
    m = np.asarray(mask, bool)
    out = image_rgb.astype(np.float32)
    rgb = np.asarray(color, np.float32) * 255
    out[m & on_color] = (1 - alpha) * out[m & on_color] + alpha * rgb
    out[m & ~on_color] = (1 - alpha) * out[m & ~on_color] + alpha * 255
    return out.round().astype(np.uint8)


def _panel(image_rgb: np.ndarray, mask: Optional[np.ndarray], color: Tuple, scale: float) -> np.ndarray:
    h, w = image_rgb.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    panel = np.ascontiguousarray(cv2.resize(image_rgb, size, interpolation=cv2.INTER_LINEAR))
    if mask is None or not np.asarray(mask).any():
        return panel
    big = cv2.resize(np.asarray(mask, np.uint8), size, interpolation=cv2.INTER_NEAREST)
    return draw_outline(hatch_fill(panel, big, color), big, outline_width(*panel.shape[:2]))


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
    """Image with the predicted mask (blue and white stripes, outlined) and, when given, the
    ground-truth mask beside it (green and white stripes, outlined), over a caption with the
    expression, score / IoU and which panel is which. The caption's font grows with the picture.
    Returns an RGB uint8 array."""
    stats = [] if score is None else [f"score {score:.2f}"]
    if iou is not None:
        stats.append(f"IoU {100 * iou:.1f}")
    panels = [_panel(image_rgb, pred_mask, PRED_COLOR, scale)]
    key = "prediction (blue)"
    if gt_mask is not None:
        panels.append(_panel(image_rgb, gt_mask, GT_COLOR, scale))
        key = "left: prediction (blue) | right: ground truth (green)"
    body = np.concatenate(panels, axis=1)
    font = caption_font_size(*image_rgb.shape[:2]) * scale
    # the panel names go below the picture, where they cannot cover the target
    lines = [expression] + (["  ".join(stats)] if stats else []) + [key]
    return np.concatenate([body, _caption(lines, body.shape[1], font)], axis=0)


# Distinct, saturated colours (RGB) that stay apart on photos and on each other; cycled after 10.
EXPRESSION_COLORS = (
    (230, 25, 75),
    (0, 130, 200),
    (255, 200, 25),
    (60, 180, 75),
    (145, 30, 180),
    (245, 130, 48),
    (70, 240, 240),
    (240, 50, 230),
    (128, 0, 0),
    (0, 0, 128),
)
FILL_ALPHA = 0.5
MIN_LONG_SIDE = 640  # smaller pictures are enlarged so that outlines and the legend stay legible


@dataclass
class ExpressionResult:
    """What the model answered for one expression of an image: the mask at the image's
    resolution, the selection score and, for a GRES model, whether it answered "no target"."""

    text: str
    mask: np.ndarray
    score: Optional[float] = None
    no_target: bool = False


def expression_color(i: int) -> Tuple[int, int, int]:
    return EXPRESSION_COLORS[i % len(EXPRESSION_COLORS)]


def auto_scale(height: int, width: int) -> float:
    """Drawing scale that enlarges a small picture to a long side of :data:`MIN_LONG_SIDE`."""
    return max(1.0, MIN_LONG_SIDE / max(height, width, 1))


def legend_text(i: int, r: ExpressionResult) -> str:
    if r.no_target:
        answer = "no target"
    elif not np.asarray(r.mask).any():
        answer = "empty mask" + ("" if r.score is None else f" (score {r.score:.2f})")
    else:
        answer = "" if r.score is None else f"score {r.score:.2f}"
    return f"{i + 1}. {r.text}" + (f"  \u2014  {answer}" if answer else "")


def _text_width_em(text: str) -> float:
    # wide (CJK) and emoji characters take about one em, others about 0.6
    return sum(1.0 if unicodedata.east_asian_width(c) in "WF" else 0.6 for c in text)


def _wrap(text: str, max_em: float) -> List[str]:
    lines, cur = [], ""
    for word in text.split(" "):
        trial = f"{cur} {word}" if cur else word
        if cur and _text_width_em(trial) > max_em:
            lines.append(cur)
            cur = word
        else:
            cur = trial
        while _text_width_em(cur) > max_em and len(cur) > 1:  # a long unbroken run (CJK)
            cut = max(1, next(k for k in range(len(cur), 0, -1) if _text_width_em(cur[:k]) <= max_em))
            lines.append(cur[:cut])
            cur = cur[cut:]
    return lines + [cur]


def draw_legend(results: Sequence[ExpressionResult], width: int, font_px: float) -> np.ndarray:
    """White strip ``width`` pixels wide: per expression a swatch of its colour and its line."""
    swatch, pad = font_px, font_px * 0.5
    text_x = pad + swatch + pad
    rows = [_wrap(legend_text(i, r), (width - text_x - pad) / font_px) for i, r in enumerate(results)]
    line_h = 1.45 * font_px
    height = int(np.ceil(pad + sum(len(r) for r in rows) * line_h + pad * (len(rows) - 1) + pad))
    vis = VisImage(np.full((max(height, 1), width, 3), 255, np.uint8))
    points = font_px * 72.0 / vis.dpi
    families = unicode_font_families()  # matplotlib falls back glyph by glyph along this list
    y = pad
    for i, lines in enumerate(rows):
        color = np.array(expression_color(i)) / 255.0
        vis.ax.add_patch(
            Rectangle((pad, y + 0.2 * font_px), swatch, swatch, facecolor=color, edgecolor="black", lw=1)
        )
        for line in lines:
            vis.ax.text(text_x, y, line, size=points, family=families, va="top", ha="left", color="black")
            y += line_h
        y += pad
    return vis.get_image()


def draw_expressions_overlay(
    image_rgb: np.ndarray, results: Sequence[ExpressionResult], scale: Optional[float] = None
) -> np.ndarray:
    """The image with each expression's mask filled and outlined in its own colour
    (:func:`expression_color`, in order), over a legend. ``scale`` defaults to
    :func:`auto_scale`; the outline and the legend's font follow the drawn size. RGB uint8."""
    h, w = image_rgb.shape[:2]
    scale = auto_scale(h, w) if scale is None else float(scale)
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    out = cv2.resize(np.ascontiguousarray(image_rgb), size, interpolation=cv2.INTER_LINEAR).astype(np.float32)
    masks = [
        cv2.resize(np.asarray(r.mask, np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        for r in results
    ]
    for i, m in enumerate(masks):
        out[m] = (1 - FILL_ALPHA) * out[m] + FILL_ALPHA * np.array(expression_color(i), np.float32)
    out = np.ascontiguousarray(out.round().astype(np.uint8))
    thickness = outline_width(size[1], size[0])
    for i, m in enumerate(masks):
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, OUTLINE_BAND, 2 * thickness)
        cv2.drawContours(out, contours, -1, expression_color(i), thickness)
    font_px = max(12.0, 0.03 * size[0])
    return np.concatenate([out, draw_legend(results, size[0], font_px)], axis=0)
