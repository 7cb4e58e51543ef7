"""Heatmap overlays: a MuSc anomaly map in colour over the image it was computed from."""

from __future__ import annotations

import cv2
import numpy as np

from musc_edge.core.errors import InputError


def heatmap_overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                    alpha: float = 0.5) -> np.ndarray:
    """The map in colour (JET: blue low, red high) blended over the image; BGR uint8 for write_png.

    ``vmin``/``vmax`` fix the colour scale, so overlays of one run are comparable with each other.
    """
    if amap.shape != image_rgb.shape[:2]:
        raise InputError(f"map of shape {amap.shape} does not fit image of shape {image_rgb.shape[:2]}")
    span = float(vmax) - float(vmin)
    norm = (amap - vmin) / span if span > 0 else np.zeros_like(amap)
    gray = np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(gray, cv2.COLORMAP_JET)
    base = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(colour, float(alpha), base, 1.0 - float(alpha), 0.0)
