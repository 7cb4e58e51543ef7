"""Batched feature extraction that decodes the next batch while the model runs on this one.

A background thread reads, decodes and preprocesses files (:func:`iter_input_batches`) into a
small queue; the calling thread runs the model on each batch as it arrives
(:func:`iter_features`). OpenCV and numpy release the GIL for the heavy work, so decoding and
inference overlap. At most ``prefetch + 1`` preprocessed batches exist at once: memory stays
bounded however long the list of paths is, and decoded images are never kept.

An unreadable file (empty, corrupt, truncated, not an image, too large) is skipped: it is reported
in ``Batch.skipped`` with its one-line reason and never stops the run.

With an input ``geometry`` other than MuSc's square squash (``--resize pad``, ``--tiles``,
:mod:`musc_edge.runtime.geometry`) each image becomes V model inputs, image-major (image i's
views are rows i*V .. i*V + V - 1 of ``inputs``); ``batch_size`` then counts model inputs: a
batch holds ``max(1, batch_size // V)`` images, and an image with more views than ``batch_size``
is run through the model in chunks of ``batch_size``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.core.errors import ImageDecodeError
from musc_edge.core.meta import ModelMeta
from musc_edge.core.types import Features

from .geometry import InputGeometry, View
from .preprocess import load_input, load_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputBatch:
    """Preprocessed images ready for the model.

    inputs: (B, 3, S, S) float32 (B may be 0 when every file of this stretch was skipped).
    paths, sizes: the files and their original (h, w), in input order.
    skipped: (path, reason) for the files of this stretch that could not be read.
    decode_s: seconds spent reading, decoding and preprocessing this batch.
    views: with a geometry, each image's views (then ``inputs`` is (B * V, 3, S, S)); else ().
    """

    inputs: np.ndarray
    paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    skipped: tuple[tuple[Path, str], ...] = ()
    decode_s: float = 0.0
    views: tuple[tuple[View, ...], ...] = ()


@dataclass(frozen=True)
class Batch:
    """Features of one batch: ``features`` is None when the batch holds no readable image.

    With a geometry, ``features`` has one row per view (image-major) and ``views`` the views.
    """

    paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    features: Features | None
    skipped: tuple[tuple[Path, str], ...] = ()
    decode_s: float = 0.0
    infer_s: float = 0.0
    views: tuple[tuple[View, ...], ...] = ()

    def __len__(self) -> int:
        return len(self.paths)


def iter_input_batches(paths: Iterable[str | Path], meta: ModelMeta, batch_size: int, *, workers: int = 1,
                       max_pixels: int | None = None, max_bytes: int | None = None,
                       geometry: InputGeometry | None = None) -> Iterator[InputBatch]:
    """Decode and preprocess ``paths`` into batches of ``batch_size`` readable images (in order).

    ``geometry`` (None: MuSc's square squash, one input per image): see the module docstring.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    per_image = 1 if geometry is None else geometry.views_per_image
    images_per_batch = max(1, batch_size // per_image)

    def load(path: Path):
        t0 = time.perf_counter()
        try:
            if geometry is None:
                array, hw = load_input(path, meta, max_pixels=max_pixels, max_bytes=max_bytes)
                views = None
            else:
                array, hw, views = load_views(path, meta, geometry, max_pixels=max_pixels, max_bytes=max_bytes)
            return path, (array, views), hw, None, time.perf_counter() - t0
        except ImageDecodeError as e:
            reason = str(e).removeprefix(f"{path}: ")
            return path, None, None, reason, time.perf_counter() - t0

    def make(loaded: list, good: list, sizes: list, skipped: list, spent: float) -> InputBatch:
        """One batch from (input(s), views) per image: (3, S, S) each, or (V, 3, S, S) with a geometry."""
        s = meta.image_size
        join = np.stack if geometry is None else np.concatenate
        inputs = join([a for a, _ in loaded]) if loaded else np.zeros((0, 3, s, s), np.float32)
        views = () if geometry is None else tuple(v for _, v in loaded)
        return InputBatch(inputs, tuple(good), tuple(sizes), tuple(skipped), spent, views=views)

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="musc-edge-decode") if workers > 1 else None
    try:
        path_iter = (Path(p) for p in paths)
        results = _bounded_map(pool, load, path_iter, 2 * workers) if pool else map(load, path_iter)
        arrays: list[tuple[np.ndarray, tuple[View, ...] | None]] = []
        good: list[Path] = []
        sizes: list[tuple[int, int]] = []
        skipped: list[tuple[Path, str]] = []
        spent = 0.0
        for path, loaded, hw, reason, dt in results:
            spent += dt
            if reason is not None:
                log.warning("skipped %s: %s", path, reason)
                skipped.append((path, reason))
            else:
                arrays.append(loaded)
                good.append(path)
                sizes.append(hw)
            if len(arrays) == images_per_batch:
                yield make(arrays, good, sizes, skipped, spent)
                arrays, good, sizes, skipped, spent = [], [], [], [], 0.0
        if arrays or skipped:
            yield make(arrays, good, sizes, skipped, spent)
    finally:
        if pool:
            pool.shutdown(wait=True, cancel_futures=True)


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterator, ahead: int) -> Iterator:
    """Like ``pool.map`` (results in order) but with at most ``ahead`` items in flight.

    ``Executor.map`` submits the whole iterable at once, which would decode every image ahead of
    the model and defeat the memory bound.
    """
    pending: deque = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


_DONE = object()


def prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Run ``iterator`` in a background thread, ``depth`` items ahead of the consumer.

    Exceptions raised by the producer are re-raised in the consumer; closing the consumer stops
    the producer.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        """Block until ``item`` is queued or the consumer stops; False when it stopped."""
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in iterator:
                if not put(item):
                    return
            last = _DONE
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            last = e
        put(last)

    thread = threading.Thread(target=produce, name="musc-edge-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def iter_features(paths: Sequence[str | Path], extractor, batch_size: int = 8, *, workers: int = 1,
                  prefetch_batches: int = 2, max_pixels: int | None = None,
                  max_bytes: int | None = None, geometry: InputGeometry | None = None) -> Iterator[Batch]:
    """Features for ``paths``, a batch at a time, decoding ahead in a background thread.

    ``extractor`` is anything with ``.meta`` and ``__call__(batch) -> Features`` (a
    :class:`~musc_edge.runtime.model.FeatureExtractor`). ``workers`` decode threads (1 is enough
    when the model is the bottleneck). ``geometry``: one row of features per view (module docstring).
    """
    inputs = iter_input_batches(paths, extractor.meta, batch_size, workers=workers, max_pixels=max_pixels,
                                max_bytes=max_bytes, geometry=geometry)
    for item in prefetch(inputs, prefetch_batches):
        features = None
        t0 = time.perf_counter()
        if len(item.paths):
            features = _run_chunked(extractor, item.inputs, batch_size)
        yield Batch(paths=item.paths, sizes=item.sizes, features=features, skipped=item.skipped,
                    decode_s=item.decode_s, infer_s=time.perf_counter() - t0, views=item.views)


def _run_chunked(extractor, inputs: np.ndarray, batch_size: int) -> Features:
    """The model on ``inputs``, at most ``batch_size`` at a time (an engine's largest batch, the
    memory of one call): one image's tiles may outnumber the batch."""
    if len(inputs) <= batch_size:
        return extractor(inputs)
    parts = [extractor(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return Features(tokens=tuple(np.concatenate([p.tokens[k] for p in parts]) for k in range(len(parts[0].tokens))),
                    embedding=np.concatenate([p.embedding for p in parts]))
