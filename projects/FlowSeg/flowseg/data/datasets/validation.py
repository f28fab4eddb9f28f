"""Load-time checks shared by the data set loaders: ground-truth segmentations, phrase markers and
text-file encodings. A sample that would fail (or be scored wrongly) later is reported when the
data set is loaded, by file and id."""

from __future__ import annotations

import logging
import re
from typing import Any, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

__all__ = [
    "check_panoptic_segments",
    "check_panoptic_size",
    "check_phrase_markers",
    "outside_image_problem",
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


def outside_image_problem(polygons: Sequence[Sequence[float]], height: int, width: int) -> Optional[str]:
    """Why flat polygons ``[x0, y0, x1, y1, ...]`` give an empty mask in a ``height`` x ``width``
    image because every one lies wholly outside it; None if one reaches into the image.

    Scoring such a target would count an empty ground truth (a model answering "nothing" is right),
    so it is an annotation of another image or another image size, not a sample to score.
    """
    try:
        flats = [[float(v) for v in p] for p in polygons if isinstance(p, (list, tuple)) and len(p) >= 2]
    except (TypeError, ValueError):
        return None  # not polygons: other checks name what is wrong
    if not flats:
        return None
    xs = [v for f in flats for v in f[0::2]]
    ys = [v for f in flats for v in f[1::2]]
    for f in flats:
        fx, fy = f[0::2], f[1::2]
        # pixel (i, j) covers [i, i+1) x [j, j+1): a polygon touching none of them has no area inside
        if max(fx) > 0 and min(fx) < width and max(fy) > 0 and min(fy) < height:
            return None
    return (
        f"{'a polygon' if len(flats) == 1 else f'{len(flats)} polygons'} wholly outside the "
        f"{width}x{height} (WxH) image (x in [{min(xs):g}, {max(xs):g}], y in [{min(ys):g}, {max(ys):g}]): "
        "an empty target mask after rasterisation"
    )


def segmentation_problem(
    segm: Any, height: Optional[int] = None, width: Optional[int] = None
) -> Optional[str]:
    """Why a COCO ``segmentation`` (polygons or RLE) cannot be a ground-truth mask; None if it can.

    Polygons: every polygon needs >= 3 points and a positive area. RLE: ``size`` and ``counts``
    and at least one foreground pixel. Given the image size, polygons must not all lie outside the
    image (:func:`outside_image_problem`) and an RLE must have the image's size.
    """
    if not segm:
        return "no segmentation"
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "an RLE without 'counts' / 'size'"
        if height is not None and width is not None and list(segm["size"]) != [height, width]:
            return f"an RLE of size {list(segm['size'])} (HxW) for an image of size {[height, width]}"
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
    if height is not None and width is not None:
        return outside_image_problem(segm, height, width)
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


def check_panoptic_size(pan_shape: Sequence[int], image_shape: Sequence[int], where: str) -> None:
    """Raise ``ValueError`` naming ``where`` when the panoptic PNG and its image differ in size.

    Detectron2's transforms assert equal sizes without naming a file, and the panoptic evaluator
    fails only after the whole inference, on arrays that do not broadcast.
    """
    (ph, pw), (ih, iw) = pan_shape[:2], image_shape[:2]
    if (ph, pw) != (ih, iw):
        raise ValueError(
            f"{where}: the PNG is {pw}x{ph} (WxH) but its image is {iw}x{ih}; the panoptic PNG must "
            "have the size of the image it annotates (a PNG of another image, or a resized one?)"
        )


# UTF-8 (a BOM is skipped) first; then the encoding the published ReasonSeg files use.
_ENCODINGS: Tuple[str, ...] = ("utf-8-sig", "cp1252")
#: Multi-byte encodings tried (strictly) to name the likely one in the error message.
_MULTIBYTE: Tuple[str, ...] = ("shift_jis", "euc_jp", "gbk", "big5", "euc_kr")
#: Characters of a Western text read as cp1252: Latin-1's printable range and the typographic signs
#: and letters cp1252 adds. Left out: ‚ƒ„†‡ˆ‰‹›˜, which Shift-JIS lead bytes turn into.
_WESTERN = set(map(chr, range(0xA0, 0x100))) | set("‘’“”–—…€•™ŠšŽžŒœŸ")
#: Western words hold at most a few non-ASCII letters in a row (Größe, créée); multi-byte
#: encodings read as cp1252 give long runs of letters and signs (GBK 红色的盒子 -> ºìÉ«µÄºÐ×Ó).
_MAX_WESTERN_RUN = 3


def read_text_file(path: str, what: str) -> str:
    """Text of ``path`` as UTF-8, else cp1252 (Latin-1) with a warning naming the file.

    Shift-JIS, GBK and the other CJK encodings are mostly *valid* cp1252 byte sequences, so a file
    that is not UTF-8 is read as cp1252 only when it looks Western (:func:`_western_problem`);
    otherwise ``ValueError`` names the cause (control bytes: not text; else a multi-byte encoding,
    with those that decode it) and asks for the file to be converted to UTF-8.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode(_ENCODINGS[0])
    except UnicodeDecodeError as e:
        utf8_error = e
    control = next((i for i, b in enumerate(raw) if b < 0x20 and b not in b"\t\n\r\f"), None)
    if control is not None:
        raise ValueError(
            f"{what}: {path} is not text: control byte 0x{raw[control]:02x} at offset {control} "
            "(binary data, or UTF-16/UTF-32 text: convert it to UTF-8)"
        )
    try:
        text = raw.decode(_ENCODINGS[1])
        problem = _western_problem(text)
    except UnicodeDecodeError as e:
        text, problem = "", f"byte 0x{raw[e.start]:02x} at offset {e.start} is no cp1252 character"
    if problem:
        fits = [c.upper().replace("_", "-") for c in _MULTIBYTE if _decodes(raw, c)]
        # several multi-byte encodings accept most byte strings: list them, don't pick one
        hint = f"it decodes without error as {', '.join(fits)}; " if fits else ""
        hint += "`iconv -f ITS-ENCODING -t UTF-8`"
        raise ValueError(
            f"{what}: {path} is not UTF-8 ({utf8_error}) nor Western cp1252/Latin-1 text ({problem}); "
            f"convert it to UTF-8 ({hint})"
        )
    odd = sorted({c for c in text if ord(c) > 127})
    logger.warning(
        "%s: %s is not UTF-8; read it as cp1252 (non-ASCII characters: %s)", what, path, "".join(odd[:20])
    )
    return text


def _decodes(raw: bytes, codec: str) -> bool:
    try:
        raw.decode(codec)
    except UnicodeDecodeError:
        return False
    return True


def _western_problem(text: str) -> Optional[str]:
    """Why ``text`` (a non-UTF-8 file read as cp1252) is not Western text, or None: a character
    outside :data:`_WESTERN`, or a run of non-ASCII characters with a sign in it or longer than
    :data:`_MAX_WESTERN_RUN`."""
    for m in re.finditer(r"[^\x00-\x7f\xa0]+", text):  # a no-break space (French « x », 5 €) separates
        run = m.group()
        odd = [c for c in run if c not in _WESTERN]
        if odd:
            return f"{odd[0]!r} at character {m.start() + run.index(odd[0])}"
        if len(run) > 1 and (len(run) > _MAX_WESTERN_RUN or not run.isalpha()):
            return f"{len(run)} non-ASCII characters in a row ({run[:12]!r}) at character {m.start()}"
    return None
