"""Offline scoring of a folder: the library function behind ``musc-edge score``.

``score_folder`` runs these stages, each timed for ``run.json``:

1. **features + score**: the runtime decodes the next batch in a background thread while the
   backbone runs (``musc_edge.runtime.pipeline``); decoded images are never kept, unreadable files
   are skipped and listed. Each batch of features goes straight to a pool scorer
   (:mod:`musc_edge.core.pools`), which owns the memory of the scoring: batch MuSc over all images
   (:class:`~musc_edge.core.pools.BatchPool`) or a centred rolling window (``--window W``,
   :class:`~musc_edge.core.pools.StreamPool`).
2. **outputs**: ``scores.csv``, heatmap overlays at the original image size (``--heatmaps``;
   MUSC_SPEC 4: bilinear upsampling of the G x G map), ``metrics.json`` when ground truth exists.
3. **metrics**: image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO (MUSC_SPEC 6) at the
   original image size; maps are upsampled one image at a time from the G x G maps, never all
   held at full size besides the pooled pixel scores the metrics need.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge import __version__
from musc_edge.core.device import resolve_device
from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.core.meta import ModelMeta
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.pools import BatchPool, PoolScorer, ScoreStep, StreamPool, batch_score_step
from musc_edge.core.types import Scores
from musc_edge.datasets import Dataset, Sample, discover, grouped_by_type, order_samples, reference_images
from musc_edge.datasets.evaluation import evaluate, full_size_map
from musc_edge.outputs import heatmap_overlay, output_names, write_csv, write_json, write_png

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreSettings:
    """How to score: the flags of ``musc-edge score``."""

    batch_size: int = 8
    params: MuscParams = DEFAULT_PARAMS
    gt: str = "auto"
    heatmaps: bool = False
    device: str = "auto"
    workers: int = 1
    progress: bool = True
    window: int | None = None  #: stream through a centred rolling window of W images (None: batch MuSc)
    order: str = "name"  #: listing order of the images: "name" or "mtime" (what a window streams in)
    reference: Path | None = None  #: known-good images seeding every window (window mode only)
    layout: str = "auto"  #: dataset layout (musc_edge.datasets.LAYOUTS) or auto
    normal_dir: str | None = None  #: --layout folder: the normal images' folder
    abnormal_dir: str | None = None  #: --layout folder: the abnormal images' folder
    mask_dir: str | None = None  #: --layout folder: the masks' folder
    mem_budget_bytes: int | None = None  #: the window's memory budget (None: a share of what is available)
    score_device: str = "cpu"  #: where MuSc scores: cpu, cuda (CuPy) or auto (--device is the backbone's)
    precision: str = "exact"  #: exact, or fast (FP16 products choose the nearest patch; GPU only)


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
class _Extraction:
    """What the feature stage saw: the scored images in order, skips and timings."""

    samples: list[Sample]
    sizes: list[tuple[int, int]]
    skipped: list[tuple[str, str]]
    decode_s: float
    infer_s: float
    wall_s: float  #: wall time of the stage, less the time spent in the pool scorer
    score_s: float  #: time spent in the pool scorer's ``add`` (streaming: the scoring itself)


def score_folder(data_dir: str | Path, model_path: str | Path, out_dir: str | Path,
                 settings: ScoreSettings = ScoreSettings(), *, score_step: ScoreStep = batch_score_step,
                 extractor: Any = None) -> ScoreResult:
    """Score every image of ``data_dir`` with MuSc and write the outputs into ``out_dir``.

    Batch mode (``settings.window`` None) scores the whole pool with ``score_step``; window mode
    streams it through a centred rolling window in ``settings.order`` (:class:`StreamPool`).
    ``extractor`` (optional) is an already loaded FeatureExtractor, reused instead of loading
    ``model_path`` (the caller then owns and closes it).
    """
    if settings.window is not None and score_step is not batch_score_step:
        raise ValueError("score_step replaces batch MuSc; it does not apply with settings.window")
    if settings.reference is not None and settings.window is None:
        raise InputError("--reference needs --window: without a window every image is already scored "
                         "against all the others")
    for flag, folder in (("--out", out_dir), ("--reference", settings.reference)):
        # discover() leaves out images inside --out and --reference: here that would be all of them
        if folder is not None and Path(folder).resolve() == Path(data_dir).resolve():
            raise InputError(f"{flag} {folder} is the folder being scored; pick another folder "
                             "(a sub-folder is fine for --out)")
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    out_dir = Path(out_dir)
    t = time.perf_counter()
    exclude = [out_dir] + ([settings.reference] if settings.reference is not None else [])
    dataset = discover(data_dir, settings.gt, layout=settings.layout, exclude=exclude,
                       normal_dir=settings.normal_dir, abnormal_dir=settings.abnormal_dir,
                       mask_dir=settings.mask_dir)
    dataset = replace(dataset, samples=order_samples(dataset.samples, settings.order))
    references = reference_images(settings.reference) if settings.reference is not None else []
    timings["discover_s"] = time.perf_counter() - t
    warnings = list(dataset.warnings)
    if settings.window is not None and not references and grouped_by_type(dataset.samples):
        warnings.append(f"--window {settings.window} on an MVTec-style category listed by defect type: a window "
                        "full of one defect lets it match itself and score low; stream in production order "
                        "(--order mtime) or seed every window with good parts (--reference DIR)")
        log.warning("%s", warnings[-1])

    from musc_edge.runtime.model import load_model

    t = time.perf_counter()
    own = extractor is None
    extractor = load_model(model_path, settings.device) if own else extractor
    timings["load_model_s"] = time.perf_counter() - t
    try:
        pool = make_pool_scorer(settings, extractor.meta, len(dataset.samples), score_step, len(references))
        if references:
            t = time.perf_counter()
            _add_references(pool, references, extractor, settings)
            timings["references_s"] = time.perf_counter() - t
        ext = _extract(dataset, extractor, settings, pool)
    finally:
        if own:
            extractor.close()
    timings.update(decode_preprocess_s=ext.decode_s, inference_s=ext.infer_s, features_wall_s=ext.wall_s)
    if len(ext.samples) + len(references) < 2 or not ext.samples:
        raise InputError(f"only {len(ext.samples)} readable image(s) in {data_dir} "
                         f"({len(ext.skipped)} skipped); MuSc scores images against each other and needs >= 2")

    t = time.perf_counter()
    scores = pool.finish()
    timings["score_s"] = ext.score_s + time.perf_counter() - t

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    t = time.perf_counter()
    files["scores"] = str(_write_scores(out_dir, ext.samples, scores))
    timings["write_scores_s"] = time.perf_counter() - t
    if settings.heatmaps:
        t = time.perf_counter()
        files["maps"] = str(_write_heatmaps(out_dir, ext.samples, ext.sizes, scores.patch_maps, warnings))
        timings["heatmaps_s"] = time.perf_counter() - t
    metrics = None
    t = time.perf_counter()
    if dataset.has_labels or any(s.label is not None for s in ext.samples):
        metrics = evaluate(ext.samples, ext.sizes, scores, warnings)
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
        "settings": {"batch": settings.batch_size, "r": list(settings.params.r_list), "k": list(settings.params.k_list),
                     "interval": list(settings.params.interval), "layout": settings.layout,
                     "gt": str(settings.gt), "heatmaps": settings.heatmaps, "device": settings.device,
                     "workers": settings.workers, "scorer": pool.name, "window": settings.window,
                     "score_device": getattr(pool, "device_name", settings.score_device), "precision": settings.precision,
                     "order": settings.order,
                     "reference": None if settings.reference is None else str(settings.reference)},
        "counts": {"found": len(dataset.samples), "scored": len(ext.samples), "skipped": len(ext.skipped),
                   **({"references": len(references)} if references else {})},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "images_per_s_features": round(len(ext.samples) / ext.wall_s, 2) if ext.wall_s > 0 else None,
        "skipped": [{"path": p, "reason": r} for p, r in ext.skipped],
        "warnings": warnings,
        "outputs": files,
    }
    write_json(out_dir / "run.json", run)
    files["run"] = str(out_dir / "run.json")
    return ScoreResult(out_dir=out_dir, samples=ext.samples, sizes=ext.sizes, scores=scores,
                       skipped=ext.skipped, metrics=metrics, run=run, files=files)


def make_pool_scorer(settings: ScoreSettings, meta: ModelMeta, n_images: int,
                     score_step: ScoreStep = batch_score_step, n_references: int = 0) -> PoolScorer:
    """The pool scorer ``settings`` ask for: :class:`StreamPool` with a window, else :class:`BatchPool`."""
    device = resolve_device(settings.score_device, settings.precision)
    if settings.window is None:
        return BatchPool(meta, n_images, settings.params, score_step, device)
    return StreamPool(meta, settings.window, settings.params, mem_budget_bytes=settings.mem_budget_bytes,
                      n_references=n_references, device=device)


def _add_references(pool: PoolScorer, paths: list[Path], extractor: Any, settings: ScoreSettings) -> None:
    """Features of the known-good images go into the window first; an unreadable one is an error."""
    from musc_edge.runtime.pipeline import iter_features

    if not isinstance(pool, StreamPool):
        raise InputError("--reference needs --window")
    for batch in iter_features(paths, extractor, settings.batch_size, workers=settings.workers):
        if batch.skipped:
            path, reason = batch.skipped[0]
            raise InputError(f"reference image {path} cannot be used ({reason}); remove it from {settings.reference}")
        if batch.features is not None:
            pool.add_references(batch.features.tokens, batch.features.embedding)


def _extract(dataset: Dataset, extractor: Any, settings: ScoreSettings, pool: PoolScorer) -> _Extraction:
    """Run the backbone over the data set, handing each batch of readable images to ``pool``."""
    from tqdm import tqdm

    from musc_edge.runtime.pipeline import iter_features

    n = len(dataset.samples)
    by_path = {s.path: s for s in dataset.samples}
    samples: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[tuple[str, str]] = []
    decode_s = infer_s = score_s = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc="features" if isinstance(pool, BatchPool) else "features+score",
               file=sys.stderr, disable=not settings.progress, dynamic_ncols=True)
    try:
        for batch in iter_features([s.path for s in dataset.samples], extractor, settings.batch_size,
                                   workers=settings.workers):
            skipped += [(str(p), reason) for p, reason in batch.skipped]
            decode_s += batch.decode_s
            infer_s += batch.infer_s
            if batch.features is not None:
                t = time.perf_counter()
                pool.add(batch.features.tokens, batch.features.embedding)
                score_s += time.perf_counter() - t
                samples += [by_path[p] for p in batch.paths]
                sizes += list(batch.sizes)
            bar.update(len(batch.paths) + len(batch.skipped))
    finally:
        bar.close()
    return _Extraction(samples=samples, sizes=sizes, skipped=skipped, decode_s=decode_s, infer_s=infer_s,
                       wall_s=time.perf_counter() - t0 - score_s, score_s=score_s)


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


