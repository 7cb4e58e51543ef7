"""What INT8 costs and buys: FP32 against INT8 on images the calibration never saw.

The report (``FILE.int8.report.json``) holds, side by side for the two models:

* per-output cosine similarity (every ``tokens_i`` and ``embedding``) on held-out images:
  each image's output flattened, mean and minimum over the images;
* file sizes;
* speed: images/s of both models on the same batch, timed interleaved in one process
  (FP32, INT8, FP32, ...) and taking the median, so load from other processes hits both alike;
* when the folder has labels (and masks): image and pixel AUROC (and the rest of MUSC_SPEC 6)
  of FP32 and INT8 through the full MuSc pipeline (MUSC_SPEC 2-5) over all non-calibration
  images, and the drop. Cosine alone can hide what matters: MSM compares patch distances across
  images, so the AUROC drop is the number to judge INT8 by.

A model made for TensorRT (``--mode trt``) is not judged by ONNX Runtime's CPU int8 kernels: on
CPUs without VNNI they multiply int8 by int8 through 16-bit pair sums that saturate, which
TensorRT does not (measured on EfficientNet-Lite0: cosine 0.64 through the CPU kernels, 0.97 as
simulated). Its INT8 side runs *simulated* instead: graph optimisations off, so every
QuantizeLinear/DequantizeLinear pair rounds and clamps in float and the Conv/MatMul run in FP32,
the arithmetic TensorRT's explicit quantization follows (up to its accumulation order). Its CPU
speed says nothing about TensorRT, so the speed entry is skipped for it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge import __version__
from musc_edge.core.device import CPU, ScoreDevice, resolve_device
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.pools import BatchPool
from musc_edge.datasets.evaluation import evaluate
from musc_edge.core.errors import InputError
from musc_edge.datasets import Dataset, Sample
from musc_edge.outputs import write_json
from musc_edge.runtime.model import FeatureExtractor, load_model
from musc_edge.runtime.pipeline import iter_features

from .reader import ImageSplit, load_batch

log = logging.getLogger(__name__)

#: Keys every complete report has (tests check them).
REPORT_KEYS = ("musc_edge_version", "fp32_model", "int8_model", "quantization", "calibration_images",
               "heldout_images", "cosine", "cosine_min", "size_ratio", "speed", "musc")


def report_path(int8_path: str | Path) -> Path:
    """``x.int8.onnx`` -> ``x.int8.report.json`` (next to the INT8 model)."""
    p = Path(int8_path)
    return p.with_name(p.name[: -len(p.suffix)] + ".report.json") if p.suffix else p.with_name(p.name + ".report.json")


# ------------------------------------------------------------------------------------------- cosine
def cosine_per_image(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each image's flattened output in ``a`` and ``b`` (B,).

    An all-zero pair counts as identical (1.0); one zero against a non-zero output as 0.0.
    """
    if a.shape != b.shape:
        raise InputError(f"cannot compare outputs of shapes {a.shape} and {b.shape}")
    x = a.reshape(len(a), -1).astype(np.float64)
    y = b.reshape(len(b), -1).astype(np.float64)
    nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
    dot = (x * y).sum(axis=1)
    out = np.where((nx > 0) & (ny > 0), dot / np.maximum(nx * ny, 1e-300), 0.0)
    return np.where((nx == 0) & (ny == 0), 1.0, out)


def compare_outputs(fp32: Any, int8: Any, paths: Sequence[Path], batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Per-output cosine of two extractors on ``paths``: ``{name: {"mean", "min"}}``."""
    sims: dict[str, list[np.ndarray]] = {}
    n = 0
    for start in range(0, len(paths), batch_size):
        batch, used = load_batch(paths[start:start + batch_size], fp32.meta)
        if not used:
            continue
        n += len(used)
        fa, fb = fp32(batch), int8(batch)
        names = [f"tokens_{i}" for i in range(len(fa.tokens))] + ["embedding"]
        for name, a, b in zip(names, list(fa.tokens) + [fa.embedding], list(fb.tokens) + [fb.embedding]):
            sims.setdefault(name, []).append(cosine_per_image(np.asarray(a), np.asarray(b)))
    if n == 0:
        raise InputError("none of the held-out images could be read; check the image folder")
    return {name: {"mean": float(np.mean(np.concatenate(v))), "min": float(np.min(np.concatenate(v)))}
            for name, v in sims.items()}


# -------------------------------------------------------------------------------------------- speed
def compare_speed(fp32: Any, int8: Any, batch: np.ndarray, repeats: int = 5,
                  clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Images/s of both extractors on ``batch``, timed interleaved; median of ``repeats`` rounds."""
    fp32(batch), int8(batch)  # warm-up: first runs allocate and pick kernels
    t_fp32, t_int8 = [], []
    for _ in range(max(1, repeats)):
        for model, times in ((fp32, t_fp32), (int8, t_int8)):
            t = clock()
            model(batch)
            times.append(clock() - t)
    f, q = statistics.median(t_fp32), statistics.median(t_int8)
    b = len(batch)
    return {"batch": b, "repeats": max(1, repeats), "fp32_images_per_s": round(b / f, 3),
            "int8_images_per_s": round(b / q, 3), "ratio": round(f / q, 3)}


# -------------------------------------------------------------------------------------------- MuSc
def musc_metrics(extractor: Any, samples: Sequence[Sample], batch_size: int = 8,
                 params: MuscParams = DEFAULT_PARAMS, device: ScoreDevice = CPU) -> dict | None:
    """Score ``samples`` as one MuSc pool with ``extractor`` (the :class:`BatchPool` that
    ``musc-edge score`` uses, so float16 tokens as there) and return MUSC_SPEC 6 metrics."""
    by_path = {s.path: s for s in samples}
    pool = BatchPool(extractor.meta, len(samples), params, device=device)
    used: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    for batch in iter_features([s.path for s in samples], extractor, batch_size):
        if batch.features is None:
            continue
        pool.add(batch.features.tokens, batch.features.embedding)
        used += [by_path[p] for p in batch.paths]
        sizes += list(batch.sizes)
    if len(used) < 2:
        raise InputError(f"only {len(used)} readable evaluation image(s); MuSc needs at least 2")
    return evaluate(used, sizes, pool.finish(), [])


def _auroc(metrics: dict | None, key: str) -> float | None:
    part = (metrics or {}).get(key)
    return None if not part else part.get("auroc")


def _drop(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 6)


# ------------------------------------------------------------------------------------------- report
def open_simulated(path: str | Path, threads: int | None = None) -> FeatureExtractor:
    """A Q/DQ model on ONNX Runtime's CPU provider with graph optimisations off (see the module doc).

    Without optimisations ORT does not fuse DequantizeLinear -> Conv -> QuantizeLinear into its
    int8 kernels: each Q/DQ pair quantizes and dequantizes in float and the Conv/MatMul run FP32.
    """
    model = load_model(path, "cpu", threads=threads, optimize=False)
    model.backend.description += " (Q/DQ simulated in float, graph optimisations off)"
    return model


def build_report(fp32_path: str | Path, int8_path: str | Path, split: ImageSplit, quantization: dict, *,
                 batch_size: int = 8, speed_repeats: int = 5, threads: int | None = None,
                 musc: bool = True, params: MuscParams = DEFAULT_PARAMS,
                 simulate_int8: bool = False, score_device: str = "cpu") -> dict:
    """Compare the FP32 and INT8 models (both on ONNX Runtime's CPU provider) and return the report.

    simulate_int8: run the INT8 model as simulated quantization rather than through ORT's int8
    kernels (for ``--mode trt`` models, which TensorRT will run; see the module docstring).
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    device = resolve_device(score_device) if musc else CPU  # refused before minutes of comparison
    fp32 = load_model(fp32_path, "cpu", threads=threads)
    int8 = open_simulated(int8_path, threads) if simulate_int8 else load_model(int8_path, "cpu", threads=threads)
    try:
        if not int8.meta.compatible_with(fp32.meta):
            raise InputError(f"{int8_path.name} was not made from {fp32_path.name} (their metadata differ)")
        cosine = compare_outputs(fp32, int8, list(split.heldout), batch_size)
        if simulate_int8:
            speed: dict[str, Any] = {"skipped": "a --mode trt model is for TensorRT; its simulated CPU speed says "
                                                "nothing about the engine (benchmarks/bench_tensorrt.py measures that)"}
        else:
            speed_batch, _ = load_batch(list(split.heldout)[:batch_size], fp32.meta)
            if len(speed_batch) < batch_size:  # few held-out images: repeat them to a full batch
                speed_batch = np.resize(speed_batch, (batch_size,) + speed_batch.shape[1:]).astype(np.float32)
            speed = compare_speed(fp32, int8, speed_batch, speed_repeats)
            speed["threads"] = threads or 0
            speed["device"] = "cpu"
        execution = {"fp32": fp32.description, "int8": int8.description,
                     "int8_arithmetic": "simulated" if simulate_int8 else "onnxruntime int8 kernels"}
        musc_part = _musc_part(fp32, int8, split.dataset, split.evaluation, batch_size, params, device) if musc \
            else {"skipped": "disabled (--no-musc)"}
    finally:
        fp32.close()
        int8.close()
    size_fp32, size_int8 = fp32_path.stat().st_size, int8_path.stat().st_size
    root = split.dataset.root
    return {
        "musc_edge_version": __version__,
        "fp32_model": {"path": str(fp32_path), "bytes": size_fp32},
        "int8_model": {"path": str(int8_path), "bytes": size_int8},
        "size_ratio": round(size_int8 / size_fp32, 4),
        "quantization": quantization,
        "calibration_images": [_rel(p, root) for p in split.calibration],
        "heldout_images": [_rel(p, root) for p in split.heldout],
        "cosine": cosine,
        "cosine_min": min(v["min"] for v in cosine.values()),
        "speed": speed,
        "execution": execution,
        "musc": musc_part,
    }


def _musc_part(fp32: Any, int8: Any, dataset: Dataset, evaluation: Sequence[Path], batch_size: int,
               params: MuscParams, device: ScoreDevice = CPU) -> dict:
    chosen = set(evaluation)
    samples = [s for s in dataset.samples if s.path in chosen]
    if not any(s.label is not None for s in samples):
        return {"skipped": "the image folder has no labels or masks (an MVTec-style category has them)"}
    labels = {s.label for s in samples}
    if labels != {0, 1}:
        return {"skipped": "the evaluation images hold only one class; image AUROC needs good and defective images"}
    m_fp32 = musc_metrics(fp32, samples, batch_size, params, device)
    m_int8 = musc_metrics(int8, samples, batch_size, params, device)
    return {
        "images": len(samples),
        "r": list(params.r_list), "k": list(params.k_list), "score_device": device.name,
        "fp32": m_fp32, "int8": m_int8,
        "image_auroc_drop": _drop(_auroc(m_fp32, "image"), _auroc(m_int8, "image")),
        "pixel_auroc_drop": _drop(_auroc(m_fp32, "pixel"), _auroc(m_int8, "pixel")),
    }


def _rel(path: Path, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def write_report(report: dict, int8_path: str | Path) -> Path:
    path = report_path(int8_path)
    write_json(path, report)
    return path
