"""Offline batch scoring of a folder: the library function behind ``musc-edge score``.

``score_folder`` runs four stages, each timed for ``run.json``:

1. **features**: the runtime decodes the next batch in a background thread while the backbone runs
   (``musc_edge.runtime.pipeline``); tokens are kept as float16 (MUSC_SPEC 8: the pool's tokens
   are the memory bound; decoded images are never kept). Unreadable files are skipped and listed.
2. **score**: one call of a *score step* over the whole pool (default: batch MuSc,
   :func:`musc_edge.score_tokens`, MUSC_SPEC 2-5). The step is a parameter so that a window
   scorer can replace it without touching the rest.
3. **outputs**: ``scores.csv``, heatmap overlays at the original image size (``--heatmaps``;
   MUSC_SPEC 4: bilinear upsampling of the G x G map), ``metrics.json`` when ground truth exists.
4. **metrics**: image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO (MUSC_SPEC 6) at the
   original image size; maps are upsampled one image at a time from the G x G maps, never all
   held at full size besides the pooled pixel scores the metrics need.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ImageDecodeError, InputError
from .io import Dataset, Sample, discover, heatmap_overlay, output_names, read_mask, write_csv, write_json, write_png
from .types import Scores

log = logging.getLogger(__name__)

#: A score step: (tokens per layer (N, 1 + G*G, C), embeddings (N, D), r_list, k_list) -> Scores.
ScoreStep = Callable[[Sequence[np.ndarray], np.ndarray, Sequence[int], Sequence[int]], Scores]


def batch_score_step(tokens: Sequence[np.ndarray], embedding: np.ndarray, r_list: Sequence[int],
                     k_list: Sequence[int]) -> Scores:
    """Batch MuSc over the whole pool (MUSC_SPEC 2-5): every image scored against all others."""
    from .scorer import score_tokens

    return score_tokens(list(tokens), embedding, r_list=tuple(r_list), k_list=tuple(k_list))


@dataclass(frozen=True)
class ScoreSettings:
    """How to score: the flags of ``musc-edge score``."""

    batch_size: int = 8
    r_list: tuple[int, ...] = (1, 3, 5)
    k_list: tuple[int, ...] = (1, 2, 3)
    gt: str = "auto"
    heatmaps: bool = False
    device: str = "auto"
    workers: int = 1
    progress: bool = True


@dataclass
class ScoreResult:
    """What ``score_folder`` produced (also on disk under ``out_dir``)."""

    out_dir: Path
    samples: list[Sample]
    sizes: list[tuple[int, int]]
    scores: Scores
    skipped: list[tuple[str, str]]
    metrics: dict | None
    run: dict
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class _Pool:
    """Features of the scored images, in order: float16 tokens, float32 embeddings."""

    samples: list[Sample]
    sizes: list[tuple[int, int]]
    tokens: list[np.ndarray]
    embedding: np.ndarray
    skipped: list[tuple[str, str]]
    decode_s: float
    infer_s: float
    wall_s: float


def score_folder(data_dir: str | Path, model_path: str | Path, out_dir: str | Path,
                 settings: ScoreSettings = ScoreSettings(), *, score_step: ScoreStep = batch_score_step,
                 extractor: Any = None) -> ScoreResult:
    """Score every image of ``data_dir`` with MuSc and write the outputs into ``out_dir``.

    ``extractor`` (optional) is an already loaded FeatureExtractor, reused instead of loading
    ``model_path`` (the caller then owns and closes it).
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    t = time.perf_counter()
    dataset = discover(data_dir, settings.gt, exclude=[out_dir])
    timings["discover_s"] = time.perf_counter() - t

    from musc_edge.runtime.model import load_model

    t = time.perf_counter()
    own = extractor is None
    extractor = load_model(model_path, settings.device) if own else extractor
    timings["load_model_s"] = time.perf_counter() - t
    try:
        pool = _extract(dataset, extractor, settings)
    finally:
        if own:
            extractor.close()
    timings.update(decode_preprocess_s=pool.decode_s, inference_s=pool.infer_s, features_wall_s=pool.wall_s)
    if len(pool.samples) < 2:
        raise InputError(f"only {len(pool.samples)} readable image(s) in {data_dir} "
                         f"({len(pool.skipped)} skipped); MuSc scores images against each other and needs >= 2")

    t = time.perf_counter()
    scores = score_step(pool.tokens, pool.embedding, settings.r_list, settings.k_list)
    timings["score_s"] = time.perf_counter() - t
    del pool.tokens  # the largest arrays; not needed any more

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    t = time.perf_counter()
    files["scores"] = str(_write_scores(out_dir, pool.samples, scores))
    timings["write_scores_s"] = time.perf_counter() - t
    warnings = list(dataset.warnings)
    if settings.heatmaps:
        t = time.perf_counter()
        files["maps"] = str(_write_heatmaps(out_dir, pool.samples, pool.sizes, scores.patch_maps, warnings))
        timings["heatmaps_s"] = time.perf_counter() - t
    metrics = None
    t = time.perf_counter()
    if dataset.has_labels or any(s.label is not None for s in pool.samples):
        metrics = evaluate(pool.samples, pool.sizes, scores, warnings)
        if metrics is not None:
            write_json(out_dir / "metrics.json", metrics)
            files["metrics"] = str(out_dir / "metrics.json")
    timings["metrics_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t_start

    meta = extractor.meta
    run = {
        "musc_edge_version": __version__,
        "command": "score",
        "data_dir": str(data_dir),
        "layout": dataset.layout,
        "model": {"path": str(model_path), "backend": extractor.description, "random_weights": meta.is_random,
                  "meta": meta.to_dict()},
        "settings": {"batch": settings.batch_size, "r": list(settings.r_list), "k": list(settings.k_list),
                     "gt": str(settings.gt), "heatmaps": settings.heatmaps, "device": settings.device,
                     "workers": settings.workers, "scorer": getattr(score_step, "__name__", type(score_step).__name__)},
        "counts": {"found": len(dataset.samples), "scored": len(pool.samples), "skipped": len(pool.skipped)},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "images_per_s_features": round(len(pool.samples) / pool.wall_s, 2) if pool.wall_s > 0 else None,
        "skipped": [{"path": p, "reason": r} for p, r in pool.skipped],
        "warnings": warnings,
        "outputs": files,
    }
    write_json(out_dir / "run.json", run)
    files["run"] = str(out_dir / "run.json")
    return ScoreResult(out_dir=out_dir, samples=pool.samples, sizes=pool.sizes, scores=scores,
                       skipped=pool.skipped, metrics=metrics, run=run, files=files)


def _extract(dataset: Dataset, extractor: Any, settings: ScoreSettings) -> _Pool:
    """Run the backbone over the data set; keep tokens (float16) and embeddings of readable images."""
    from tqdm import tqdm

    from musc_edge.runtime.pipeline import iter_features

    meta = extractor.meta
    n = len(dataset.samples)
    n_tokens = 1 + meta.grid * meta.grid
    tokens = [np.empty((n, n_tokens, c), np.float16) for c in meta.token_dims]
    embedding = np.empty((n, meta.embed_dim), np.float32)
    by_path = {s.path: s for s in dataset.samples}
    samples: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[tuple[str, str]] = []
    decode_s = infer_s = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc="features", file=sys.stderr, disable=not settings.progress,
               dynamic_ncols=True)
    try:
        for batch in iter_features([s.path for s in dataset.samples], extractor, settings.batch_size,
                                   workers=settings.workers):
            skipped += [(str(p), reason) for p, reason in batch.skipped]
            decode_s += batch.decode_s
            infer_s += batch.infer_s
            if batch.features is not None:
                i, b = len(samples), len(batch.paths)
                for layer, t in enumerate(batch.features.tokens):
                    tokens[layer][i:i + b] = t
                embedding[i:i + b] = batch.features.embedding
                samples += [by_path[p] for p in batch.paths]
                sizes += list(batch.sizes)
            bar.update(len(batch.paths) + len(batch.skipped))
    finally:
        bar.close()
    m = len(samples)
    return _Pool(samples=samples, sizes=sizes, tokens=[t[:m] for t in tokens], embedding=embedding[:m],
                 skipped=skipped, decode_s=decode_s, infer_s=infer_s, wall_s=time.perf_counter() - t0)


def _write_scores(out_dir: Path, samples: list[Sample], scores: Scores) -> Path:
    with_label = any(s.label is not None for s in samples)
    columns = ["path", "image_score", "raw_score"] + (["label"] if with_label else [])
    rows = []
    for s, final, raw in zip(samples, scores.image_scores, scores.image_scores_raw):
        row = [str(s.path), float(final), float(raw)]
        if with_label:
            row.append("" if s.label is None else int(s.label))
        rows.append(row)
    path = out_dir / "scores.csv"
    write_csv(path, columns, rows)
    return path


def full_size_map(patch_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The G x G patch map at the original image size (h, w), float32 (MUSC_SPEC 4)."""
    from .scorer import upsample_map

    return np.asarray(upsample_map(patch_map, size), dtype=np.float32)


def _write_heatmaps(out_dir: Path, samples: list[Sample], sizes: list[tuple[int, int]], patch_maps: np.ndarray,
                    warnings: list[str]) -> Path:
    """Overlay each image's map at its original size; one colour scale for the whole run."""
    from musc_edge.runtime.preprocess import decode_image

    maps_dir = out_dir / "maps"
    vmin, vmax = float(patch_maps.min()), float(patch_maps.max())
    for s, hw, name, pmap in zip(samples, sizes, output_names(samples), patch_maps):
        try:
            image = decode_image(s.path)
        except ImageDecodeError as e:  # the file changed since it was scored
            warnings.append(f"no heatmap for {s.rel}: {e}")
            continue
        if image.shape[:2] != tuple(hw):
            warnings.append(f"no heatmap for {s.rel}: the file changed size since it was scored")
            continue
        write_png(maps_dir / name, heatmap_overlay(image, full_size_map(pmap, hw), vmin, vmax))
    return maps_dir


class _LazyMaps(Sequence):
    """Full-size maps computed on access, so that only one is alive at a time (memory bound)."""

    def __init__(self, patch_maps: np.ndarray, sizes: list[tuple[int, int]], index: list[int]) -> None:
        self.patch_maps, self.sizes, self.index = patch_maps, sizes, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        j = self.index[i]
        return full_size_map(self.patch_maps[j], self.sizes[j])


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
        return read_mask(s.mask_path, hw)


def evaluate(samples: list[Sample], sizes: list[tuple[int, int]], scores: Scores, warnings: list[str]) -> dict | None:
    """Every metric of MUSC_SPEC 6 the ground truth allows; undefined ones are None with a reason."""
    from .metrics import UndefinedMetricError, image_metrics, pixel_metrics

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
                read_mask(s.mask_path)
            except ImageDecodeError as e:
                warnings.append(f"mask of {s.rel} unreadable, left out of pixel metrics: {e}")
                continue
        pixel_index.append(i)
    if any(samples[i].mask_path is not None for i in pixel_index):
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("ignore")
            pm = pixel_metrics(_LazyMasks(samples, sizes, pixel_index), _LazyMaps(scores.patch_maps, sizes, pixel_index))
        result["pixel"] = dict(pm)
        reasons.update({f"pixel.{k}": v for k, v in pm.reasons.items()})
        result["counts"]["pixel_images"] = len(pixel_index)
    else:
        result["pixel"] = None
        reasons["pixel"] = "no ground-truth masks found: pixel metrics need ground_truth/<type>/<stem>_mask.png"
    result["undefined"] = reasons
    return result
