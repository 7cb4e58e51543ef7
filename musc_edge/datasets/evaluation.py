"""Metrics of a scored pool against a dataset's ground truth (MUSC_SPEC 6).

Shared by ``musc-edge score`` and the calibration report. Maps are upsampled to each image's
original size one at a time (MUSC_SPEC 4), and masks read one at a time, so only the pooled pixel
scores the metrics need are held at full size.
"""

from __future__ import annotations

import warnings as _warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from musc_edge.core.errors import ImageDecodeError
from musc_edge.core.metrics import UndefinedMetricError, image_metrics, pixel_metrics
from musc_edge.core.scorer import upsample_map
from musc_edge.core.types import Scores

from .base import Sample, read_mask


def full_size_map(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The G x G patch map at the original image size (h, w), float32 (MUSC_SPEC 4)."""
    return np.asarray(upsample_map(patch_map, size), dtype=np.float32)


class _LazyMaps(Sequence):
    """Full-size maps computed on access, so that only one is alive at a time (memory bound)."""

    def __init__(self, patch_maps: np.ndarray, sizes: list[tuple[int, int]], index: list[int]) -> None:
        self.patch_maps, self.sizes, self.index = patch_maps, sizes, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        j = self.index[i]
        return full_size_map(self.patch_maps[j], self.sizes[j])


class _Picked(Sequence):
    """``maps[index[i]]`` on access: a lazy sequence of full-size maps, restricted to ``index``."""

    def __init__(self, maps: Sequence[np.ndarray], index: list[int]) -> None:
        self.maps, self.index = maps, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return np.asarray(self.maps[self.index[i]], dtype=np.float32)


class _LazyMasks(Sequence):
    """Masks read on access: a good image's mask is all zero (MVTec convention)."""

    def __init__(self, samples: list[Sample], sizes: list[tuple[int, int]], index: list[int]) -> None:
        self.samples, self.sizes, self.index = samples, sizes, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        j = self.index[i]
        s, hw = self.samples[j], self.sizes[j]
        if s.mask_path is None:
            return np.zeros(hw, dtype=bool)
        return read_mask(s.mask_path, hw, nonzero=s.mask_nonzero)


def evaluate(samples: list[Sample], sizes: list[tuple[int, int]], scores: Scores, warnings: list[str],
             maps: Sequence[np.ndarray] | None = None) -> dict | None:
    """Every metric of MUSC_SPEC 6 the ground truth allows; undefined ones are None with a reason.

    ``maps``: each image's full-size map by index, computed on access (``score --resize pad`` or
    ``--tiles``: cropped and stitched maps); None: upsampled from ``scores.patch_maps``.
    """
    result: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    labelled = [i for i, s in enumerate(samples) if s.label is not None]
    labels = np.array([samples[i].label for i in labelled], dtype=int)
    result["counts"] = {"images": len(labelled), "defective": int(labels.sum()),
                        "normal": int(len(labels) - labels.sum())}
    for key, values in (("image", scores.image_scores), ("image_raw", scores.image_scores_raw)):
        try:
            result[key] = dict(image_metrics(labels, np.asarray(values)[labelled]))
        except UndefinedMetricError as e:
            result[key] = None
            reasons[key] = str(e)
    pixel_index = []
    for i in labelled:
        s = samples[i]
        if not s.has_mask_truth:
            continue
        if s.mask_path is not None:
            try:
                read_mask(s.mask_path, nonzero=s.mask_nonzero)
            except ImageDecodeError as e:
                warnings.append(f"mask of {s.rel} unreadable, left out of pixel metrics: {e}")
                continue
        pixel_index.append(i)
    if any(samples[i].mask_path is not None for i in pixel_index):
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            full = (_LazyMaps(scores.patch_maps, sizes, pixel_index) if maps is None
                    else _Picked(maps, pixel_index))
            pm = pixel_metrics(_LazyMasks(samples, sizes, pixel_index), full)
        result["pixel"] = dict(pm)
        reasons.update({f"pixel.{k}": v for k, v in pm.reasons.items()})
        result["counts"]["pixel_images"] = len(pixel_index)
    else:
        result["pixel"] = None
        reasons["pixel"] = "no ground-truth masks found: pixel metrics need ground_truth/<type>/<stem>_mask.png"
    result["undefined"] = reasons
    return result
