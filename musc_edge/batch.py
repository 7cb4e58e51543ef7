"""Offline scoring of a folder: the library function behind ``musc-edge score``.

``score_folder`` runs these stages, each timed for ``run.json``:

1. **features + score**: the runtime decodes the next batch in a background thread while the
   backbone runs (``musc_edge.runtime.pipeline``); decoded images are never kept, unreadable files
   are skipped and listed. Each batch of features goes straight to a :class:`PoolScorer`, which
   owns the memory of the scoring:

   - :class:`BatchPool` (default): keeps every image's tokens (float16, MUSC_SPEC 8: the pool's
     tokens are the memory bound) and scores the whole pool in one call of a *score step*
     (default: batch MuSc, :func:`musc_edge.score_tokens`, MUSC_SPEC 2-5). Memory O(N).
   - :class:`StreamPool` (``--window W``): pushes each image into a
     :class:`musc_edge.window.CentredStream` as it arrives and keeps only its G x G map and
     scores; at most W images' tokens (plus ``--reference`` images) are ever held. Memory O(W).
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
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import ImageDecodeError, InputError
from .io import (Dataset, Sample, discover, grouped_by_type, heatmap_overlay, order_samples, output_names, read_mask,
                 reference_images, write_csv, write_json, write_png)
from .meta import ModelMeta
from .types import Scores
from .window import CentredStream

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
    window: int | None = None  #: stream through a centred rolling window of W images (None: batch MuSc)
    order: str = "name"  #: listing order of the images: "name" or "mtime" (what a window streams in)
    reference: Path | None = None  #: known-good images seeding every window (window mode only)


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


class PoolScorer(ABC):
    """Takes the pool's features batch by batch as the backbone produces them; scores at the end.

    The one place that decides what of the features is kept, and so the memory of the scoring.
    """

    #: what ``run.json`` calls this scorer
    name: str = "pool"

    @abstractmethod
    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """A batch of images: tokens (b, 1 + G*G, C_l) per tapped layer, embeddings (b, D)."""

    @abstractmethod
    def finish(self) -> Scores:
        """Scores of every image added, in the order added."""


class BatchPool(PoolScorer):
    """Batch MuSc: keep every image's tokens (float16) and score the whole pool in one step."""

    def __init__(self, meta: ModelMeta, capacity: int, settings: ScoreSettings,
                 score_step: ScoreStep = batch_score_step) -> None:
        n_tokens = 1 + meta.grid * meta.grid
        self._tokens = [np.empty((capacity, n_tokens, c), np.float16) for c in meta.token_dims]
        self._embedding = np.empty((capacity, meta.embed_dim), np.float32)
        self._n = 0
        self.r_list, self.k_list, self.score_step = settings.r_list, settings.k_list, score_step
        self.name = getattr(score_step, "__name__", type(score_step).__name__)

    @property
    def tokens(self) -> list[np.ndarray]:
        """The tokens added so far, (n, 1 + G*G, C_l) float16 per tapped layer."""
        return [t[:self._n] for t in self._tokens]

    @property
    def embedding(self) -> np.ndarray:
        return self._embedding[:self._n]

    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        i, b = self._n, len(embedding)
        for layer, t in enumerate(tokens):
            self._tokens[layer][i:i + b] = t
        self._embedding[i:i + b] = embedding
        self._n += b

    def finish(self) -> Scores:
        scores = self.score_step(self.tokens, self.embedding, self.r_list, self.k_list)
        self._tokens, self._embedding = [], np.empty((0, self._embedding.shape[1]), np.float32)  # freed
        return scores


class StreamPool(PoolScorer):
    """``--window W``: each image goes into a :class:`musc_edge.window.CentredStream` as it comes.

    Tokens are cast to float16 first, as :class:`BatchPool` keeps them, so a folder of at most W
    images gets exactly the scores of batch mode.
    """

    def __init__(self, meta: ModelMeta, settings: ScoreSettings) -> None:
        if settings.window is None:
            raise ValueError("StreamPool needs settings.window")
        self.stream = CentredStream(meta.grid, meta.token_dims, meta.embed_dim, window=settings.window,
                                    r_list=settings.r_list, k_list=settings.k_list)
        self.name = f"rolling_window_{settings.window}"

    def add_references(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """A batch of known-good images that seed every window (before the first :meth:`add`)."""
        for i in range(len(embedding)):
            self.stream.add_reference([np.asarray(t[i], np.float16) for t in tokens], embedding[i])

    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        half = [np.asarray(t, np.float16) for t in tokens]
        for i in range(len(embedding)):
            self.stream.push([t[i] for t in half], embedding[i])

    def finish(self) -> Scores:
        return self.stream.finish()


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
    dataset = discover(data_dir, settings.gt, exclude=exclude)
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
        pool = make_pool_scorer(settings, extractor.meta, len(dataset.samples), score_step)
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
        "settings": {"batch": settings.batch_size, "r": list(settings.r_list), "k": list(settings.k_list),
                     "gt": str(settings.gt), "heatmaps": settings.heatmaps, "device": settings.device,
                     "workers": settings.workers, "scorer": pool.name, "window": settings.window,
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
                     score_step: ScoreStep = batch_score_step) -> PoolScorer:
    """The pool scorer ``settings`` ask for: :class:`StreamPool` with a window, else :class:`BatchPool`."""
    if settings.window is None:
        return BatchPool(meta, n_images, settings, score_step)
    return StreamPool(meta, settings)


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
