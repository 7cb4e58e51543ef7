"""Input geometry (runtime/geometry.py): tile boxes, letterbox, valid cells, crop, stitching, exclude."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.core.scorer import upsample_map
from musc_edge.runtime.geometry import (InputGeometry, TileSpec, View, full_map, image_views, letterbox, parse_tiles,
                                        same_image_exclude, stitch, tile_boxes, valid_cells, view_map)


@pytest.mark.parametrize("text, spec", [("2x2", TileSpec(2, 2, 0.0)), ("1x3:0.25", TileSpec(1, 3, 0.25)),
                                        (" 3X2 : .5 ", TileSpec(3, 2, 0.5)), ("1x1", TileSpec(1, 1, 0.0))])
def test_parse_tiles(text, spec):
    assert parse_tiles(text) == spec


@pytest.mark.parametrize("text, needle", [("2", "RxC"), ("2x", "RxC"), ("axb", "RxC"), ("2x2:-0.1", "RxC"),
                                          ("0x2", "R, C >= 1"), ("40x40", "1..1024"), ("2x2:0.6", "0 to 0.5"),
                                          ("2x2:10", "0 to 0.5")])
def test_parse_tiles_refuses_bad_values_in_one_line(text, needle):
    with pytest.raises(InputError) as e:
        parse_tiles(text)
    assert needle in str(e.value) and "--tiles" in str(e.value) and "\n" not in str(e.value)


def test_tile_spec_str_round_trips():
    for text in ("2x3", "2x2:0.1"):
        assert str(parse_tiles(text)) == text


@pytest.mark.parametrize("h, w, rows, cols, overlap", [(100, 100, 2, 2, 0.0), (101, 77, 2, 3, 0.0),
                                                       (97, 131, 3, 4, 0.2), (64, 64, 2, 2, 0.5),
                                                       (5, 7, 5, 7, 0.0), (480, 640, 1, 2, 0.1)])
def test_tile_boxes_cover_the_image_with_equal_tiles(h, w, rows, cols, overlap):
    boxes = tile_boxes(h, w, TileSpec(rows, cols, overlap))
    assert len(boxes) == rows * cols
    sizes = {(y1 - y0, x1 - x0) for y0, y1, x0, x1 in boxes}
    assert len(sizes) == 1  # one resize factor for every tile
    (th, tw), = sizes
    cover = np.zeros((h, w), int)
    for y0, y1, x0, x1 in boxes:
        assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
        cover[y0:y1, x0:x1] += 1
    assert cover.min() >= 1
    assert boxes[0][:1] == (0,) and boxes[0][2] == 0 and boxes[-1][1] == h and boxes[-1][3] == w
    # row-major; neighbours overlap by at least the fraction asked for (a little more when sizes do not divide)
    ys = sorted({b[0] for b in boxes})
    xs = sorted({b[2] for b in boxes})
    assert len(ys) == rows and len(xs) == cols
    for starts, side in ((ys, th), (xs, tw)):
        for a, b in zip(starts, starts[1:]):
            assert side - (b - a) >= int(overlap * side) - 1


def test_tile_boxes_without_overlap_divide_evenly():
    assert tile_boxes(100, 60, TileSpec(2, 3)) == [(0, 50, 0, 20), (0, 50, 20, 40), (0, 50, 40, 60),
                                                   (50, 100, 0, 20), (50, 100, 20, 40), (50, 100, 40, 60)]
    # 101 rows in 2 tiles: 51 each, the second from 50: one row of overlap
    assert [b[:2] for b in tile_boxes(101, 10, TileSpec(2, 1))] == [(0, 51), (50, 101)]


def test_tile_boxes_refuse_an_image_smaller_than_the_tiling():
    with pytest.raises(ImageDecodeError, match="cannot be cut into 4x4 tiles"):
        tile_boxes(3, 10, TileSpec(4, 4))


@pytest.mark.parametrize("h, w, box", [(100, 100, (0, 64, 0, 64)), (50, 100, (16, 48, 0, 64)),
                                       (100, 25, (0, 64, 24, 40)), (1, 1000, (31, 32, 0, 64))])
def test_letterbox_keeps_the_aspect_centred(h, w, box):
    assert letterbox(h, w, 64) == box


def test_image_views():
    assert image_views(40, 80, 64) == [View(box=(0, 40, 0, 80), valid=(0, 64, 0, 64))]
    assert image_views(40, 80, 64, InputGeometry("pad")) == [View(box=(0, 40, 0, 80), valid=(16, 48, 0, 64))]
    views = image_views(40, 80, 64, InputGeometry("pad", TileSpec(1, 2)))
    assert [v.box for v in views] == [(0, 40, 0, 40), (0, 40, 40, 80)] and {v.valid for v in views} == {(0, 64, 0, 64)}
    with pytest.raises(InputError, match="--resize"):
        InputGeometry("crop")


def test_valid_cells_mark_the_cells_of_the_image_not_the_pad():
    # S = 64, G = 8: input pixel p is at grid coordinate p / 9; rows 16..47 span grid 1.78 .. 5.22
    cells = valid_cells((16, 48, 0, 64), 64, 8)
    assert cells.shape == (8, 8)
    assert cells[:, 0].tolist() == [False, False, True, True, True, True, False, False]
    assert cells.all(axis=0).sum() == 0 and cells.any(axis=0).all()  # every column, rows 2..5 only
    assert valid_cells((0, 64, 0, 64), 64, 8).all()


def test_view_map_of_a_squashed_view_is_upsample_map():
    m = np.random.default_rng(0).random((8, 8))
    assert np.array_equal(view_map(m, (0, 64, 0, 64), 64, (37, 91)), upsample_map(m, (37, 91)))


def test_view_map_crops_the_padding_before_upsampling():
    """A map linear in the input's pixel coordinates, read back over the valid box only."""
    size, g = 64, 8
    step = (size - 1) / (g - 1)  # input pixel of grid coordinate a (align_corners)
    a = np.arange(g) * step
    grid = 0.01 * a[:, None] + 0.001 * a[None, :]  # value = 0.01 * y + 0.001 * x, in input pixels
    valid = (16, 48, 4, 60)
    out = view_map(grid, valid, size, (50, 70))
    ys = np.linspace(valid[0], valid[1] - 1, 50)
    xs = np.linspace(valid[2], valid[3] - 1, 70)
    assert np.allclose(out, 0.01 * ys[:, None] + 0.001 * xs[None, :], atol=1e-5)
    # pad cells with huge values do not leak into the crop (only cells next to the valid box are read)
    spiked = grid.copy()
    spiked[0, :] = spiked[-1, :] = 1e6
    assert np.allclose(view_map(spiked, valid, size, (50, 70)), out)


def test_tiles_stitch_back_exactly():
    """Each tile's map is a known (linear) function of the image position at its grid cells: the
    stitched map is that function at every pixel, overlaps included (bilinear reproduces it)."""
    h, w, size, g = 97, 131, 64, 8
    f = lambda y, x: 0.3 + 0.002 * y - 0.001 * x  # noqa: E731
    views = image_views(h, w, size, InputGeometry(tiles=TileSpec(3, 4, 0.25)))
    maps = []
    for v in views:
        y0, y1, x0, x1 = v.box
        ys = y0 + np.arange(g) * (y1 - y0 - 1) / (g - 1)  # tile pixel of each grid row (align_corners)
        xs = x0 + np.arange(g) * (x1 - x0 - 1) / (g - 1)
        maps.append(f(ys[:, None], xs[None, :]))
    full = full_map(np.array(maps), views, size, (h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    assert full.shape == (h, w) and full.dtype == np.float32
    assert np.allclose(full, f(yy, xx), atol=1e-5)


def test_stitch_averages_overlaps():
    boxes = [(0, 6, 0, 6), (0, 6, 4, 10)]
    out = stitch([np.full((6, 6), 1.0), np.full((6, 6), 3.0)], boxes, (6, 10))
    assert np.array_equal(out[:, :4], np.full((6, 4), 1.0))
    assert np.array_equal(out[:, 4:6], np.full((6, 2), 2.0))  # the mean of both tiles
    assert np.array_equal(out[:, 6:], np.full((6, 4), 3.0))
    with pytest.raises(InputError, match="do not cover"):
        stitch([np.ones((6, 6))], [(0, 6, 0, 6)], (6, 10))
    with pytest.raises(InputError, match="does not fit"):
        stitch([np.ones((5, 6))], [(0, 6, 0, 6)], (6, 6))


def test_same_image_exclude():
    e = same_image_exclude(3, 2)
    assert e.shape == (6, 6) and e.dtype == np.bool_
    expected = np.zeros((6, 6), bool)
    for i in range(3):
        expected[2 * i, 2 * i + 1] = expected[2 * i + 1, 2 * i] = True
    assert np.array_equal(e, expected)
    assert not same_image_exclude(4, 1).any()
