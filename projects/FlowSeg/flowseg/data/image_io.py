"""Reading images for the mappers and the demo: Detectron2's ``read_image``, plus

* errors that name the file (a truncated JPEG otherwise says only "image file is truncated");
* 16-bit grey images (PNG / TIFF ``I;16`` or ``I``) scaled to 8 bits (``v * 255 / 65535``) with a
  warning; converting them directly clips every value above 255 to white. Other high-bit-depth
  modes (32-bit integer beyond 16 bits, floating point) are refused.
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from PIL import Image

__all__ = ["ImageReadError", "read_image"]

logger = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class ImageReadError(OSError):
    """An image file exists but cannot be decoded (truncated, not an image, unsupported depth)."""


def _to_8bit(image: Image.Image, path: str) -> Image.Image:
    if image.mode not in _SIXTEEN_BIT_MODES + ("I", "F"):
        return image
    values = np.asarray(image)
    if image.mode == "F" or values.min() < 0 or values.max() > 65535:
        raise ImageReadError(
            f"image {path} has pixel mode {image.mode!r} with values {values.min()}..{values.max()}: "
            "not an 8- or 16-bit image; convert it to 8-bit RGB"
        )
    logger.warning("%s is a 16-bit image (mode %s): scaled to 8 bits (value * 255 / 65535)", path, image.mode)
    scaled = (values.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def read_image(path: str, format: Optional[str] = None) -> np.ndarray:
    """HxWxC uint8 like ``detectron2.data.detection_utils.read_image`` (EXIF orientation applied).

    Raises ``FileNotFoundError`` / :class:`ImageReadError` (an ``OSError``) naming ``path``.
    """
    try:
        with PathManager.open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, inside the try: a truncated file fails here, with its name
            image = utils._apply_exif_orientation(image)
            image = _to_8bit(image, path)
            return utils.convert_PIL_to_numpy(image, format)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"image not found: {path}") from e
    except ImageReadError:
        raise
    except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated data
        raise ImageReadError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
