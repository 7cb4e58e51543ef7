"""``calibrate_folder``: the library function behind ``musc-edge calibrate``.

Split the folder (calibration / held-out, :mod:`.reader`), quantize (:mod:`.quantize`), write the
FP32-vs-INT8 report next to the INT8 model (:mod:`.report`). Every argument is checked before
the first image is decoded, so a bad combination fails in a second, not after calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from musc_edge.core.errors import InputError

from .quantize import QuantResult, check_output_path, default_mode, load_fp32_model, make_config, quantize_model
from .reader import split_images
from .report import build_report, write_report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationRun:
    """What ``calibrate_folder`` wrote: the INT8 model, and the report (None with report=False)."""

    result: QuantResult
    report_path: Path | None
    report: dict | None


def calibrate_folder(model: str | Path, images: str | Path, out: str | Path, *, mode: str | None = None,
                     method: str | None = None, num: int = 64, holdout: int = 16, batch: int = 8,
                     cache: str | Path | None = None, report: bool = True, musc: bool = True,
                     threads: int | None = None, seed: int = 0, score_device: str = "cpu") -> CalibrationRun:
    """Quantize ``model`` with images from ``images`` into ``out`` and report what it cost.

    mode None picks the measured default for the model family (:func:`.quantize.default_mode`).
    The report compares both models on ONNX Runtime's CPU provider, also for ``trt`` mode (whose
    Q/DQ form is meant for TensorRT and is slow on the CPU: its cosine still tells the accuracy).
    ``score_device``: where the report's MuSc comparison scores (``cpu``, ``cuda``, ``auto``).
    """
    model, out = Path(model), Path(out)
    _, meta = load_fp32_model(model)
    check_output_path(model, out)
    config = make_config(mode or default_mode(meta), method, num=num, batch=batch, cache=cache)
    if holdout < 1:
        raise InputError(f"--holdout must be at least 1, got {holdout}")
    split = split_images(images, num, holdout=holdout, seed=seed)
    log.info("calibrating %s (%s, %s) on %d images, %d held out", model.name, config.mode, config.method,
             len(split.calibration), len(split.heldout))
    result = quantize_model(model, out, config, split.calibration)
    if not report:  # the report would load the model and warn; without it, warn here
        from musc_edge.runtime.model import warn_if_random

        warn_if_random(meta, model)
        return CalibrationRun(result, None, None)
    data = build_report(model, out, split, result.describe(), batch_size=batch, threads=threads, musc=musc,
                        simulate_int8=result.config.mode == "trt", score_device=score_device)  # TensorRT's arithmetic, not ORT's kernels
    return CalibrationRun(result, write_report(data, out), data)
