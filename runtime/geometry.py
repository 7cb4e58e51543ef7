"""Input geometry: how an image becomes model inputs, and how their maps become one map again.

MuSc squashes every image to the model's square S x S (MUSC_SPEC 1; MUSC_SPEC 8 lists it among
the released code's shortcomings). Two alternatives, both pure functions here (numpy only, no
OpenCV), used by :mod:`musc_edge.runtime.preprocess` (cutting and resizing) and
:mod:`musc_edge.score.geometry` (scoring, stitching):

* ``resize="pad"`` (letterbox): the image is scaled to fit S x S with its aspect ratio kept and
  centred; the rest of the square is the normalisation mean, i.e. zero after normalising. The
  *valid* box records where the image is, so its pad cells can be left out of the image score and
  the map cropped to the image before it is upsampled to the original size.
* ``tiles RxC[:overlap]``: the image is cut into R x C equal tiles that together cover it (tiles
  overlap by at least the fraction ``overlap`` of a tile's side; non-divisible sizes overlap a
  little more), and each tile is resized to S x S (squashed or padded as above; a tile smaller
  than S is enlarged). Each tile's map is upsampled to the tile's pixel size and placed; where tiles
  overlap, their maps are averaged (:func:`stitch`).

Coordinates: a box is ``(y0, y1, x0, x1)``, half-open, in pixels. A G x G map over the S x S input
follows MUSC_SPEC 4's convention (bilinear, align_corners=True): input pixel p lies at grid
coordinate ``p * (G - 1) / (S - 1)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.core.scorer import linear_weights, upsample_map

#: ``--resize`` values: ``squash`` (MUSC_SPEC 1, the default) or ``pad`` (aspect kept).
RESIZE_MODES = ("squash", "pad")

#: Largest tile overlap, as a fraction of a tile's side: at 0.5 every pixel is in up to 4 tiles.
MAX_OVERLAP = 0.5

#: ``(y0, y1, x0, x1)``, half-open pixel box.
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class TileSpec:
    """R x C tiles overlapping by at least ``overlap`` of a tile's side (0 <= overlap <= 0.5)."""

    rows: int = 1
    cols: int = 1
    overlap: float = 0.0

    @property
    def count(self) -> int:
        return self.rows * self.cols

    def __str__(self) -> str:
        return f"{self.rows}x{self.cols}" + (f":{self.overlap:g}" if self.overlap else "")


def parse_tiles(text: str) -> TileSpec:
    """``--tiles``: ``RxC`` or ``RxC:F`` (F the overlap as a fraction of a tile's side, 0..0.5)."""
    usage = "--tiles expects RxC or RxC:OVERLAP (rows x columns, overlap a fraction 0..0.5 of a tile), e.g. 2x2:0.1"
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*(?::\s*([0-9]*\.?[0-9]+)\s*)?", str(text))
    if not m:
        raise InputError(f"{usage}; got {text!r}")
    rows, cols = int(m.group(1)), int(m.group(2))
    overlap = float(m.group(3)) if m.group(3) is not None else 0.0
    if rows < 1 or cols < 1 or rows * cols > 1024:
        raise InputError(f"--tiles needs 1..1024 tiles with R, C >= 1, got {text!r}")
    if not 0.0 <= overlap <= MAX_OVERLAP:
        raise InputError(f"--tiles overlap is a fraction of a tile's side from 0 to {MAX_OVERLAP}, got {text!r}")
    return TileSpec(rows, cols, overlap)


@dataclass(frozen=True)
class InputGeometry:
    """How each image becomes model inputs: ``resize`` (squash | pad) and ``tiles``."""

    resize: str = "squash"
    tiles: TileSpec = TileSpec()

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise InputError(f"--resize expects one of {', '.join(RESIZE_MODES)}, got {self.resize!r}")

    @property
    def views_per_image(self) -> int:
        return self.tiles.count

    @property
    def is_default(self) -> bool:
        """MuSc's own geometry: one squashed input per image (MUSC_SPEC 1)."""
        return self.resize == "squash" and self.tiles.count == 1


#: MUSC_SPEC 1's geometry.
SQUASH = InputGeometry()


@dataclass(frozen=True)
class View:
    """One model input cut from an image: ``box`` in the original image, ``valid`` in the S x S input
    (the whole square when squashed, the letterboxed image when padded)."""

    box: Box
    valid: Box

    @property
    def size(self) -> tuple[int, int]:
        """(h, w) of the part of the original image this input shows."""
        return self.box[1] - self.box[0], self.box[3] - self.box[2]


def _starts(length: int, parts: int, overlap: float) -> tuple[int, list[int]]:
    """Tile side and starts along one axis: ``parts`` equal tiles spread evenly from 0 to ``length``."""
    if parts == 1:
        return length, [0]
    side = min(length, math.ceil(length / (1 + (parts - 1) * (1 - overlap))))
    return side, [round(k * (length - side) / (parts - 1)) for k in range(parts)]


def tile_boxes(h: int, w: int, tiles: TileSpec) -> list[Box]:
    """The R x C tile boxes of an h x w image, row-major; together they cover every pixel.

    All tiles have one size (th, tw) = ceil(h / (1 + (R - 1)(1 - overlap))), likewise for w, so
    every tile is resized by the same factor; the first starts at 0, the last ends at the edge,
    the others are spread evenly between, so neighbours overlap by at least ``overlap`` of a tile.
    An image with fewer pixels per side than tiles cannot be cut and is refused
    (:class:`ImageDecodeError`: the run skips it with that reason).
    """
    if h < tiles.rows or w < tiles.cols:
        raise ImageDecodeError(f"an image of {w}x{h} pixels cannot be cut into {tiles.rows}x{tiles.cols} tiles")
    th, ys = _starts(h, tiles.rows, tiles.overlap)
    tw, xs = _starts(w, tiles.cols, tiles.overlap)
    return [(y, y + th, x, x + tw) for y in ys for x in xs]


def letterbox(h: int, w: int, size: int) -> Box:
    """Where an h x w image lands in the S x S input when scaled to fit, aspect kept, centred."""
    scale = size / max(h, w)
    nh, nw = max(1, min(size, round(h * scale))), max(1, min(size, round(w * scale)))
    y0, x0 = (size - nh) // 2, (size - nw) // 2
    return y0, y0 + nh, x0, x0 + nw


def image_views(h: int, w: int, size: int, geometry: InputGeometry = SQUASH) -> list[View]:
    """The model inputs of an h x w image (row-major tiles), each with its valid box."""
    boxes = tile_boxes(h, w, geometry.tiles) if geometry.tiles.count > 1 else [(0, h, 0, w)]
    views = []
    for box in boxes:
        th, tw = box[1] - box[0], box[3] - box[2]
        valid = letterbox(th, tw, size) if geometry.resize == "pad" else (0, size, 0, size)
        views.append(View(box=box, valid=valid))
    return views


def _grid_span(p0: int, p1: int, size: int, grid: int) -> tuple[float, float]:
    """Grid coordinates (align_corners) of the first and last input pixel of ``[p0, p1)``."""
    step = (grid - 1) / (size - 1) if size > 1 else 0.0
    return p0 * step, (p1 - 1) * step


def valid_cells(valid: Box, size: int, grid: int) -> np.ndarray:
    """(G, G) bool: the grid cells nearest to some pixel of the valid box (the cells its map is read from).

    Pad cells (those only next to padding) are False: they get no image score. A cell on the
    border of the image and the pad is True: its features mix both, and the cropped map uses it.
    """
    cells = np.arange(grid)
    ys, ye = _grid_span(valid[0], valid[1], size, grid)
    xs, xe = _grid_span(valid[2], valid[3], size, grid)
    rows = (cells >= ys - 0.5) & (cells <= ye + 0.5)
    cols = (cells >= xs - 0.5) & (cells <= xe + 0.5)
    return rows[:, None] & cols[None, :]


def _interp(n_in: int, n_out: int, start: float, stop: float) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights sampling positions start..stop (inclusive, evenly)."""
    src = np.full(n_out, float(start)) if n_out == 1 else np.linspace(start, stop, n_out)
    return linear_weights(np.clip(src, 0.0, n_in - 1), n_in)


def view_map(grid_map: np.ndarray, valid: Box, size: int, out_hw: tuple[int, int]) -> np.ndarray:
    """A view's G x G map at the pixel size ``out_hw`` of the part of the image it shows, float32.

    Squashed (``valid`` the whole square): exactly :func:`musc_edge.core.scorer.upsample_map`
    (MUSC_SPEC 4). Padded: the map is cropped to the valid box and only that is stretched to
    ``out_hw``, in one bilinear pass: the first and last pixel of the output sample the valid
    box's first and last input pixel (align_corners, as MUSC_SPEC 4), the padding never.
    """
    m = np.asarray(grid_map)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise InputError(f"a view map must be (G, G), got shape {m.shape}")
    if tuple(valid) == (0, size, 0, size):
        return np.asarray(upsample_map(m, out_hw), dtype=np.float32)
    g = m.shape[0]
    h, w = (int(v) for v in out_hw)
    ry = _interp(g, h, *_grid_span(valid[0], valid[1], size, g)).astype(np.float32)
    rx = _interp(g, w, *_grid_span(valid[2], valid[3], size, g)).astype(np.float32)
    return ry @ m.astype(np.float32) @ rx.T


def stitch(parts: Sequence[np.ndarray], boxes: Sequence[Box], hw: tuple[int, int]) -> np.ndarray:
    """One (h, w) float32 map from per-tile maps placed at their boxes; overlaps are averaged."""
    h, w = (int(v) for v in hw)
    if len(parts) != len(boxes):
        raise InputError(f"stitch needs one map per box, got {len(parts)} maps and {len(boxes)} boxes")
    for part, (y0, y1, x0, x1) in zip(parts, boxes):
        if np.shape(part) != (y1 - y0, x1 - x0):
            raise InputError(f"a tile map of shape {np.shape(part)} does not fit its box {(y0, y1, x0, x1)}")
    if len(parts) == 1 and tuple(boxes[0]) == (0, h, 0, w):
        return np.asarray(parts[0], dtype=np.float32)
    total = np.zeros((h, w), np.float64)
    count = np.zeros((h, w), np.int32)
    for part, (y0, y1, x0, x1) in zip(parts, boxes):
        total[y0:y1, x0:x1] += part
        count[y0:y1, x0:x1] += 1
    if (count == 0).any():
        raise InputError(f"the tiles do not cover the {w}x{h} image")
    return (total / count).astype(np.float32)


def full_map(view_maps: np.ndarray, views: Sequence[View], size: int, hw: tuple[int, int]) -> np.ndarray:
    """An image's map at its original size (h, w) from its views' (V, G, G) maps (MUSC_SPEC 4)."""
    if len(view_maps) != len(views):
        raise InputError(f"{len(view_maps)} view maps for {len(views)} views")
    parts = [view_map(m, v.valid, size, v.size) for m, v in zip(view_maps, views)]
    return stitch(parts, [v.box for v in views], hw)


def same_image_exclude(n_images: int, per_image: int) -> np.ndarray:
    """(N*V, N*V) bool for ``score_tokens(exclude=...)``: the tiles of one image do not score each other.

    Inputs are image-major (image i's tiles are i*V .. i*V + V - 1). With ``--tile-match any`` a
    tile is scored against every tile of the *other* images, as MuSc scores an image only against
    the others (MUSC_SPEC 3): overlapping tiles share pixels, so a defect in the overlap would
    otherwise find itself and score low.
    """
    owner = np.repeat(np.arange(n_images), per_image)
    exclude = owner[:, None] == owner[None, :]
    np.fill_diagonal(exclude, False)
    return exclude
