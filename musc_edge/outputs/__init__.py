"""Outputs of the apps: CSV/JSON/PNG writers and heatmaps (OpenCV)."""

from .heatmap import RUN_SCALE, colour_range, heatmap_overlay, heatmap_panel, verdict
from .writers import output_names, write_csv, write_json, write_png

__all__ = ["RUN_SCALE", "colour_range", "heatmap_overlay", "heatmap_panel", "output_names", "verdict", "write_csv",
           "write_json", "write_png"]
