"""Offline scoring of a folder (``musc-edge score``): features, scoring, outputs, metrics."""

from .folder import ScoreResult, ScoreSettings, score_folder

__all__ = ["ScoreResult", "ScoreSettings", "score_folder"]
