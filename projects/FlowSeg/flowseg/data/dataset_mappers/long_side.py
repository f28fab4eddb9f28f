"""SAM's long-side resize: the image's long side goes to ``INPUT.IMAGE_SIZE``, the model pads."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from detectron2.data import transforms as T
from PIL import Image

__all__ = ["long_side_shape", "long_side_resize_transform", "resize_long_side"]


def long_side_shape(height: int, width: int, long_side: int) -> Tuple[int, int]:
    """Output (h, w) when the long side is resized to ``long_side`` (SAM's ResizeLongestSide rounding)."""
    scale = long_side / max(height, width)
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def long_side_resize_transform(height: int, width: int, long_side: int) -> T.ResizeTransform:
    """Bilinear resize of a ``height`` x ``width`` image to long side ``long_side`` (:func:`long_side_shape`)."""
    new_h, new_w = long_side_shape(height, width, long_side)
    return T.ResizeTransform(height, width, new_h, new_w, Image.BILINEAR)


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    """``image`` (HxWxC uint8) with its long side resized to ``long_side``; as is when already that size."""
    height, width = image.shape[:2]
    resize = long_side_resize_transform(height, width, long_side)
    if (resize.new_h, resize.new_w) == (height, width):
        return image
    return resize.apply_image(image)
