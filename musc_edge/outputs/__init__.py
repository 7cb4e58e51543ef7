"""Outputs of the apps: CSV/JSON/PNG writers and heatmap overlays (OpenCV)."""

from .heatmap import heatmap_overlay
from .writers import output_names, write_csv, write_json, write_png

__all__ = ["heatmap_overlay", "output_names", "write_csv", "write_json", "write_png"]
