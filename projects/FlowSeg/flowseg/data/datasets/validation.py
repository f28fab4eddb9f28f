"""Load-time checks shared by the data set loaders: ground-truth segmentations, phrase markers and
text-file encodings. A sample that would fail (or be scored wrongly) later is reported when the
data set is loaded, by file and id."""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "check_panoptic_segments",
    "check_phrase_markers",
    "polygon_area",
    "read_text_file",
    "segmentation_problem",
]


def polygon_area(flat: Sequence[float]) -> float:
    """Area of a COCO polygon ``[x0, y0, x1, y1, ...]`` (shoelace formula)."""
    xs, ys = flat[0::2], flat[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2.0


def _polygon_problem(poly: Any) -> Optional[str]:
    if not isinstance(poly, (list, tuple)) or not poly:
        return "an empty polygon"
    try:
        flat = [float(v) for v in poly]
    except (TypeError, ValueError):
        return "a polygon with non-numeric coordinates"
    if len(flat) % 2:
        return f"a polygon with an odd number of coordinates ({len(flat)})"
    if len(flat) < 6:
        return f"a polygon of {len(flat) // 2} point(s) (at least 3 needed)"
    if polygon_area(flat) <= 0:
        return "a zero-area polygon"
    return None


def segmentation_problem(segm: Any) -> Optional[str]:
    """Why a COCO ``segmentation`` (polygons or RLE) cannot be a ground-truth mask; None if it can.

    Polygons: every polygon needs >= 3 points and a positive area. RLE: ``size`` and ``counts``
    and at least one foreground pixel.
    """
    if not segm:
        return "no segmentation"
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "an RLE without 'counts' / 'size'"
        from pycocotools import mask as mask_utils

        rle = segm
        if isinstance(rle["counts"], list):  # uncompressed RLE
            rle = mask_utils.frPyObjects(rle, *rle["size"])
        return None if float(mask_utils.area(rle)) > 0 else "an RLE mask without foreground pixels"
    if not isinstance(segm, (list, tuple)):
        return f"a segmentation of type {type(segm).__name__} (expected polygons or RLE)"
    for i, poly in enumerate(segm):
        problem = _polygon_problem(poly)
        if problem:
            return f"{problem} (polygon {i})"
    return None


def check_phrase_markers(text: str, where: str) -> None:
    """Raise ``ValueError`` naming ``where`` (file / ids) when ``text``'s ``<p>…</p>`` are unbalanced
    or it holds a special token the prompt builder places itself (``<SEG>``, ``<image>``)."""
    # local: data must not load modeling
    from ...modeling.language.prompts import count_phrase_spans
    from ...modeling.language.tokens import check_user_text

    try:
        count_phrase_spans(check_user_text(text, "text"))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_panoptic_segments(pan_ids: Any, segments_info: Sequence[dict], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when a ``segments_info`` id is not in the PNG's ids.

    Such a segment can never be predicted: it would count as a false negative of panoptic quality
    (and silently vanish from training targets). ``pan_ids``: the decoded PNG (``rgb2id``).
    """
    import numpy as np

    present = set(np.unique(np.asarray(pan_ids)).tolist())
    missing = [s.get("id") for s in segments_info if s.get("id") not in present]
    if missing:
        raise ValueError(
            f"{where}: segments_info ids {missing[:10]} ({len(missing)} of {len(segments_info)}) "
            f"do not occur in the panoptic PNG (ids in the PNG: {sorted(present)[:10]})"
        )


# UTF-8 (a BOM is skipped) first; then the encoding the published ReasonSeg files use.
_ENCODINGS: Tuple[str, ...] = ("utf-8-sig", "cp1252")


def read_text_file(path: str, what: str) -> str:
    """Text of ``path`` as UTF-8, else cp1252 with a warning naming the file and the encoding.

    Shift-JIS and other CJK encodings are mostly *valid* cp1252 byte sequences, so a file that is
    not UTF-8 is decoded as cp1252 only when every byte >= 0x80 is a letter or sign of a Western
    language; otherwise ``ValueError`` asks for the file to be converted to UTF-8.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode(_ENCODINGS[0])
    except UnicodeDecodeError as e:
        utf8_error = e
    try:
        text = raw.decode(_ENCODINGS[1])
    except UnicodeDecodeError:
        text = None
    if text is None or not _plausible_western(text):
        raise ValueError(
            f"{what}: {path} is not UTF-8 ({utf8_error}) and does not read as cp1252 text either; "
            "convert it to UTF-8 (e.g. `iconv -f SHIFT-JIS -t UTF-8`)"
        )
    odd = sorted({c for c in text if ord(c) > 127})
    logger.warning(
        "%s: %s is not UTF-8; read it as cp1252 (non-ASCII characters: %s)", what, path, "".join(odd[:20])
    )
    return text


def _plausible_western(text: str) -> bool:
    # Latin-1 letters and the typographic signs cp1252 adds; mojibake of multi-byte encodings
    # brings in box/currency/fraction signs and control-range characters next to each other.
    allowed = set("ÀÁÂÃÄÅÆÇÈÉÊËÌÍÎÏÑÒÓÔÕÖØÙÚÛÜÝßàáâãäåæçèéêëìíîïñòóôõöøùúûüýÿ‘’“”–—…€°±·«»¡¿©®™•")
    non_ascii = [c for c in text if ord(c) > 127]
    return all(c in allowed for c in non_ascii)
