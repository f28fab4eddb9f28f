"""Overlay pictures: the mask outline is visible on any background, the caption scales and wraps."""

import numpy as np
from flowseg.utils.visualize import (
    OUTLINE_COLOR,
    PRED_COLOR,
    caption_font_size,
    draw_outline,
    draw_referring_overlay,
    hatch_fill,
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


def test_striped_fill_shows_on_an_object_of_its_own_colour():
    for color in (PRED_COLOR, (1.0, 1.0, 1.0)):
        obj = np.zeros((96, 96, 3), np.uint8)
        obj[:] = np.round(np.asarray(color) * 255).astype(np.uint8)
        mask = _square(96, 16, 80).astype(bool)
        out = hatch_fill(obj, mask, PRED_COLOR)
        changed = (np.abs(out.astype(int) - obj).max(axis=-1) > 40) & mask
        assert 0.3 < changed.sum() / mask.sum() < 0.7  # one stripe colour differs from the object
        assert (out[~mask] == obj[~mask]).all()
