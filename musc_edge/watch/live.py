"""What the live page and /metrics read: results.jsonl by seq, and a small status the daemon updates.

Two sources, on purpose (docs/line.md, "Live page and metrics"):

- :class:`ResultsLog` reads ``results.jsonl``, the durable record (docs/watch.md, "results.jsonl"),
  incrementally by byte offset, and indexes it by ``seq``. Everything about reported images (the
  counts, the scores, arrival-to-report latency, the images served by seq) comes from there, so
  the page and ``/metrics`` agree with the file, also across restarts;
- :class:`LiveStatus` holds what only the running daemon knows (queue length, the pool, whether
  the model is loaded, feature and scoring latencies, skipped files). The daemon assigns its
  fields through :meth:`LiveStatus.update` from its own thread; the server only reads snapshots.

Memory is bounded: the index keeps two 8-byte integers per line (seq, offset), recent results and
latencies are kept in fixed-size deques.
"""

from __future__ import annotations

import base64
import bisect
import json
import logging
import os
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path

from musc_edge import __version__

from .sinks import complete_lines

log = logging.getLogger(__name__)

#: Histogram buckets in seconds (Prometheus' defaults, widened to a minute for a slow line PC).
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: Stages the daemon times (Prometheus histograms musc_edge_<stage>_seconds).
STAGES = ("features", "scoring")


class LatencyStats:
    """A latency histogram (cumulative buckets, sum, count) and the last ``recent`` values for p50/p95."""

    def __init__(self, recent: int = 1024) -> None:
        self.bucket_counts = [0] * len(BUCKETS_S)
        self.count = 0
        self.sum_s = 0.0
        self._recent: deque[float] = deque(maxlen=recent)

    def observe(self, seconds: float) -> None:
        seconds = max(0.0, float(seconds))
        i = bisect.bisect_left(BUCKETS_S, seconds)  # le: a value on a bound counts in that bucket
        if i < len(BUCKETS_S):
            self.bucket_counts[i] += 1
        self.count += 1
        self.sum_s += seconds
        self._recent.append(seconds)

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, count <= le), ..., ("+Inf", count)] as Prometheus wants them."""
        out, running = [], 0
        for le, n in zip(BUCKETS_S, self.bucket_counts):
            running += n
            out.append((repr(le), running))
        out.append(("+Inf", self.count))
        return out

    def percentiles(self) -> dict:
        """p50 / p95 of the recent values (nearest rank), None before the first."""
        if not self._recent:
            return {"p50": None, "p95": None, "n": 0}
        values = sorted(self._recent)

        def rank(q: float) -> float:
            return values[min(len(values) - 1, max(0, int(q * len(values) + 0.999999) - 1))]

        return {"p50": rank(0.50), "p95": rank(0.95), "n": len(values)}

    def copy(self) -> LatencyStats:
        other = LatencyStats(self._recent.maxlen or 1024)
        other.bucket_counts, other.count, other.sum_s = list(self.bucket_counts), self.count, self.sum_s
        other._recent.extend(self._recent)
        return other


@dataclass
class LiveStatus:
    """The daemon's side of the live page: assign with :meth:`update`, read with :meth:`snapshot`.

    Wiring (docs/line.md, "Wiring"): the daemon sets ``model``/``weights``/``device``/``window``/
    ``min_pool``/``references``/``threshold`` once, ``model_loaded`` after the model is open,
    ``pool_size`` and ``queue_length`` after each tick, calls :meth:`skip` per skipped file and
    :meth:`observe` with the seconds of each feature batch and each scoring step.
    """

    model: str = ""
    weights: str = ""
    device: str = ""
    window: int = 0  #: stream images the pool holds at most (W)
    min_pool: int = 0  #: pool size before anything is reported
    references: int = 0  #: reference images seeding the pool
    threshold: float | None = None  #: on raw_score; drawn on the chart
    pool_size: int = 0  #: images in the pool now, references included
    queue_length: int = 0  #: files seen and not yet scored
    model_loaded: bool = False
    skipped: int = 0  #: files skipped by this process (undecodable); not in results.jsonl
    version: str = __version__
    started_at: float = field(default_factory=time.time)
    latency: dict = field(default_factory=lambda: {s: LatencyStats() for s in STAGES}, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def update(self, **values) -> None:
        names = {f.name for f in fields(self)} - {"latency", "_lock", "version", "started_at"}
        unknown = sorted(set(values) - names)
        if unknown:
            raise AttributeError(f"LiveStatus has no field {', '.join(unknown)} (fields: {', '.join(sorted(names))})")
        with self._lock:
            for k, v in values.items():
                setattr(self, k, v)

    def skip(self, n: int = 1) -> None:
        with self._lock:
            self.skipped += n

    def observe(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        with self._lock:
            self.latency[stage].observe(seconds)

    @property
    def ready(self) -> bool:
        """/readyz: the model is loaded and the pool holds its minimum (results are being reported)."""
        return self.model_loaded and self.pool_size >= self.min_pool

    def snapshot(self) -> dict:
        with self._lock:
            snap = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("latency", "_lock")}
            snap["latency"] = {s: v.copy() for s, v in self.latency.items()}
        snap["ready"] = snap["model_loaded"] and snap["pool_size"] >= snap["min_pool"]
        stream = max(0, snap["pool_size"] - snap["references"])
        snap["window_fill"] = min(1.0, stream / snap["window"]) if snap["window"] else 0.0
        return snap


# ----------------------------------------------------------------------------------------- results
@dataclass
class ResultsSnapshot:
    scored: int
    anomalous: int
    first_seq: int | None
    last_seq: int | None
    last: dict | None
    end_to_end: LatencyStats


class ResultsLog:
    """results.jsonl indexed by seq, read incrementally; :meth:`refresh` picks up new lines.

    Thread-safe: the server's request threads share one instance.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._seqs, self._offsets = array("q"), array("q")
        self._offset = 0
        self._anomalous = 0
        self._last: dict | None = None
        self._e2e = LatencyStats()
        self._bad_lines = 0

    def refresh(self) -> None:
        with self._lock:
            try:
                size = self.path.stat().st_size
            except FileNotFoundError:
                size = 0
            if size < self._offset:  # rotated (docs/watch.md, "Rotating it"): index the new file
                log.info("%s is shorter than the last read: rotated; indexing it afresh", self.path)
                self._reset()
            start = self._offset
            for end, raw in complete_lines(self.path, self._offset):
                self._add(start, raw)
                start = self._offset = end

    def _add(self, offset: int, raw: bytes) -> None:
        try:
            rec = json.loads(raw)
            seq = int(rec["seq"])
        except (ValueError, KeyError, TypeError):
            self._bad_lines += 1
            if self._bad_lines == 1:
                log.warning("%s: a line at byte %d is not a result; skipping such lines", self.path, offset)
            return
        if self._seqs and seq <= self._seqs[-1]:
            return  # reports come in seq order (docs/watch.md); a repeat is not a new image
        self._seqs.append(seq)
        self._offsets.append(offset)
        if rec.get("verdict") == "anomalous":
            self._anomalous += 1
        latency = _latency_s(rec)
        if latency is not None:
            self._e2e.observe(latency)
        self._last = rec

    def snapshot(self) -> ResultsSnapshot:
        with self._lock:
            return ResultsSnapshot(scored=len(self._seqs), anomalous=self._anomalous,
                                   first_seq=self._seqs[0] if self._seqs else None,
                                   last_seq=self._seqs[-1] if self._seqs else None,
                                   last=self._last, end_to_end=self._e2e.copy())

    def after(self, seq: int, limit: int) -> list[dict]:
        """Up to ``limit`` results with a seq above ``seq``, in order."""
        with self._lock:
            i = bisect.bisect_right(self._seqs, seq)
            offsets = list(self._offsets[i:i + limit])
        return self._read(offsets)

    def get(self, seq: int) -> dict | None:
        with self._lock:
            i = bisect.bisect_left(self._seqs, seq)
            if i == len(self._seqs) or self._seqs[i] != seq:
                return None
            offsets = [self._offsets[i]]
        found = self._read(offsets)
        return found[0] if found else None

    def _read(self, offsets: list[int]) -> list[dict]:
        if not offsets:
            return []
        out = []
        try:
            with open(self.path, "rb") as f:
                for off in offsets:
                    f.seek(off)
                    line = f.readline()
                    if not line.endswith(b"\n"):
                        break  # the file was rotated under us
                    try:
                        out.append(json.loads(line))
                    except ValueError:
                        break
        except FileNotFoundError:
            return []
        return out


def file_of(record: dict, key: str) -> str | None:
    """The file a result names under ``key`` (``path``, ``heatmap``), as the file system has it.

    A name that is not UTF-8 is written as readable text in ``key`` plus its exact bytes in
    ``<key>_bytes_b64`` (docs/watch.md, "results.jsonl"); the bytes win when present.
    """
    b64 = record.get(f"{key}_bytes_b64")
    if isinstance(b64, str) and b64:
        try:
            return os.fsdecode(base64.b64decode(b64, validate=True))
        except ValueError:
            return None
    value = record.get(key)
    return value if isinstance(value, str) and value else None


def _latency_s(rec: dict) -> float | None:
    """Arrival to report (docs/watch.md: ``scoring_time - arrival_time``), None if not both there."""
    try:
        a = datetime.fromisoformat(rec["arrival_time"])
        s = datetime.fromisoformat(rec["scoring_time"])
    except (KeyError, TypeError, ValueError):
        return None
    return max(0.0, (s - a).total_seconds())
