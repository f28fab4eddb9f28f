"""Overlay pictures: the mask outline is visible on any background, the caption scales and wraps;
several expressions in their own colours with a legend; text in any script."""

import logging

import numpy as np
from flowseg.utils.fonts import uncovered_characters
from flowseg.utils.visualize import (
    OUTLINE_COLOR,
    PRED_COLOR,
    ExpressionResult,
    auto_scale,
    caption_font_size,
    draw_expressions_overlay,
    draw_legend,
    draw_outline,
    draw_referring_overlay,
    expression_color,
    hatch_fill,
    legend_text,
    outline_width,
    wrap_caption,
)
from scipy import ndimage


def _square(size: int, lo: int, hi: int) -> np.ndarray:
    m = np.zeros((size, size), np.uint8)
    m[lo:hi, lo:hi] = 1
    return m


def test_outline_on_same_colour_background():
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[:] = (26, 115, 255)  # the prediction's own fill colour
    mask = _square(64, 16, 48)
    out = draw_outline(blue, mask, thickness=2)
    ring = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool))
    assert (out[ring] == OUTLINE_COLOR).all()
    # far from the boundary nothing changes
    far = ndimage.distance_transform_edt(~ring) > 5
    assert (out[far] == blue[far]).all()
    assert (blue == (26, 115, 255)).all()  # input untouched


def test_overlay_outline_visible_and_caption_scales():
    rng = np.random.default_rng(0)
    for size in (96, 384):
        img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        mask = _square(size, size // 4, size // 2)
        out = draw_referring_overlay(img, "the leftmost star", mask, mask, score=0.5, iou=1.0)
        body = out[:size]
        yellow = (body == OUTLINE_COLOR).all(axis=-1)
        ring = mask.astype(bool) & ~ndimage.binary_erosion(mask.astype(bool))
        # both panels carry the outline on the mask boundary
        for panel in (yellow[:, :size], yellow[:, size:]):
            assert panel[ring].mean() > 0.9
        if size == 96:
            small_caption = out.shape[0] - size
        else:
            assert out.shape[0] - size > small_caption
    assert outline_width(1024, 1024) > outline_width(128, 128)
    assert caption_font_size(1024, 768) > caption_font_size(128, 128)


def test_caption_wraps_long_expressions():
    text = "the small purple hexagon to the right of the large yellow circle near the bottom"
    lines = wrap_caption([text, "score 0.50"], width=200, font=10.0)
    assert len(lines) > 2 and " ".join(lines[:-1]) == text
    assert all(len(line) <= int((200 - 8) / 7.5) for line in lines)


def test_panel_names_are_below_the_picture_never_on_it():
    white = np.full((128, 128, 3), 255, np.uint8)
    for scale in (1.0, 3.0):
        out = draw_referring_overlay(
            white, "x", np.zeros((128, 128), np.uint8), white[..., 0] * 0, scale=scale
        )
        size = int(128 * scale)
        assert (out[:size] == 255).all()  # no label over either panel
        caption = out[size:]
        dark_rows = (caption.max(axis=-1) < 100).any(axis=1)
        assert dark_rows.sum() > 3 * caption_font_size(128, 128) * scale  # expression + panel key


def _two_objects():
    img = np.full((128, 128, 3), 90, np.uint8)
    m1 = np.zeros((128, 128), bool)
    m1[16:56, 16:56] = True
    m2 = np.zeros((128, 128), bool)
    m2[72:120, 64:120] = True
    return img, m1, m2


def test_two_expressions_two_colours_and_a_legend_below():
    img, m1, m2 = _two_objects()
    results = [
        ExpressionResult("the purple star", m1, 0.99),
        ExpressionResult("the yellow square", m2, 0.87),
        ExpressionResult("the unicorn", np.zeros_like(m1), 0.2, no_target=True),
    ]
    pic = draw_expressions_overlay(img, results)
    assert pic.shape[1] == 640 and pic.shape[0] > 640  # 128 px enlarged to 640, legend below
    c1, c2 = (np.array(expression_color(i), float) for i in (0, 1))
    assert np.abs(c1 - c2).max() > 100
    s = 5  # drawing scale
    inside1 = pic[s * 36, s * 36].astype(float)  # mask centres, far from the outlines
    inside2 = pic[s * 96, s * 92].astype(float)
    assert np.abs(inside1 - (0.5 * 90 + 0.5 * c1)).max() <= 1
    assert np.abs(inside2 - (0.5 * 90 + 0.5 * c2)).max() <= 1
    assert (pic[s * 64, s * 8] == 90).all()  # outside both masks: the image itself
    legend = pic[640:].reshape(-1, 3).astype(int)
    for c in (c1, c2, np.array(expression_color(2))):
        assert (np.abs(legend - c).max(axis=1) == 0).sum() > 100  # each colour's swatch
    assert legend_text(2, results[2]).endswith("no target")
    assert legend_text(0, results[0]).endswith("score 0.99")


def test_scale_follows_the_picture():
    assert auto_scale(128, 96) == 5.0
    assert auto_scale(2000, 3000) == 1.0
    big = draw_expressions_overlay(
        np.zeros((1000, 1500, 3), np.uint8), [ExpressionResult("a", np.ones((1000, 1500), bool), 0.5)]
    )
    assert big.shape[1] == 1500  # large pictures keep their size; the legend font grows with them


def _text_pixels(text: str) -> np.ndarray:
    strip = draw_legend([ExpressionResult(text, np.zeros((4, 4), bool), no_target=True)], 800, 24.0)
    assert strip.shape[0] < 60  # one line
    return strip[:, 60:100] < 128  # dark pixels of the first characters right of the swatch and "1. "


def test_chinese_and_emoji_are_drawn_not_missing_glyph_boxes():
    # A font without the glyph draws the same box for every such character, so real glyphs
    # differ from each other and from the box of a character no font has (private use).
    texts = ["黄", "色", "🦄", "🐙", "\ue000"]
    assert uncovered_characters("".join(texts)) == "\ue000"
    drawn = [_text_pixels(t) for t in texts]
    for i in range(len(texts)):
        assert drawn[i].sum() > 30, texts[i]
        for j in range(i):
            assert (drawn[i] != drawn[j]).sum() > 30, (texts[i], texts[j])


def test_without_the_font_packages_a_warning_names_them(monkeypatch, caplog):
    from flowseg.utils import fonts

    monkeypatch.setattr(fonts, "FONT_PACKAGES", ("flowseg_no_such_font_package",))
    fonts._package_fonts.cache_clear()
    fonts._charmaps.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=fonts.__name__):
            assert fonts.unicode_font_families() == ["DejaVu Sans"]
        assert "pip install flowseg-no-such-font-package" in caplog.text
        assert fonts.uncovered_characters("黄a") == "黄"
    finally:
        fonts._package_fonts.cache_clear()
        fonts._charmaps.cache_clear()


def test_striped_fill_shows_on_an_object_of_its_own_colour():
    for color in (PRED_COLOR, (1.0, 1.0, 1.0)):
        obj = np.zeros((96, 96, 3), np.uint8)
        obj[:] = np.round(np.asarray(color) * 255).astype(np.uint8)
        mask = _square(96, 16, 80).astype(bool)
        out = hatch_fill(obj, mask, PRED_COLOR)
        changed = (np.abs(out.astype(int) - obj).max(axis=-1) > 40) & mask
        assert 0.3 < changed.sum() / mask.sum() < 0.7  # one stripe colour differs from the object
        assert (out[~mask] == obj[~mask]).all()
