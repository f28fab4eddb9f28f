"""Fonts that draw any text a user can type (Latin, CJK, emoji, other scripts) in the pictures.

Matplotlib's own DejaVu Sans covers Latin, Greek and Cyrillic only: a Chinese or emoji expression
would come out as missing-glyph boxes. The Noto fonts of the ``manimgx-fonts`` and
``manimgx-fonts-cjk`` packages (OFL, in ``requirements.txt``) are registered with matplotlib and
listed after DejaVu Sans in :func:`unicode_font_families`: text drawn with that family list falls
back glyph by glyph (matplotlib >= 3.6).
Without the packages, or for a character no font covers, a warning names the characters.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib
import logging
import os
from typing import Dict, List, Tuple

from matplotlib import font_manager

__all__ = ["FONT_PACKAGES", "unicode_font_families", "uncovered_characters", "warn_uncovered"]

logger = logging.getLogger(__name__)

FONT_PACKAGES = ("manimgx_fonts", "manimgx_fonts_cjk")
# Simplified Chinese first: the CJK collection's faces differ only in regional glyph forms.
_PREFERRED = ("DejaVu Sans", "Noto Sans", "Noto Sans CJK SC", "Noto Sans Symbols", "Noto Emoji")


@functools.cache
def _package_fonts() -> Tuple[Tuple[str, str], ...]:
    """(family, file) of every font file the font packages ship, registered with matplotlib."""
    found: List[Tuple[str, str]] = []
    missing = []
    for name in FONT_PACKAGES:
        try:
            pkg = importlib.import_module(name)
        except ImportError:
            missing.append(name.replace("_", "-"))
            continue
        for path in sorted(glob.glob(os.path.join(os.path.dirname(pkg.__file__), "*.tt[fc]"))):
            font_manager.fontManager.addfont(path)
            found += [(e.name, e.fname) for e in font_manager.fontManager.ttflist if e.fname == path]
    _label_variable_fonts_normal({path for _, path in found})
    if missing:
        logger.warning(
            "font package(s) %s not installed: text outside Latin, Greek and Cyrillic (e.g. Chinese, emoji) "
            "is drawn as missing-glyph boxes; pip install %s",
            ", ".join(missing),
            " ".join(missing),
        )
    return tuple(dict.fromkeys(found))


def _label_variable_fonts_normal(paths: set) -> None:
    # A variable font is registered with the weight of its default instance (100 for the CJK
    # collection); being the only face of its family, matplotlib would use it anyway, but warn on
    # every lookup of weight "normal".
    entries = font_manager.fontManager.ttflist
    for i, e in enumerate(entries):
        if e.fname in paths and e.weight != 400:
            entries[i] = dataclasses.replace(e, weight=400)
    font_manager.fontManager._findfont_cached.cache_clear()


def unicode_font_families() -> List[str]:
    """Sans-serif families in fallback order: DejaVu Sans, then the packages' Noto fonts."""
    families = [name for name, _ in _package_fonts()]
    ordered = [f for f in _PREFERRED if f == "DejaVu Sans" or f in families]
    return ordered + sorted(set(families) - set(ordered))


@functools.cache
def _charmaps() -> Dict[str, frozenset]:
    from matplotlib.ft2font import FT2Font

    files = {name: path for name, path in _package_fonts()}
    files.setdefault("DejaVu Sans", font_manager.findfont("DejaVu Sans"))
    return {name: frozenset(FT2Font(path).get_charmap()) for name, path in files.items()}


def uncovered_characters(text: str) -> str:
    """The characters of ``text`` that no available font has a glyph for (white space and
    variation selectors, which draw nothing, are not counted)."""
    maps = _charmaps()
    out = []
    for ch in dict.fromkeys(text):
        if ch.isspace() or 0xFE00 <= ord(ch) <= 0xFE0F or ord(ch) == 0x200D:
            continue
        if not any(ord(ch) in m for m in maps.values()):
            out.append(ch)
    return "".join(out)


def warn_uncovered(text: str, log: logging.Logger = logger) -> str:
    """Log a warning naming the characters of ``text`` that will draw as boxes; returns them."""
    bad = uncovered_characters(text)
    if bad:
        log.warning("no font has a glyph for %r (in %r): drawn as missing-glyph boxes", bad, text)
    return bad
