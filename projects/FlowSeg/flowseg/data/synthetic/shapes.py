"""Filled shapes of the synthetic scenes: a drawing name -> a boolean mask.

Every drawing is centred on ``center`` (x, y in pixels), scaled by the radius ``r`` (about the
distance from the centre to the outline) and turned by ``angle`` (radians). Scene vocabularies
(:mod:`.vocabulary`) name their shape words' drawings from :data:`DRAWINGS`.
"""

from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np

Point = Tuple[float, float]


def _regular(n: int, radii: List[float], center: Point, angle: float) -> np.ndarray:
    """Vertices at ``radii`` from ``center``, evenly spaced in angle, the first pointing up."""
    cx, cy = center
    t = angle + np.arange(n) * 2 * np.pi / n - np.pi / 2
    pts = np.stack([cx + np.asarray(radii) * np.cos(t), cy + np.asarray(radii) * np.sin(t)], axis=1)
    return np.round(pts).astype(np.int32)


def _placed(outline: np.ndarray, center: Point, r: float, angle: float) -> np.ndarray:
    """An outline given in units of ``r`` around (0, 0), turned by ``angle`` and moved to ``center``."""
    c, s = np.cos(angle), np.sin(angle)
    xy = outline * r
    pts = np.stack([center[0] + c * xy[:, 0] - s * xy[:, 1], center[1] + s * xy[:, 0] + c * xy[:, 1]], axis=1)
    return np.round(pts).astype(np.int32)


def _polygon(shape: str, center: Point, r: float, angle: float) -> Optional[np.ndarray]:
    """Polygon vertices of a drawing, or None for the ones drawn otherwise (circle, crescent)."""
    if shape in ("circle", "crescent"):
        return None
    if shape == "square":
        return _regular(4, [r * 1.1] * 4, center, angle + np.pi / 4)
    if shape == "triangle":
        return _regular(3, [r * 1.25] * 3, center, angle)
    if shape == "hexagon":
        return _regular(6, [r * 1.05] * 6, center, angle)
    if shape == "star":
        return _regular(10, [r * 1.3 if i % 2 == 0 else r * 0.55 for i in range(10)], center, angle)
    if shape == "pentagon":
        return _regular(5, [r * 1.1] * 5, center, angle)
    if shape == "diamond":  # a rhombus, longer than wide
        return _regular(4, [r * 1.35, r * 0.75] * 2, center, angle)
    if shape in _OUTLINES:
        return _placed(_OUTLINES[shape], center, r, angle)
    raise ValueError(f"unknown shape drawing {shape!r} (known: {sorted(DRAWINGS)})")


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y + 2.5], axis=1) / 14.0  # about unit radius around its centre


def _cross(half_width: float = 0.34, reach: float = 1.15) -> np.ndarray:
    """A plus sign: one arm's three corners, turned by 0, 90, 180 and 270 degrees."""
    arm = np.array([(-half_width, -reach), (half_width, -reach), (half_width, -half_width)])
    turns = [arm]
    for _ in range(3):
        turns.append(np.stack([-turns[-1][:, 1], turns[-1][:, 0]], axis=1))
    return np.concatenate(turns)


_OUTLINES: Dict[str, np.ndarray] = {
    "cross": _cross(),
    # shaft from -1.2 r to 0.15 r, head from 0.15 r to 1.25 r
    "arrow": np.array(
        [(-1.2, -0.28), (0.15, -0.28), (0.15, -0.8), (1.25, 0.0), (0.15, 0.8), (0.15, 0.28), (-1.2, 0.28)]
    ),
    "heart": _heart(),
}


def _disk(m: np.ndarray, center: Point, r: float, value: int) -> None:
    cv2.circle(m, (int(round(center[0])), int(round(center[1]))), int(round(r)), value, -1)


def shape_mask(shape: str, center: Point, r: float, angle: float, size: int) -> np.ndarray:
    """The ``size`` x ``size`` boolean mask of drawing ``shape`` (a key of :data:`DRAWINGS`)."""
    m = np.zeros((size, size), np.uint8)
    if shape == "circle":
        _disk(m, center, r, 1)
    elif shape == "crescent":  # a disk with an offset disk cut out, opening towards ``angle``
        _disk(m, center, r * 1.15, 1)
        cut = (center[0] + 0.6 * r * np.cos(angle), center[1] + 0.6 * r * np.sin(angle))
        _disk(m, cut, r * 0.95, 0)
    else:
        cv2.fillPoly(m, [_polygon(shape, center, r, angle)], 1)
    return m.astype(bool)


DRAWINGS: Tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "hexagon",
    "pentagon",
    "diamond",
    "cross",
    "crescent",
    "heart",
    "arrow",
)
