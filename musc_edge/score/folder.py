"""Offline scoring of a folder: the library function behind ``musc-edge score``.

``score_folder`` runs these stages, each timed for ``run.json``:

1. **features + score**: the runtime decodes the next batch in a background thread while the
   backbone runs (``musc_edge.runtime.pipeline``); decoded images are never kept, unreadable files
   are skipped and listed. Each batch of features goes straight to a pool scorer
   (:mod:`musc_edge.core.pools`), which owns the memory of the scoring: batch MuSc over all images
   (:class:`~musc_edge.core.pools.BatchPool`) or a centred rolling window (``--window W``,
   :class:`~musc_edge.core.pools.StreamPool`).
2. **outputs**: ``scores.csv``, heatmaps (``--heatmaps``; MUSC_SPEC 4: bilinear upsampling of
   the G x G map): an overlay at the original image size in ``maps/`` and a panel a person reads
   in ``panels/`` (:mod:`musc_edge.outputs.heatmap`), ``metrics.json`` when ground truth exists.
   An output that cannot be written (a name too long for the file system, a full disk) is a
   warning in ``run.json``, never the end of the run: the remaining outputs are still written.
3. **metrics**: image AUROC/AP/F1-max and pixel AUROC/AP/F1-max/AUPRO (MUSC_SPEC 6) at the
   original image size; maps are upsampled one image at a time from the G x G maps, never all
   held at full size besides the pooled pixel scores the metrics need.

Input geometry (``settings.resize`` ``pad``, ``settings.tiles``; batch mode only): each image
becomes one letterboxed input or R x C tiles (:mod:`musc_edge.runtime.geometry`), scored by
:class:`musc_edge.score.geometry.GeometryPool`; maps are cropped and stitched back at the
original size for heatmaps and pixel metrics.

Batch MuSc multiplies every image pair (MUSC_SPEC 3): its time grows as N^2. Before the features
are computed, :func:`estimate_score_seconds` puts a rough figure on it and a batch run that would
take longer than :data:`SLOW_SCORE_WARN_S` warns in one line (and in ``run.json``), suggesting
``--window``. Progress of the scoring is drawn here, from callbacks of the pool scorer (the core
draws nothing): per (layer, r) MSM call in batch mode, per scored image with ``--window``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge import __version__
from musc_edge.core.device import resolve_device
from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.core.meta import ModelMeta
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.consistent import ConsistentScoreStep
from musc_edge.core.pools import BatchPool, PoolScorer, ScoreStep, StreamPool, batch_score_step
from musc_edge.core.types import Scores
from musc_edge.datasets import Dataset, Sample, discover, grouped_by_type, order_samples, reference_images
from musc_edge.datasets.evaluation import evaluate, full_size_map
from musc_edge.outputs import (RUN_SCALE, colour_range, heatmap_overlay, heatmap_panel, output_names, verdict,
                               write_csv, write_json, write_png)
from musc_edge.runtime.geometry import InputGeometry, TileSpec

from .geometry import MSM_BUDGET_BYTES, GeometryPool, ImageMaps

log = logging.getLogger(__name__)

#: Rough sustained rate (FLOP/s) of MuSc's pair products per scoring device, for the batch-time
#: estimate. cpu: measured on this project's workstation (2 shared cores of an AMD EPYC, AVX2):
#: the 40-image sample with EfficientNet-Lite0 (grid 28, C = 40 + 112, r = 1,3,5) scores in
#: 12.7 s, 34 GFLOP/s of pair products (README "Benchmarks" has 158 GFLOP/s for ViT-B/16's
#: C = 768, which BLAS runs nearer its peak). cuda: an assumption, not measured here.
SCORE_RATE_FLOPS: dict[str, float] = {"cpu": 3.0e10, "cuda": 2.0e12}

#: ``--repeated-defects``: MuSc as it is, or consistent anomalies filtered (musc_edge.core.consistent).
REPEATED_DEFECTS = ("keep", "filter")

#: A batch ``score`` estimated to take longer than this warns and suggests ``--window``.
SLOW_SCORE_WARN_S = 600.0

#: The window the warning suggests: O(N * 64) pair products instead of O(N^2).
SUGGESTED_WINDOW = 64

#: Failed heatmap writes listed one by one in ``run.json``; the rest are counted in one line.
_MAX_HEATMAP_WARNINGS = 20


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
    max_file_bytes: int | None = None  #: --max-file-size (None: the runtime's limit, 256 MiB)
    threshold: float | None = None  #: on the raw score: verdict column, heatmap verdict and contour
    heatmap_scale: str | tuple[float, float] = RUN_SCALE  #: "run" (the run's map range) or a fixed (lo, hi)
    resize: str = "squash"  #: "squash" (MUSC_SPEC 1) or "pad" (aspect kept, padding masked out); batch mode only
    tiles: TileSpec | None = None  #: R x C tiles per image (batch mode only); None: one input per image
    tile_match: str = "aligned"  #: with tiles: "aligned" (same tile position) or "any" (every other image's tile)
    #: "keep" (MuSc) or "filter": groups of images sharing a repeated defect do not score each other
    #: (musc_edge.core.consistent; batch mode with the square squash only)
    repeated_defects: str = "keep"

    @property
    def geometry(self) -> InputGeometry:
        """The input geometry these settings ask for (:mod:`musc_edge.runtime.geometry`)."""
        return InputGeometry(resize=self.resize, tiles=self.tiles or TileSpec())


@dataclass
class ScoreResult:
    """What ``score_folder`` produced (also on disk under ``out_dir``).

    ``scores.patch_maps`` are the model-grid maps: (N, G, G), pad cells included with
    ``--resize pad``, and (N, R*C, G, G) per tile with ``--tiles``; ``maps`` then gives each image's
    map at its original size (cropped, stitched), as the heatmaps and pixel metrics use it.
    """

    out_dir: Path
    samples: list[Sample]
    sizes: list[tuple[int, int]]
    scores: Scores
    skipped: list[tuple[str, str]]
    metrics: dict | None
    run: dict
    files: dict[str, str] = field(default_factory=dict)
    #: with --resize pad or --tiles: the full-size maps (cropped, stitched); None: upsampled patch_maps
    maps: ImageMaps | None = None


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


def _check_consistent_table(meta: Any, n_images: int, budget: int | None) -> None:
    """``--repeated-defects filter`` keeps one (N, L, N) float32 table of nearest-patch distances
    (musc_edge.core.consistent); over the memory budget it is refused in one line."""
    from musc_edge.core.memory import default_budget

    need = 4 * n_images * n_images * meta.grid * meta.grid
    limit = budget if budget is not None else default_budget()
    if limit is not None and need > limit:
        gib = 1 << 30
        raise InputError(f"--repeated-defects filter needs {need / gib:.1f} GiB for its distance table of {n_images} "
                         f"images ({n_images} x {meta.grid * meta.grid} x {n_images} float32), over the budget of "
                         f"{limit / gib:.1f} GiB; score fewer images at once, or raise --mem-budget")


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
    geometry = settings.geometry
    if settings.window is not None and not geometry.is_default:
        raise InputError("--tiles and --resize pad are batch-mode options: the rolling window (--window) neither "
                         "masks padding nor pools tiles; drop --window or those flags")
    if not geometry.is_default and score_step is not batch_score_step:
        raise ValueError("score_step replaces batch MuSc; it does not apply with --tiles or --resize pad")
    if settings.repeated_defects not in REPEATED_DEFECTS:
        raise InputError(f"--repeated-defects expects one of {', '.join(REPEATED_DEFECTS)}, "
                         f"got {settings.repeated_defects!r}")
    consistent = None
    if settings.repeated_defects == "filter":
        if settings.window is not None or not geometry.is_default or score_step is not batch_score_step:
            raise InputError("--repeated-defects filter works on a batch pool of squashed images: drop --window, "
                             "--tiles and --resize pad, or use --reference DIR with --window")
        score_step = consistent = ConsistentScoreStep()
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
        if consistent is not None:  # its (N, L, N) distance table is held whole: refuse before extracting
            _check_consistent_table(extractor.meta, len(dataset.samples), settings.mem_budget_bytes)
        estimate_s = _warn_if_slow(settings, extractor.meta, len(dataset.samples), warnings)
        tally = _Tally()
        score_bar = _ProgressBar(settings.progress, desc="score", unit="MSM")
        progress = score_bar if settings.window is None else tally
        pool = make_pool_scorer(settings, extractor.meta, len(dataset.samples), score_step, len(references),
                                progress=progress)
        if references:
            t = time.perf_counter()
            _add_references(pool, references, extractor, settings)
            timings["references_s"] = time.perf_counter() - t
        ext = _extract(dataset, extractor, settings, pool, scored=tally if settings.window is not None else None)
    finally:
        if own:
            extractor.close()
    timings.update(decode_preprocess_s=ext.decode_s, inference_s=ext.infer_s, features_wall_s=ext.wall_s)
    if len(ext.samples) + len(references) < 2 or not ext.samples:
        raise InputError(f"only {len(ext.samples)} readable image(s) in {data_dir} "
                         f"({len(ext.skipped)} skipped); MuSc scores images against each other and needs >= 2")

    t = time.perf_counter()
    try:
        scores = pool.finish()
    finally:
        score_bar.close()
    timings["score_s"] = ext.score_s + time.perf_counter() - t
    maps = pool.maps if isinstance(pool, GeometryPool) else None

    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    t = time.perf_counter()
    files["scores"] = str(_write_scores(out_dir, ext.samples, scores, settings.threshold))
    timings["write_scores_s"] = time.perf_counter() - t
    heatmap_range = None
    if settings.heatmaps:
        t = time.perf_counter()
        heatmap_range = (colour_range(scores.patch_maps, settings.heatmap_scale) if maps is None else
                         colour_range(np.array(maps.value_range()), settings.heatmap_scale))
        files["maps"], files["panels"] = (str(p) for p in _write_heatmaps(
            out_dir, ext.samples, ext.sizes, scores, settings, heatmap_range, warnings, maps))
        timings["heatmaps_s"] = time.perf_counter() - t
    metrics = None
    t = time.perf_counter()
    if dataset.has_labels or any(s.label is not None for s in ext.samples):
        metrics = evaluate(ext.samples, ext.sizes, scores, warnings,
                           maps=None if maps is None else maps.sequence(ext.sizes))
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
                     "interval": list(settings.params.interval),
                     "match_radius": settings.params.match_radius, "layout": settings.layout,
                     "gt": str(settings.gt), "heatmaps": settings.heatmaps, "device": settings.device,
                     "workers": settings.workers, "scorer": pool.name, "window": settings.window,
                     "score_device": getattr(pool, "device_name", settings.score_device),
                     "precision": settings.precision, "order": settings.order,
                     "reference": None if settings.reference is None else str(settings.reference),
                     "threshold": settings.threshold, "heatmap_scale": settings.heatmap_scale,
                     "resize": settings.resize, "tiles": None if settings.tiles is None else str(settings.tiles),
                     "tile_match": settings.tile_match if settings.tiles is not None else None,
                     "repeated_defects": settings.repeated_defects,
                     **({"heatmap_range": list(heatmap_range)} if heatmap_range is not None else {})},
        "counts": {"found": len(dataset.samples), "scored": len(ext.samples), "skipped": len(ext.skipped),
                   **({"references": len(references)} if references else {})},
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "score_estimate_s": None if estimate_s is None else round(estimate_s, 1),
        "images_per_s_features": round(len(ext.samples) / ext.wall_s, 2) if ext.wall_s > 0 else None,
        "skipped": [{"path": p, "reason": r} for p, r in ext.skipped],
        "warnings": warnings,
        "outputs": files,
    }
    if consistent is not None:  # the images of each repeated-defect group, which did not score each other
        run["repeated_defect_groups"] = [[str(ext.samples[i].path) for i in g] for g in consistent.groups]
        if consistent.groups:
            log.info("repeated defects: %d group(s) of images took each other out of their intervals: %s",
                     len(consistent.groups), "; ".join(str(len(g)) for g in consistent.groups))
    write_json(out_dir / "run.json", run)
    files["run"] = str(out_dir / "run.json")
    return ScoreResult(out_dir=out_dir, samples=ext.samples, sizes=ext.sizes, scores=scores,
                       skipped=ext.skipped, metrics=metrics, run=run, files=files, maps=maps)


def make_pool_scorer(settings: ScoreSettings, meta: ModelMeta, n_images: int,
                     score_step: ScoreStep = batch_score_step, n_references: int = 0,
                     progress: Callable[[int, int], None] | None = None) -> PoolScorer:
    """The pool scorer ``settings`` ask for: :class:`StreamPool` with a window, else :class:`BatchPool`.

    ``progress(done, total)`` is the scorer's: (layer, r) MSM calls in batch mode, (images scored,
    images added) with a window.
    """
    device = resolve_device(settings.score_device, settings.precision)
    if settings.window is None and not settings.geometry.is_default:
        return GeometryPool(meta, n_images, settings.geometry, settings.tile_match, settings.params, device,
                            mem_budget_bytes=settings.mem_budget_bytes, progress=progress)
    if settings.window is None:
        return BatchPool(meta, n_images, settings.params, score_step, device, progress=progress)
    return StreamPool(meta, settings.window, settings.params, mem_budget_bytes=settings.mem_budget_bytes,
                      n_references=n_references, device=device, progress=progress)


def estimate_score_seconds(n_images: int, meta: ModelMeta, params: MuscParams, device_name: str = "cpu",
                           window: int | None = None) -> float:
    """Rough seconds MuSc's pair products take on ``device_name`` (:data:`SCORE_RATE_FLOPS`).

    One image pair costs L^2 * C * 2 FLOPs per (layer, r), L = G * G patches (MUSC_SPEC 3: one
    product gives both directions); batch MuSc multiplies N(N-1)/2 pairs, twice over when its
    distance table (N x L x N float32) exceeds MSM's memory budget. A window of W multiplies each
    image with the W in the pool when it joins: N * W pairs (core/window.py).
    """
    patches = meta.grid * meta.grid
    flop_per_pair = 2.0 * patches * patches * sum(meta.token_dims) * len(params.r_list)
    pairs = n_images * (n_images - 1) / 2
    if window is not None and n_images > window:  # up to one window it is one batch pool
        pairs = float(n_images * window)
    elif 4.0 * n_images * n_images * patches > MSM_BUDGET_BYTES:  # owner blocks: most pairs twice (core/msm.py)
        pairs *= 2
    rate = SCORE_RATE_FLOPS.get(device_name, SCORE_RATE_FLOPS["cpu"])
    return pairs * flop_per_pair / rate


def _warn_if_slow(settings: ScoreSettings, meta: ModelMeta, n_images: int, warnings: list[str]) -> float | None:
    """Batch mode: warn (one line, and in ``warnings``) when the estimate passes the limit; return it."""
    if settings.window is not None:
        return None
    device = "cuda" if settings.score_device == "cuda" else "cpu"  # auto: the CPU's slower figure
    per_image = settings.geometry.views_per_image
    if per_image > 1:  # aligned: V pools of N tiles; any: one pool of N * V tiles
        estimate = (estimate_score_seconds(n_images * per_image, meta, settings.params, device)
                    if settings.tile_match == "any" else
                    per_image * estimate_score_seconds(n_images, meta, settings.params, device))
        if estimate > SLOW_SCORE_WARN_S:
            warnings.append(f"batch scoring of {n_images} images x {per_image} tiles (--tile-match "
                            f"{settings.tile_match}): roughly {_duration(estimate)} of MuSc on {device}; fewer tiles"
                            + (", --tile-match aligned" if settings.tile_match == "any" else "")
                            + " or a smaller --r list shorten it")
            log.warning("%s", warnings[-1])
        return estimate
    estimate = estimate_score_seconds(n_images, meta, settings.params, device)
    if estimate > SLOW_SCORE_WARN_S:
        windowed = estimate_score_seconds(n_images, meta, settings.params, device, window=SUGGESTED_WINDOW)
        advice = (f"--window {SUGGESTED_WINDOW} scores each image against its {SUGGESTED_WINDOW} neighbours instead "
                  f"(O(N*W), roughly {_duration(windowed)})" if windowed < estimate else
                  "a smaller --r list or fewer images shorten it")
        warnings.append(f"batch scoring of {n_images} images multiplies every pair of them (O(N^2)): roughly "
                        f"{_duration(estimate)} of MuSc on {device}; {advice}")
        log.warning("%s", warnings[-1])
    return estimate


def _duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.5 h``: the precision a rough estimate deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class _ProgressBar:
    """A tqdm bar driven by the core's ``progress(done, total)`` callbacks (the core has no tqdm).

    Made on the first call, so it starts after the feature bar has closed instead of under it.
    """

    def __init__(self, enabled: bool, desc: str, unit: str) -> None:
        self.enabled, self.desc, self.unit = enabled, desc, unit
        self._bar: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=self.desc, unit=self.unit, file=sys.stderr, dynamic_ncols=True)
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@dataclass
class _Tally:
    """The last ``progress(done, total)`` of a streaming pool: images scored of images added.

    With ``bar`` (the feature bar) set, the count is shown beside it as images are scored, at
    most twice a second, so a batch of slow window updates is not a silent stretch.
    """

    done: int = 0
    total: int = 0
    bar: Any = None
    _shown_at: float = 0.0

    def __call__(self, done: int, total: int) -> None:
        self.done, self.total = done, total
        if self.bar is not None and time.monotonic() - self._shown_at >= 0.5:
            self.bar.set_postfix_str(f"scored {done}")
            self._shown_at = time.monotonic()


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


def _extract(dataset: Dataset, extractor: Any, settings: ScoreSettings, pool: PoolScorer,
             scored: _Tally | None = None) -> _Extraction:
    """Run the backbone over the data set, handing each batch of readable images to ``pool``.

    ``scored`` (streaming): the pool's count of images scored, shown beside the images read.
    """
    from tqdm import tqdm

    from musc_edge.runtime.pipeline import iter_features

    n = len(dataset.samples)
    geometry = None if settings.geometry.is_default else settings.geometry
    by_path = {s.path: s for s in dataset.samples}
    samples: list[Sample] = []
    sizes: list[tuple[int, int]] = []
    skipped: list[tuple[str, str]] = []
    decode_s = infer_s = score_s = 0.0
    t0 = time.perf_counter()
    bar = tqdm(total=n, unit="img", desc="features" if isinstance(pool, BatchPool) else "features+score",
               file=sys.stderr, disable=not settings.progress, dynamic_ncols=True)
    if scored is not None:
        scored.bar = bar
    try:
        for batch in iter_features([s.path for s in dataset.samples], extractor, settings.batch_size,
                                   workers=settings.workers, max_bytes=settings.max_file_bytes, geometry=geometry):
            skipped += [(str(p), reason) for p, reason in batch.skipped]
            decode_s += batch.decode_s
            infer_s += batch.infer_s
            if batch.features is not None:
                t = time.perf_counter()
                if isinstance(pool, GeometryPool):
                    pool.add(batch.features.tokens, batch.features.embedding, views=batch.views)
                else:
                    pool.add(batch.features.tokens, batch.features.embedding)
                score_s += time.perf_counter() - t
                samples += [by_path[p] for p in batch.paths]
                sizes += list(batch.sizes)
            if scored is not None:
                bar.set_postfix_str(f"scored {scored.done}", refresh=False)
            bar.update(len(batch.paths) + len(batch.skipped))
    finally:
        if scored is not None:
            scored.bar = None
        bar.close()
    return _Extraction(samples=samples, sizes=sizes, skipped=skipped, decode_s=decode_s, infer_s=infer_s,
                       wall_s=time.perf_counter() - t0 - score_s, score_s=score_s)


def _write_scores(out_dir: Path, samples: list[Sample], scores: Scores, threshold: float | None = None) -> Path:
    """``scores.csv``: path, scores, the verdict with a threshold, the label where known."""
    with_label = any(s.label is not None for s in samples)
    columns = (["path", "image_score", "raw_score"] + (["verdict"] if threshold is not None else [])
               + (["label"] if with_label else []))
    rows = []
    for s, final, raw in zip(samples, scores.image_scores, scores.image_scores_raw):
        row = [str(s.path), float(final), float(raw)]
        if threshold is not None:
            row.append(verdict(raw, threshold))
        if with_label:
            row.append("" if s.label is None else int(s.label))
        rows.append(row)
    path = out_dir / "scores.csv"
    write_csv(path, columns, rows)
    return path


def _write_heatmaps(out_dir: Path, samples: list[Sample], sizes: list[tuple[int, int]], scores: Scores,
                    settings: ScoreSettings, colour: tuple[float, float], warnings: list[str],
                    maps: ImageMaps | None = None) -> tuple[Path, Path]:
    """Per image: the overlay at its original size (``maps/``) and the panel (``panels/``).

    ``maps`` (--resize pad, --tiles): the cropped and stitched full-size maps; else the patch maps
    upsampled (MUSC_SPEC 4).

    One colour scale ``colour`` for the run (``--heatmap-scale``). A heatmap that cannot be written
    is a warning and the next one is tried: an output never costs the run its other outputs.
    """
    from tqdm import tqdm

    from musc_edge.runtime.preprocess import decode_image

    maps_dir, panels_dir = out_dir / "maps", out_dir / "panels"
    vmin, vmax = colour
    note = _scale_note(settings.heatmap_scale, vmin, vmax)
    failed: list[str] = []
    items = zip(range(len(samples)), samples, sizes, output_names(samples), scores.image_scores_raw,
                scores.image_scores)
    for i, s, hw, name, raw, final in tqdm(items, total=len(samples), desc="heatmaps", unit="img",
                                              file=sys.stderr, disable=not settings.progress, dynamic_ncols=True):
        try:
            image = decode_image(s.path)
        except ImageDecodeError as e:  # the file changed since it was scored
            warnings.append(f"no heatmap for {s.rel}: {e}")
            continue
        if image.shape[:2] != tuple(hw):
            warnings.append(f"no heatmap for {s.rel}: the file changed size since it was scored")
            continue
        amap = full_size_map(scores.patch_maps[i], hw) if maps is None else maps.full(i, hw)
        renders = ((maps_dir / name, partial(heatmap_overlay, image, amap, vmin, vmax, threshold=settings.threshold)),
                   (panels_dir / name, partial(heatmap_panel, image, amap, vmin, vmax, title=s.rel, raw_score=raw,
                                               image_score=final, threshold=settings.threshold, scale_note=note)))
        for path, render in renders:
            try:
                write_png(path, render())
            except OSError as e:  # ENAMETOOLONG, ENOSPC, EACCES: this output is lost, not the run
                failed.append(f"{path.relative_to(out_dir)} not written for {s.rel}: {e.strerror or e}")
    _record_failures(failed, warnings)
    return maps_dir, panels_dir


def _record_failures(failed: list[str], warnings: list[str]) -> None:
    """The first failed writes one per line, the rest as a count (a full disk fails every one)."""
    for line in failed[:_MAX_HEATMAP_WARNINGS]:
        warnings.append(line)
        log.warning("%s", line)
    if len(failed) > _MAX_HEATMAP_WARNINGS:
        warnings.append(f"... and {len(failed) - _MAX_HEATMAP_WARNINGS} more heatmaps not written")
        log.warning("%s", warnings[-1])


def _scale_note(scale: str | tuple[float, float], vmin: float, vmax: float) -> str:
    """What the panel's colours mean, and how to make them comparable across runs."""
    if scale == RUN_SCALE:
        return f"colours: this run's range {vmin:.4g} .. {vmax:.4g} (fix it: --heatmap-scale LO,HI)"
    return f"colours: fixed scale {vmin:.4g} .. {vmax:.4g} (--heatmap-scale)"
