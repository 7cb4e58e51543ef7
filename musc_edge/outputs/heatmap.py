"""Heatmaps: a MuSc anomaly map in colour over the image it was computed from (OpenCV only).

Two outputs, for two readers:

- :func:`heatmap_overlay`: the map blended over the image at the image's own size, pixel-aligned
  with it, for tools (and the watch daemon); with ``threshold`` the contour of the region at or
  above it is drawn.
- :func:`heatmap_panel`: for a person. A header with the name, the raw and image scores and the
  verdict; the original and the overlay side by side, both with the threshold contour; a colour
  bar with its values (and the threshold marked) beside them.

The colour scale is JET from ``vmin`` (blue) to ``vmax`` (red); values outside are clipped.
:func:`colour_range` picks it: ``"run"`` spans the maps being drawn (comparable within one run
only), a fixed ``(lo, hi)`` is comparable across runs, days and lines. The map values are MSM
scores, distances between unit vectors (MUSC_SPEC 2-3), so they lie in [0, 2]; the raw image score
is the map's maximum (MUSC_SPEC 4), which is why the verdict and the contour agree: an image is
``anomalous`` (raw score >= threshold, as ``watch --threshold`` decides) exactly when some part of
its map reaches the threshold, and the contour encloses that part.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import cv2
import numpy as np

from musc_edge.core.errors import InputError

#: Scale names :func:`colour_range` accepts besides a fixed (lo, hi).
RUN_SCALE = "run"

_FONT = cv2.FONT_HERSHEY_SIMPLEX  # Hershey fonts are ASCII only: names are written with escapes
_FONT_SCALE = 0.5
_PAD = 10
_BAR_W = 18
_BAR_LABEL_W = 78  #: room right of the colour bar for its values ("T 0.000" and "0.0000")
_MIN_PANEL_W = 680  #: the header's four lines fit at this width
_BACKGROUND = (32, 32, 32)  # BGR, like everything OpenCV writes
_TEXT = (235, 235, 235)
_MUTED = (170, 170, 170)
_ANOMALOUS = (60, 60, 240)
_GOOD = (90, 200, 90)
_CONTOUR = (255, 255, 255)  #: white over a black rim: visible on red, on blue and on the image
_CONTOUR_RIM = (0, 0, 0)


def verdict(raw_score: float, threshold: float | None) -> str | None:
    """``anomalous`` when the raw score reaches the threshold, else ``good``; None without one.

    On the raw score, as ``watch --threshold`` decides (docs/watch.md): RsCIN's image score is
    min-max normalised within its pool (MUSC_SPEC 5), so no fixed threshold applies to it.
    """
    if threshold is None:
        return None
    return "anomalous" if float(raw_score) >= float(threshold) else "good"


def colour_range(maps: np.ndarray | Iterable[np.ndarray], scale: str | tuple[float, float] = RUN_SCALE
                 ) -> tuple[float, float]:
    """(vmin, vmax) of the colour scale: the maps' own range for ``"run"``, else the fixed pair."""
    if isinstance(scale, str):
        if scale != RUN_SCALE:
            raise InputError(f"heatmap scale must be {RUN_SCALE!r} or a pair LO,HI of numbers, got {scale!r}")
        arrays = [np.asarray(m) for m in ([maps] if isinstance(maps, np.ndarray) else maps)]
        if not arrays:
            raise InputError("no maps to take the heatmap colour range from")
        return float(min(a.min() for a in arrays)), float(max(a.max() for a in arrays))
    lo, hi = (float(v) for v in scale)
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"a fixed heatmap scale needs finite LO < HI, got {lo}, {hi}")
    return lo, hi


def colourise(amap: np.ndarray, vmin: float, vmax: float) -> np.ndarray:
    """The map in JET colours (BGR uint8), ``vmin`` blue, ``vmax`` red, clipped outside."""
    span = float(vmax) - float(vmin)
    norm = (np.asarray(amap, np.float64) - vmin) / span if span > 0 else np.zeros(np.shape(amap))
    gray = np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8)
    return cv2.applyColorMap(gray, cv2.COLORMAP_JET)


def heatmap_overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                    alpha: float = 0.5, *, threshold: float | None = None) -> np.ndarray:
    """The map in colour blended over the image at its size; BGR uint8 for write_png.

    ``vmin``/``vmax`` fix the colour scale, so overlays drawn with the same pair compare.
    ``threshold`` (optional) draws the contour of where the map reaches it.
    """
    _check_fits(image_rgb, amap)
    base = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    out = cv2.addWeighted(colourise(amap, vmin, vmax), float(alpha), base, 1.0 - float(alpha), 0.0)
    if threshold is not None:
        draw_contour(out, amap, threshold, thickness=max(1, round(min(amap.shape) / 200)))
    return out


def draw_contour(canvas_bgr: np.ndarray, amap: np.ndarray, threshold: float, thickness: int = 2) -> None:
    """Draw, in place, the outline of ``amap >= threshold`` (same height and width as the canvas)."""
    mask = (np.asarray(amap) >= float(threshold)).astype(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if contours:
        cv2.drawContours(canvas_bgr, contours, -1, _CONTOUR_RIM, thickness + 2, cv2.LINE_AA)
        cv2.drawContours(canvas_bgr, contours, -1, _CONTOUR, thickness, cv2.LINE_8)  # crisp, exactly white


@dataclass(frozen=True)
class Box:
    """A rectangle of the panel: x, y of its top-left corner, width and height, in pixels."""

    x: int
    y: int
    w: int
    h: int

    def of(self, image: np.ndarray) -> np.ndarray:
        """The part of ``image`` this box covers (a view)."""
        return image[self.y:self.y + self.h, self.x:self.x + self.w]


@dataclass(frozen=True)
class PanelLayout:
    """Where everything of a :func:`heatmap_panel` lies; a function of the image size only."""

    width: int
    height: int
    header: Box  #: name, scores, verdict and scale, one line each
    lines: tuple[Box, ...]  #: the header's four text lines
    original: Box
    overlay: Box
    bar: Box  #: the colour bar, vmax at the top
    bar_labels: Box


def display_size(h: int, w: int, min_h: int = 320, max_h: int = 720, max_w: int = 900) -> tuple[int, int]:
    """The size an image is shown at in a panel: small parts enlarged, large ones reduced."""
    s = min_h / h if h < min_h else (max_h / h if h > max_h else 1.0)
    s = min(s, max_w / w)
    return max(1, round(h * s)), max(1, round(w * s))


def panel_layout(h: int, w: int) -> PanelLayout:
    """The layout of the panel of an ``h`` x ``w`` image."""
    dh, dw = display_size(h, w)
    line_h = cv2.getTextSize("Ag", _FONT, _FONT_SCALE, 1)[0][1] + 12
    lines = tuple(Box(_PAD, _PAD + i * line_h, 0, line_h) for i in range(4))
    header_h = 2 * _PAD + 4 * line_h
    top = header_h + line_h + 6  # a caption line above the images, clear of the bar's top value
    original = Box(_PAD, top, dw, dh)
    overlay = Box(2 * _PAD + dw, top, dw, dh)
    bar = Box(overlay.x + dw + 2 * _PAD, top, _BAR_W, dh)
    bar_labels = Box(bar.x + _BAR_W + 4, top - line_h // 2, _BAR_LABEL_W, dh + line_h)
    width = max(bar_labels.x + _BAR_LABEL_W + _PAD, _MIN_PANEL_W)
    lines = tuple(Box(b.x, b.y, width - 2 * _PAD, b.h) for b in lines)
    return PanelLayout(width=width, height=top + dh + 2 * _PAD, header=Box(0, 0, width, header_h), lines=lines,
                       original=original, overlay=overlay, bar=bar, bar_labels=bar_labels)


def heatmap_panel(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, *,
                  title: str = "", raw_score: float | None = None, image_score: float | None = None,
                  threshold: float | None = None, scale_note: str | None = None,
                  alpha: float = 0.5) -> np.ndarray:
    """A heatmap a person can read (BGR uint8; layout in :func:`panel_layout`).

    raw_score: the image's raw score; default the map's maximum (MUSC_SPEC 4).
    image_score: its score after RsCIN (MUSC_SPEC 5), shown when given.
    threshold: on the raw score; gives the verdict, the contour on both images and a mark on
        the colour bar. scale_note: what the colour scale is (default: its two ends).
    """
    _check_fits(image_rgb, amap)
    raw = float(np.max(amap)) if raw_score is None else float(raw_score)
    lay = panel_layout(*amap.shape)
    panel = np.full((lay.height, lay.width, 3), _BACKGROUND, np.uint8)
    _draw_header(panel, lay, title, raw, image_score, threshold, vmin, vmax, scale_note)
    _draw_images(panel, lay, image_rgb, amap, vmin, vmax, threshold, alpha)
    _draw_colour_bar(panel, lay, vmin, vmax, threshold)
    return panel


def _draw_images(panel: np.ndarray, lay: PanelLayout, image_rgb: np.ndarray, amap: np.ndarray, vmin: float,
                 vmax: float, threshold: float | None, alpha: float) -> None:
    """The original and the overlay at the display size, the contour on both, their captions."""
    size = (lay.original.w, lay.original.h)
    shrink = size[1] < amap.shape[0]
    shown = cv2.resize(amap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR)
    original = cv2.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), size,
                          interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    overlay = cv2.addWeighted(colourise(shown, vmin, vmax), float(alpha), original, 1.0 - float(alpha), 0.0)
    for box, image in ((lay.original, original), (lay.overlay, overlay)):
        if threshold is not None:
            draw_contour(image, shown, threshold)
        box.of(panel)[:] = image
    caption_y = lay.original.y - 12
    _text(panel, _first_fitting(("original",), lay.original.w), (lay.original.x, caption_y), _MUTED)
    _text(panel, _first_fitting(("anomaly map", "map"), lay.bar.x - lay.overlay.x - _PAD),
          (lay.overlay.x, caption_y), _MUTED)
    _text(panel, "score", (lay.bar.x, caption_y), _MUTED)


def _check_fits(image_rgb: np.ndarray, amap: np.ndarray) -> None:
    if amap.shape != image_rgb.shape[:2]:
        raise InputError(f"map of shape {amap.shape} does not fit image of shape {image_rgb.shape[:2]}")


def _draw_header(panel: np.ndarray, lay: PanelLayout, title: str, raw: float, image_score: float | None,
                 threshold: float | None, vmin: float, vmax: float, scale_note: str | None) -> None:
    """Name; scores; verdict (coloured); what the colours mean."""
    scores = f"raw score {raw:.4f} (map maximum)"
    if image_score is not None:
        scores += f"   image score {float(image_score):.4f} (RsCIN: within its pool)"
    v = verdict(raw, threshold)
    if v is None:
        verdict_text, colour, weight = "no verdict: no threshold given (--threshold T, on the raw score)", _MUTED, 1
    elif v == "anomalous":
        verdict_text = f"ANOMALOUS  raw {raw:.4f} >= threshold {threshold:.4f} (white line)"
        colour, weight = _ANOMALOUS, 2
    else:
        verdict_text, colour, weight = f"GOOD  raw {raw:.4f} < threshold {threshold:.4f}", _GOOD, 2
    note = scale_note or f"colour scale {vmin:.4g} (blue) .. {vmax:.4g} (red)"
    texts = ((title or "(no name)", _TEXT, 1), (scores, _TEXT, 1), (verdict_text, colour, weight), (note, _MUTED, 1))
    for box, (text, c, thickness) in zip(lay.lines, texts):
        _text(panel, _fit(_ascii(text), box.w, thickness), (box.x, box.y + box.h - 6), c, thickness)


def _draw_colour_bar(panel: np.ndarray, lay: PanelLayout, vmin: float, vmax: float,
                     threshold: float | None) -> None:
    """JET from vmax (top) to vmin (bottom) with five values, and the threshold marked."""
    bar = lay.bar
    values = np.linspace(vmax, vmin, bar.h)[:, None].repeat(bar.w, axis=1)
    bar.of(panel)[:] = colourise(values, vmin, vmax)
    cv2.rectangle(panel, (bar.x - 1, bar.y - 1), (bar.x + bar.w, bar.y + bar.h), _MUTED, 1)
    decimals = _decimals(vmax - vmin)
    mark_y = None if threshold is None else _bar_y(bar, threshold, vmin, vmax)
    for i in range(5):
        value = vmax - i * (vmax - vmin) / 4
        y = _bar_y(bar, value, vmin, vmax)
        cv2.line(panel, (bar.x + bar.w, y), (bar.x + bar.w + 3, y), _MUTED, 1)
        if mark_y is None or abs(y - mark_y) > 12:  # the threshold's label wins a collision
            _text(panel, f"{value:.{decimals}f}", (lay.bar_labels.x + 2, y + 4), _TEXT)
    if mark_y is not None:
        cv2.line(panel, (bar.x - 4, mark_y), (bar.x + bar.w + 3, mark_y), _CONTOUR_RIM, 3)
        cv2.line(panel, (bar.x - 4, mark_y), (bar.x + bar.w + 3, mark_y), _CONTOUR, 1)
        _text(panel, f"T {threshold:.{decimals}f}", (lay.bar_labels.x + 2, mark_y + 4), _CONTOUR, 2)


def _bar_y(bar: Box, value: float, vmin: float, vmax: float) -> int:
    """Row of the colour bar showing ``value`` (clipped to the bar: values beyond show at its ends)."""
    span = vmax - vmin
    frac = 0.0 if span <= 0 else min(max((vmax - float(value)) / span, 0.0), 1.0)
    return bar.y + round(frac * (bar.h - 1))


def _decimals(span: float) -> int:
    """Enough decimals that the bar's five values differ: 3 for a span of 0.4, 2 for 1."""
    if not math.isfinite(span) or span <= 0:
        return 3
    return int(min(max(2 - math.floor(math.log10(span)), 1), 6))


def _text(img: np.ndarray, text: str, org: tuple[int, int], colour: tuple[int, int, int], thickness: int = 1) -> None:
    cv2.putText(img, text, org, _FONT, _FONT_SCALE, colour, thickness, cv2.LINE_AA)


def _ascii(text: str) -> str:
    """Hershey fonts draw ASCII only: other characters are written as escapes, never as '?'."""
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _first_fitting(texts: tuple[str, ...], width: int) -> str:
    """The first of ``texts`` (longest first) that fits ``width`` pixels; else the last one."""
    for text in texts:
        if cv2.getTextSize(text, _FONT, _FONT_SCALE, 1)[0][0] <= width:
            return text
    return texts[-1]


def _fit(text: str, width: int, thickness: int = 1) -> str:
    """``text`` cut in the middle (``...``) until it fits ``width`` pixels: both ends of a path stay."""
    if cv2.getTextSize(text, _FONT, _FONT_SCALE, thickness)[0][0] <= width:
        return text
    keep = len(text)
    while keep > 4:
        keep -= 2
        cut = text[:keep // 2] + "..." + text[len(text) - keep // 2:]
        if cv2.getTextSize(cut, _FONT, _FONT_SCALE, thickness)[0][0] <= width:
            return cut
    return text[:4]
