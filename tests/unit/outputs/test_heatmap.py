"""Heatmaps an operator can read: the panel's parts, the threshold contour, the colour scale."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from musc_edge.core.errors import InputError  # noqa: E402
from musc_edge.outputs.heatmap import (colour_range, display_size, heatmap_overlay, heatmap_panel,  # noqa: E402
                                       panel_layout, verdict)

BACKGROUND = np.array([32, 32, 32], np.uint8)


def grey_image(h: int, w: int) -> np.ndarray:
    """A flat mid-grey part: neither it nor any JET blend over it is ever pure white."""
    return np.full((h, w, 3), 128, np.uint8)


def cone(h: int, w: int, cy: float, cx: float, radius: float) -> np.ndarray:
    """A map that falls linearly from 1 at (cy, cx) to 0 at ``radius``: level t lies at radius (1 - t) * radius."""
    yy, xx = np.mgrid[:h, :w]
    return np.clip(1.0 - np.hypot(yy - cy, xx - cx) / radius, 0.0, 1.0).astype(np.float32)


def white(region: np.ndarray) -> np.ndarray:
    return np.all(region == 255, axis=2)


def test_panel_size_and_layout_follow_the_image():
    h, w = 60, 80
    panel = heatmap_panel(grey_image(h, w), cone(h, w, 30, 40, 30), 0.0, 1.0)
    lay = panel_layout(h, w)
    assert panel.shape == (lay.height, lay.width, 3) and panel.dtype == np.uint8
    dh, dw = display_size(h, w)
    assert dh >= 320 and dw == round(w * dh / h)  # a small part is enlarged, its aspect kept
    assert (lay.original.w, lay.original.h) == (lay.overlay.w, lay.overlay.h) == (dw, dh)
    assert lay.original.x + dw < lay.overlay.x and lay.overlay.x + dw < lay.bar.x  # side by side, then the bar
    assert lay.header.y + lay.header.h <= lay.original.y and lay.bar.h == dh
    # a large image is reduced, never wider than the panel allows
    big = display_size(3000, 4000)
    assert big[0] <= 720 and big[1] <= 900


def test_original_is_shown_beside_the_overlay():
    h, w = 40, 40
    image = grey_image(h, w)
    image[:, :20] = (200, 40, 40)  # left half red (RGB)
    panel = heatmap_panel(image, np.zeros((h, w), np.float32), 0.0, 1.0)
    lay = panel_layout(h, w)
    original = lay.original.of(panel)
    assert tuple(original[5, 5]) == (40, 40, 200)  # BGR of the red half, untouched by colour
    assert tuple(original[5, -5]) == (128, 128, 128)
    overlay = lay.overlay.of(panel).astype(int)
    assert overlay[5, -5, 0] > overlay[5, -5, 2]  # a zero map is blue over the grey half


def test_header_holds_text_and_the_verdict_in_its_colour():
    h, w = 50, 50
    amap = cone(h, w, 25, 25, 25)
    lay = panel_layout(h, w)
    for raw, colour_channel in ((0.95, 2), (0.40, 1)):  # anomalous is red (BGR channel 2), good green
        panel = heatmap_panel(grey_image(h, w), amap, 0.0, 1.0, title="part_7.png", raw_score=raw,
                              image_score=0.5, threshold=0.6)
        for line in lay.lines[:2] + lay.lines[3:]:  # name, scores, scale: text drawn on the background
            assert np.any(np.any(line.of(panel) != BACKGROUND, axis=2))
        verdict_line = line_pixels(panel, lay.lines[2])
        assert len(verdict_line) and np.all(verdict_line.argmax(axis=1) == colour_channel)
    no_threshold = line_pixels(heatmap_panel(grey_image(h, w), amap, 0.0, 1.0), lay.lines[2])
    assert len(no_threshold) and np.ptp(no_threshold, axis=1).max() < 20  # no verdict: grey text


def line_pixels(panel: np.ndarray, box) -> np.ndarray:
    """The strongly coloured (text) pixels of one header line, (n, 3) BGR."""
    px = box.of(panel).reshape(-1, 3).astype(int)
    return px[np.abs(px - BACKGROUND.astype(int)).max(axis=1) > 80]


def test_colour_bar_runs_from_red_at_the_top_to_blue_and_marks_the_threshold():
    h, w = 64, 64
    lay = panel_layout(h, w)
    args = (grey_image(h, w), cone(h, w, 32, 32, 32), 0.0, 1.0)
    plain, marked = heatmap_panel(*args), heatmap_panel(*args, threshold=0.25)
    bar = lay.bar.of(plain).astype(int)
    top, bottom = bar[0, lay.bar.w // 2], bar[-1, lay.bar.w // 2]
    assert top[2] > 100 and top[0] < 50 and bottom[0] > 100 and bottom[2] < 50
    # the bar's values are written beside it
    assert np.any(np.any(lay.bar_labels.of(plain) != BACKGROUND, axis=2))
    # the threshold mark: a white line across the bar at 3/4 of its height (0.25 on 0..1, top = 1)
    row = lay.bar.h - 1 - round(0.25 * (lay.bar.h - 1))
    marked_bar = lay.bar.of(marked)
    assert white(marked_bar[row - 1: row + 2]).all(axis=1).any()
    assert not white(lay.bar.of(plain)).any()


def test_contour_is_drawn_at_the_threshold_level():
    h, w, radius = 80, 80, 40.0
    amap = cone(h, w, 40, 40, radius)
    threshold = 0.5  # the level set is the circle of radius (1 - 0.5) * 40 = 20 around the centre
    lay = panel_layout(h, w)
    scale = lay.overlay.h / h
    for box in (lay.overlay, lay.original):
        region = box.of(heatmap_panel(grey_image(h, w), amap, 0.0, 1.0, threshold=threshold))
        ys, xs = np.nonzero(white(region))
        assert len(ys) > 100
        # display pixel (x, y) shows map position ((x + 0.5) / scale - 0.5), OpenCV's resize rule
        dist = np.hypot((ys + 0.5) / scale - 0.5 - 40, (xs + 0.5) / scale - 0.5 - 40)
        assert np.all(np.abs(dist - 20.0) < 1.5), (dist.min(), dist.max())
    no_contour = heatmap_panel(grey_image(h, w), amap, 0.0, 1.0)
    assert not white(lay.overlay.of(no_contour)).any() and not white(lay.original.of(no_contour)).any()


def test_overlay_keeps_its_signature_and_size_and_takes_a_threshold():
    h, w = 30, 50
    image, amap = grey_image(h, w), cone(h, w, 15, 25, 20)
    plain = heatmap_overlay(image, amap, 0.0, 1.0)  # positional, as the watch daemon calls it
    assert plain.shape == (h, w, 3) and plain.dtype == np.uint8 and not white(plain).any()
    assert white(heatmap_overlay(image, amap, 0.0, 1.0, 0.5, threshold=0.5)).any()
    with pytest.raises(InputError, match="does not fit"):
        heatmap_overlay(image, amap[:, :10], 0.0, 1.0)


def test_fixed_scale_gives_the_same_colour_to_the_same_value_in_every_run():
    h, w = 20, 20
    image = grey_image(h, w)
    low_run, high_run = np.full((h, w), 0.6, np.float32), np.full((h, w), 0.6, np.float32)
    low_run[0, 0], high_run[0, 0] = 0.5, 1.2  # two runs with different map ranges
    fixed = (0.0, 1.0)
    a = heatmap_overlay(image, low_run, *colour_range(low_run, fixed))
    b = heatmap_overlay(image, high_run, *colour_range(high_run, fixed))
    assert np.array_equal(a[5, 5], b[5, 5])
    a_run = heatmap_overlay(image, low_run, *colour_range(low_run))  # "run": each its own range
    b_run = heatmap_overlay(image, high_run, *colour_range(high_run))
    assert not np.array_equal(a_run[5, 5], b_run[5, 5])


def test_colour_range_and_verdict():
    maps = np.array([[[0.2, 0.4]], [[0.3, 0.9]]])
    assert colour_range(maps) == (0.2, 0.9) == colour_range(list(maps), "run")
    assert colour_range(maps, (0.5, 1.5)) == (0.5, 1.5)
    for bad in ((1.0, 1.0), (2.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(InputError, match="LO < HI"):
            colour_range(maps, bad)
    with pytest.raises(InputError, match="'run' or a pair"):
        colour_range(maps, "auto")
    assert verdict(0.9, 0.9) == "anomalous" and verdict(0.89, 0.9) == "good" and verdict(0.9, None) is None


def test_non_ascii_names_are_written_as_escapes_not_question_marks():
    from musc_edge.outputs.heatmap import _ascii, _fit

    assert _ascii("部品_1.png") == "\\u90e8\\u54c1_1.png"
    long = "line1/" + "x" * 300 + "/part_9.png"
    cut = _fit(long, 300)
    assert cut.startswith("line1/") and cut.endswith("part_9.png") and "..." in cut
