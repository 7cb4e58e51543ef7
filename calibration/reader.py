"""Calibration data from a folder of line images, preprocessed exactly as the runtime does.

Static INT8 quantization needs the activation ranges the model sees *in production*; feeding it
images resized or normalised differently from the runtime would calibrate the wrong ranges. So the
reader decodes and preprocesses with :func:`musc_edge.runtime.preprocess.load_input`, driven by the
model's own metadata (MUSC_SPEC 1), and hands ONNX Runtime one feed dict per ``get_next()`` call,
as its :class:`~onnxruntime.quantization.CalibrationDataReader` protocol asks.

:func:`split_images` picks the calibration images and a disjoint held-out set for the report, so
the cosine similarity of INT8 against FP32 is measured on images the calibration never saw.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.datasets import Dataset, discover
from musc_edge.core.meta import ModelMeta
from musc_edge.runtime.preprocess import load_input

log = logging.getLogger(__name__)

#: Fewest images a calibration may use: fewer give activation ranges from a handful of frames.
MIN_CALIBRATION_IMAGES = 4
#: Fewest held-out images the report compares FP32 and INT8 on.
MIN_HELDOUT_IMAGES = 2


@dataclass(frozen=True)
class ImageSplit:
    """Which images calibrate and which are held out for the report (disjoint).

    calibration: images whose activations set the INT8 ranges.
    heldout: images for the cosine comparison (never used for calibration).
    evaluation: every image not used for calibration (the MuSc pool for the AUROC comparison).
    dataset: the discovered folder (labels and masks, when it has them).
    """

    calibration: tuple[Path, ...]
    heldout: tuple[Path, ...]
    evaluation: tuple[Path, ...]
    dataset: Dataset


def split_images(folder: str | Path, num: int, *, holdout: int = 16, seed: int = 0) -> ImageSplit:
    """Choose ``num`` calibration images and up to ``holdout`` held-out ones from ``folder``.

    The folder is a flat folder of images or an MVTec-style category (``test/<type>/``,
    ``ground_truth/``). With labels, calibration draws from the good images first (a line's
    stream is mostly good parts; defects should not set the ranges), so the defective ones stay
    for the evaluation. The draw is a seeded shuffle, not the first files by name: line images
    are often named by time or batch, and the first ``num`` would all come from one shift.
    """
    if num < MIN_CALIBRATION_IMAGES:
        raise InputError(f"--num {num} is too few calibration images; use at least {MIN_CALIBRATION_IMAGES} "
                         "(64 or more is typical)")
    if holdout < MIN_HELDOUT_IMAGES:
        raise InputError(f"--holdout {holdout} is too few held-out images; use at least {MIN_HELDOUT_IMAGES}")
    root = Path(folder)
    if root.is_dir() and not any(root.iterdir()):
        raise InputError(f"calibration folder {root} is empty; pass a folder of line images (jpg/png/bmp/tiff)")
    dataset = discover(root, "auto")
    paths = [s.path for s in dataset.samples]
    needed = num + MIN_HELDOUT_IMAGES
    if len(paths) < needed:
        raise InputError(f"{root} has {len(paths)} images, too few for --num {num}: calibration needs {num} and "
                         f"the report at least {MIN_HELDOUT_IMAGES} more held out; add images or pass "
                         f"--num {max(MIN_CALIBRATION_IMAGES, len(paths) - MIN_HELDOUT_IMAGES)}")
    rng = np.random.default_rng(seed)
    good = [s.path for s in dataset.samples if s.label == 0]
    rest = [s.path for s in dataset.samples if s.label != 0]
    # good images first (shuffled), then the rest (shuffled): calibration takes from the front
    order = [good[i] for i in rng.permutation(len(good))] + [rest[i] for i in rng.permutation(len(rest))]
    calibration = order[:num]
    chosen = set(calibration)
    evaluation = [p for p in paths if p not in chosen]  # keep the folder's order for the report
    heldout_idx = np.sort(rng.permutation(len(evaluation))[:holdout])
    heldout = [evaluation[i] for i in heldout_idx]
    return ImageSplit(tuple(calibration), tuple(heldout), tuple(evaluation), dataset)


def load_batch(paths: Sequence[Path], meta: ModelMeta) -> tuple[np.ndarray, list[Path]]:
    """Preprocess ``paths`` into (B, 3, S, S) float32; unreadable files are logged and skipped."""
    arrays, used = [], []
    for p in paths:
        try:
            arrays.append(load_input(p, meta)[0])
            used.append(Path(p))
        except ImageDecodeError as e:
            log.warning("skipping %s", e)
    s = meta.image_size
    batch = np.stack(arrays) if arrays else np.zeros((0, 3, s, s), np.float32)
    return batch, used


class ImageFolderReader(CalibrationDataReader):
    """ONNX Runtime calibration reader over image files, ``batch_size`` images per ``get_next()``.

    Images are decoded lazily, one batch at a time, so calibrating on hundreds of images never
    holds them all in memory. Unreadable files are skipped with a warning; if fewer than
    :data:`MIN_CALIBRATION_IMAGES` remain, the calibration is refused rather than run on too
    little data. ``rewind()`` starts over (the entropy and percentile calibrators read twice).
    """

    def __init__(self, paths: Sequence[str | Path], meta: ModelMeta, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise InputError(f"calibration batch size must be at least 1, got {batch_size}")
        self.paths = [Path(p) for p in paths]
        self.meta = meta
        self.batch_size = batch_size
        self.used: list[Path] = []
        self._pos = 0
        self._passes = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        while self._pos < len(self.paths):
            chunk = self.paths[self._pos:self._pos + self.batch_size]
            self._pos += len(chunk)
            batch, used = load_batch(chunk, self.meta)
            if self._passes == 0:
                self.used.extend(used)
            if len(batch):
                return {self.meta.input_name: batch}
        if self._passes == 0 and len(self.used) < MIN_CALIBRATION_IMAGES:
            raise InputError(f"only {len(self.used)} of {len(self.paths)} calibration images could be read; "
                             f"need at least {MIN_CALIBRATION_IMAGES}: check the folder's images")
        return None

    def rewind(self) -> None:
        """Start again from the first image (ORT calls this between calibration passes)."""
        if self._pos:
            self._passes += 1
        self._pos = 0

    def __len__(self) -> int:
        return len(self.paths)
