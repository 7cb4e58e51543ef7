"""The ``musc-edge watch`` loop: files in, one result line per image out, crash-safe (docs/watch.md).

Glue only: :mod:`musc_edge.watch.arrivals` decides when a file is complete, the runtime turns it into
features, :class:`musc_edge.core.window.RollingScorer` scores it against the rolling pool,
:class:`musc_edge.watch.journal.StateDir` makes every step durable in an order that lets a restart
finish what a crash interrupted (see the journal module for the protocol), and after each commit
:class:`musc_edge.watch.sinks.Dispatcher` wakes the sinks, which read results.jsonl in their own
threads: scoring never waits on an output.

Time is a parameter (STYLE.md): the daemon stamps results with ``wall_clock`` and hands ``clock``
(monotonic) to everything that waits. :meth:`WatchDaemon.session` opens a run and yields its
``tick``, so a test can drive the loop step by step on a :class:`musc_edge.watch.clock.FakeClock`;
:meth:`WatchDaemon.run` is that loop with real waits between idle ticks.

What the line throws at it (docs/watch.md, "What happens when"): a file the OS will not let us read
is retried with backoff, never skipped for good; an exact copy of an image in the pool or already
reported is recognised by its SHA-256 and not scored against itself; a full disk under OUTDIR
pauses the daemon with one line instead of ending it, and the next try starts from the durable
state exactly as a restart would; a heatmap that cannot be written is noted in its result line.

Signals: SIGINT / SIGTERM set a stop flag; the image being added is finished and committed, then
:meth:`WatchDaemon.run` returns (exit 0). Unprocessed files are not journaled and are picked up on
the next start.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np

from .arrivals import Arrival, ArrivalTracker, PollSource, Source, WatchdogSource
from .clock import Clock
from musc_edge.core.errors import ImageDecodeError, InputError, StateError
from musc_edge.core.device import resolve_device
from musc_edge.core.meta import ModelMeta
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.types import Features
from musc_edge.datasets import reference_images

from .copies import ContentIndex
from .heatmaps import HeatmapStore
from .journal import EntryError, StateDir
from .live import LiveStatus
from .paths import json_path, own_folders, readable
from .sinks import Backoff, Dispatcher, Sink, check_names
from musc_edge.core.threshold import Threshold, normalised_score
from musc_edge.core.window import Emission, Entry, RollingScorer, check_pool_memory, check_stream_settings

log = logging.getLogger(__name__)


class Extractor(Protocol):
    """What the daemon needs of a model (``musc_edge.runtime.model.FeatureExtractor`` is one)."""

    @property
    def meta(self) -> ModelMeta: ...

    def __call__(self, batch: np.ndarray) -> Features: ...


#: Images the pool must hold before anything is reported, unless --min-pool says otherwise (capped at
#: the pool's size, so a small --window works without also lowering --min-pool).
DEFAULT_MIN_POOL = 8

#: OS errors that mean "the disk under OUTDIR is full" (a quota counts): the daemon waits for space.
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class WatchConfig:
    """Settings of one watch run; the CLI flags of ``musc-edge watch`` map onto these fields."""

    folder: Path
    out_dir: Path
    window: int = 32
    delay: int = 0
    min_pool: int | None = None  # None: min(DEFAULT_MIN_POOL, window + references)
    reference: Path | None = None
    threshold: float | None = None
    heatmaps: bool = False
    keep_heatmaps: int | None = None  #: --keep-heatmaps: keep the newest N overlays (None: all)
    poll: bool = False
    poll_interval_s: float = 1.0
    new_only: bool = False
    recursive: bool = False
    stable_s: float = 0.5
    batch: int = 8
    max_file_bytes: int | None = None  #: --max-file-size (None: the runtime's limit, 256 MiB)
    params: MuscParams = DEFAULT_PARAMS
    mem_budget_bytes: int | None = None  #: the pool's memory budget (None: a share of what is available)
    score_device: str = "cpu"  #: where the pool lives and scores: cpu, cuda (CuPy) or auto
    precision: str = "exact"  #: exact, or fast (GPU only)
    tick_s: float = 0.05
    sink_retry_s: float = 1.0  #: first delay before a failed sink is tried again; doubles per failure
    sink_retry_max_s: float = 60.0  #: the longest delay between tries of a failed sink
    sink_drain_s: float = 5.0  #: how long a stop waits for the sinks to deliver what is committed
    read_retry_s: float = 1.0  #: first delay before a file the OS would not let us read is tried again
    read_retry_max_s: float = 60.0  #: the longest delay between tries of such a file
    disk_retry_s: float = 1.0  #: first delay before writing to a full disk is tried again
    disk_retry_max_s: float = 60.0  #: the longest delay between tries on a full disk
    http: tuple[str, int] | None = None  #: --http: (host, port) of the live page (docs/line.md); None: no server
    http_token: str | None = None  #: the token every request to the page needs (a non-loopback bind must have one)
    #: --threshold-file: the threshold with its scale; ``threshold`` is then its value, and each
    #: result line carries ``normalised_score``
    threshold_info: Threshold | None = None

    def __post_init__(self) -> None:
        if self.threshold_info is not None:
            if self.threshold is not None and self.threshold != self.threshold_info.value:
                raise InputError("give --threshold or --threshold-file, not both")
            object.__setattr__(self, "threshold", float(self.threshold_info.value))


@dataclass
class WatchSummary:
    """What a run did (for the exit message and for tests)."""

    scored: int = 0
    reported: int = 0
    skipped: int = 0
    replayed: int = 0
    copies: int = 0  #: exact copies of pool or reported images, not scored


def _describe(meta: ModelMeta) -> str:
    return (f"{meta.backbone}/{meta.weights} at {meta.image_size} px "
            f"(layers {list(meta.layers)}, widths {list(meta.token_dims)})")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


@dataclass(frozen=True)
class _Read:
    """A file read, hashed and decoded: the backbone input, the original (h, w), the SHA-256."""

    arrival: Arrival
    x: np.ndarray
    hw: tuple[int, int]
    digest: bytes


class _DiskWait:
    """A full disk under OUTDIR: one log line per outage, retries with backoff on ``clock``."""

    def __init__(self, backoff: Backoff, clock: Clock) -> None:
        self.backoff, self.clock = backoff, clock
        self.failures = 0
        self.retry_at: float | None = None
        self._started = 0.0

    def due(self) -> bool:
        return self.retry_at is None or self.clock() >= self.retry_at

    def failed(self, describe: Callable[[float], str]) -> None:
        now = self.clock()
        self.failures += 1
        delay = self.backoff.delay(self.failures)
        self.retry_at = now + delay
        if self.failures == 1:  # once per outage, like a failing sink
            self._started = now
            log.error("%s", describe(delay))
        else:
            log.info("disk still full (try %d); next try in %.0f s", self.failures, delay)

    def committed(self) -> None:
        """A commit went through: the outage, if any, is over."""
        if self.failures:
            log.warning("disk space is back after %d failed tries (%.1f s): committed again, scoring goes on",
                        self.failures, self.clock() - self._started)
            self.failures, self.retry_at = 0, None


class WatchDaemon:
    """One watch run over a folder. ``run()`` returns when ``stop`` is set (or on a signal).

    ``sinks`` receive every result after results.jsonl holds it (:mod:`musc_edge.watch.sinks`);
    ``clock`` (monotonic) drives every wait, ``wall_clock`` every timestamp. ``status`` is what the
    live page and /metrics read of this process (docs/line.md); with ``config.http`` the session
    serves them.
    """

    def __init__(self, config: WatchConfig, model: Extractor, stop: threading.Event | None = None, *,
                 sinks: Sequence[Sink] = (), clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time, status: LiveStatus | None = None) -> None:
        self.config = config
        self.model = model
        self.meta = model.meta
        self.stop = stop or threading.Event()
        self.sinks = tuple(sinks)
        check_names(self.sinks)  # before anything is opened: a bad list is a user error (exit 2)
        self.clock, self.wall_clock = clock, wall_clock
        self._dispatcher: Dispatcher | None = None
        self.summary = WatchSummary()
        folder = Path(config.folder)
        if not folder.is_dir():
            raise InputError(f"watch folder not found: {folder}; create it or fix the path")
        self.references = reference_images(self.config.reference) if self.config.reference is not None else []
        _check_reference_outside(config.folder, config.reference, config.recursive)
        pool_max = config.window + len(self.references)
        self.min_pool = config.min_pool if config.min_pool is not None else min(DEFAULT_MIN_POOL, pool_max)
        check_stream_settings(config.window, config.delay, self.min_pool, len(self.references))
        self.device = resolve_device(config.score_device, config.precision)
        # the pool's memory is known from the settings: refuse before any image is read
        check_pool_memory(pool_max, self.meta.grid, self.meta.token_dims, len(config.params.r_list),
                          self.meta.embed_dim, config.mem_budget_bytes, self.device, what=f"--window {config.window}",
                          reserved_slots=len(self.references))
        self.settings = self._settings([str(p.resolve()) for p in self.references])
        # OUTDIR may hold the watched folder (--out /data/line1 for /data/line1/incoming): then only
        # what we write is left out, not every file (docs/watch.md, "What happens when")
        self.exclude = own_folders(config.folder, config.out_dir,
                                   [s.folder for s in self.sinks if isinstance(getattr(s, "folder", None), Path)])
        self.heatmaps = (HeatmapStore(Path(config.out_dir) / "heatmaps", config.keep_heatmaps) if config.heatmaps
                         else None)
        self._copies = ContentIndex()
        self._tracker: ArrivalTracker | None = None  # None: the state must be (re)opened first
        self._read_failures: dict[Path, int] = {}
        self._read_backoff = Backoff(config.read_retry_s, config.read_retry_max_s)
        self._disk = _DiskWait(Backoff(config.disk_retry_s, config.disk_retry_max_s), clock)
        self.status = status if status is not None else LiveStatus()
        self.status.update(model=self.meta.backbone, weights=self.meta.weights,
                           device=str(getattr(model, "description", "")), window=config.window,
                           min_pool=self.min_pool, references=len(self.references), threshold=config.threshold,
                           model_loaded=True)

    # ------------------------------------------------------------------------------------ setup
    def _settings(self, references: Sequence[str]) -> dict:
        c = self.config
        return {"window": c.window, "r_list": list(c.params.r_list), "k_list": list(c.params.k_list),
                "interval": list(c.params.interval), "references": list(references),
                # absent from states saved before positional matching: .get() reads None, global
                "match_radius": c.params.match_radius}

    def _new_scorer(self, n_references: int) -> RollingScorer:
        c, m = self.config, self.meta
        return RollingScorer(m.grid, m.token_dims, m.embed_dim, capacity=c.window, delay=c.delay,
                             min_pool=self.min_pool, n_references=n_references, params=c.params,
                             mem_budget_bytes=c.mem_budget_bytes, device=self.device)

    def _open(self, state: StateDir) -> None:
        """Load saved state (checking it fits this model and these settings) or start afresh."""
        saved = state.load_state()
        if saved is None:
            self._start_fresh(state)
            return
        self._check_saved(state, saved)
        self.scorer = self._new_scorer(len(self.references))
        self.next_seq = int(saved["next_seq"])
        self.since_ns = saved.get("since_ns")
        window = saved["window"]
        entries = self._load_entries(state, window["references"] + window["stream"])
        self.scorer.restore(window, entries)
        for seq, entry in entries.items():
            self._copies.add_hex(entry.info.get("sha256"), seq, entry.info.get("path", ""), pinned=seq < 0)
        log.info("resumed %s: %d images in the pool, %d pending, next seq %d", state.dir,
                 len(self.scorer.pool), len(self.scorer.pending), self.next_seq)

    def _check_saved(self, state: StateDir, saved: dict) -> None:
        saved_meta = ModelMeta.from_dict(saved["meta"], source=str(state.state_path))
        if not saved_meta.compatible_with(self.meta):
            raise StateError(f"{state.dir} was made with model {_describe(saved_meta)}, not "
                             f"{_describe(self.meta)}; use that model, or another --out for a new pool")
        settings = self.settings
        changed = [k for k, v in settings.items() if saved["settings"].get(k) != v]
        if changed:
            diff = "; ".join(f"{k}: saved {saved['settings'].get(k)}, now {settings[k]}" for k in changed)
            raise StateError(f"{state.dir} was made with other settings ({diff}); use the same "
                             "settings, or another --out for a new pool")

    def _start_fresh(self, state: StateDir) -> None:
        """A new pool. Its seqs go on after the last one in results.jsonl: a state moved away "to
        start afresh" next to a kept results.jsonl must not reuse seqs, which would be dropped as
        already reported (docs/watch.md, "What happens when")."""
        self.scorer = self._new_scorer(len(self.references))
        self.next_seq = state.last_reported + 1
        self.since_ns = int(self.wall_clock() * 1e9) if self.config.new_only else None
        state.drop_entries_except(set())  # entries of an earlier state are not this pool's
        if self.next_seq:
            log.warning("%s holds no saved state but %s ends at seq %d: a new pool, numbered from %d; images "
                        "already reported there are recognised by their content and not reported again",
                        state.dir, state.results_path, state.last_reported, self.next_seq)
        self._add_references(state, self.references)
        self._commit(state)

    @staticmethod
    def _load_entries(state: StateDir, seqs: Sequence[int]) -> dict[int, Entry]:
        try:
            return {s: state.load_entry(s) for s in seqs}
        except EntryError as e:
            raise StateError(f"{e}: the pool cannot be rebuilt without it. Move {state.dir} away to start a "
                             "new pool: numbering goes on after the last seq in results.jsonl, and images "
                             "already reported are recognised by their content and not reported again") from None

    def _add_references(self, state: StateDir, refs: list[Path]) -> None:
        """Reference images get seqs -R..-1: in the pool, never reported, never evicted."""
        from musc_edge.runtime.preprocess import input_from_bytes, read_image_file

        for i, path in enumerate(refs):
            try:
                data = read_image_file(path, max_bytes=self.config.max_file_bytes)
                x, _ = input_from_bytes(data, self.meta, name=str(path))
            except ImageDecodeError as e:
                raise InputError(f"reference image cannot be used: {e}; remove it from {self.config.reference}") from None
            feats = self.model(x[None])
            seq = i - len(refs)
            digest = hashlib.sha256(data).digest()
            entry = self.scorer.pool.prepare(seq, [t[0] for t in feats.tokens], feats.embedding[0],
                                             info={"path": str(path), "sha256": digest.hex()})
            state.save_entry(entry)
            self.scorer.add_reference(entry)
            self._copies.add(digest, seq, str(path), pinned=True)
        if refs:
            log.info("%d reference images seed the pool", len(refs))

    def _resume(self, state: StateDir, *, reread: bool) -> None:
        """Open the state, finish an interrupted image, and track the folder from what is durable.

        Run at the start and again after a full disk (``reread``: results.jsonl is read again, a
        line torn by the failed write cut off): whatever a failed write left in memory, the files
        on disk are the truth, exactly as after a crash and a restart.
        """
        if reread:
            state.refresh()
        self._copies = ContentIndex()
        self._open(state)
        self._replay(state)
        state.drop_entries_except(set(self.scorer.pool.seqs))
        for sha256, seq, path in state.reported:
            self._copies.add_hex(sha256, seq, path)
        tracker = ArrivalTracker(self.config.folder, recursive=self.config.recursive, stable_s=self.config.stable_s,
                                 exclude=self.exclude, since_ns=self.since_ns, clock=self.clock,
                                 wall_clock=self.wall_clock)
        self._load_journal(state, tracker)
        tracker.scan()
        self._tracker = tracker

    def _replay(self, state: StateDir) -> None:
        """An entry with seq ``next_seq`` was written before a crash: apply it (no backbone)."""
        if state.has_entry(self.next_seq):
            try:
                entry = state.load_entry(self.next_seq)
            except EntryError as e:  # never committed: nothing refers to it, the image is still a file
                log.warning("%s; it was never committed, so it is dropped and its image read again", e)
                state.delete_entry(self.next_seq)
            else:
                self._apply(state, entry, None)
                self.summary.replayed += 1
        if self.next_seq <= state.last_reported:  # results.jsonl is ahead of the state: never reuse a seq
            self.next_seq = state.last_reported + 1

    # ------------------------------------------------------------------------------------ steps
    def _commit(self, state: StateDir) -> None:
        state.save_state({"meta": self.meta.to_dict(), "settings": self.settings,
                          "next_seq": self.next_seq, "since_ns": self.since_ns,
                          "window": self.scorer.state()})
        self._disk.committed()
        self.status.update(pool_size=len(self.scorer.pool))

    def _apply(self, state: StateDir, entry: Entry, tracker: ArrivalTracker | None) -> None:
        """Add a durable entry: push, report, journal, commit, drop the evicted entry."""
        leaving = self.scorer.evictee()
        t0 = time.perf_counter()
        emissions = self.scorer.push(entry)
        self.status.observe("scoring", time.perf_counter() - t0)
        lines = [self._line(e) for e in emissions if e.seq > state.last_reported]
        self.summary.reported += state.report(lines)
        info = entry.info
        state.journal({"seq": entry.seq, "path": info["path"], "size": info["size"],
                       "mtime_ns": info["mtime_ns"]})
        self.next_seq = entry.seq + 1
        self._commit(state)
        if self._dispatcher is not None:  # after the commit: the sinks read what is durable
            self._dispatcher.notify()
        if leaving is not None:
            state.delete_entry(leaving)
        self._copies.add_hex(info.get("sha256"), entry.seq, info["path"])
        if tracker is not None:
            tracker.handled[info["path"]] = (info["size"], info["mtime_ns"])

    def _line(self, e: Emission) -> dict:
        line = {"seq": e.seq, **json_path("path", e.info["path"]), "arrival_time": e.info["arrival_time"],
                "scoring_time": iso_time(self.wall_clock()), "image_score": round(e.image_score, 7),
                "raw_score": round(e.raw_score, 7), "pool_size": e.pool_size}
        if "sha256" in e.info:
            line["sha256"] = e.info["sha256"]
        if self.config.threshold is not None:
            # On the raw score: RsCIN min-max normalises within each window (MUSC_SPEC 5), so the
            # top image of every window scores near 1, defective or not.
            line["verdict"] = "anomalous" if e.raw_score >= self.config.threshold else "good"
        if self.config.threshold_info is not None:
            line["normalised_score"] = round(normalised_score(e.raw_score, self.config.threshold_info), 7)
        if self.heatmaps is not None:
            path, error = self.heatmaps.write(e.seq, e.info["path"], lambda: self._overlay(e))
            line.update(json_path("heatmap", path) if path is not None else {"heatmap": None})
            if error is not None:
                line["heatmap_error"] = error
        return line

    def _overlay(self, e: Emission) -> np.ndarray:
        """Overlay at the original size; colours scaled to the pool's map range (comparable)."""
        from musc_edge.outputs import heatmap_overlay
        from musc_edge.runtime.preprocess import decode_image
        from musc_edge.core.scorer import upsample_map

        image = decode_image(e.info["path"], max_bytes=self.config.max_file_bytes)  # may have vanished: raises
        amap = upsample_map(e.patch_map[None], image.shape[:2])[0]
        return heatmap_overlay(image, amap, *e.map_range)

    def _score(self, state: StateDir, tracker: ArrivalTracker, ready: list[Arrival]) -> None:
        """Score what is ready, a batch at a time (stopping between images)."""
        for start in range(0, len(ready), self.config.batch):
            if self.stop.is_set():
                break
            self._process(state, tracker, ready[start:start + self.config.batch])

    def _process(self, state: StateDir, tracker: ArrivalTracker, arrivals: list[Arrival]) -> None:
        """Read and decode, extract features in one batch, then add the images one by one."""
        kept = [r for r in (self._read(state, tracker, a) for a in arrivals) if r is not None]
        if not kept:
            return
        t0 = time.perf_counter()
        feats = self.model(np.stack([r.x for r in kept]))
        self.status.observe("features", time.perf_counter() - t0)
        for i, r in enumerate(kept):
            if self.stop.is_set():
                return  # not journaled: picked up on the next start
            if self._is_copy(state, tracker, r.arrival, r.digest):  # of an image earlier in this batch
                continue
            a = r.arrival
            info = {"path": str(a.path), "arrival_time": iso_time(a.arrived), "size": a.size,
                    "mtime_ns": a.mtime_ns, "height": r.hw[0], "width": r.hw[1], "sha256": r.digest.hex()}
            entry = self.scorer.prepare(self.next_seq, [t[i] for t in feats.tokens], feats.embedding[i], info)
            state.save_entry(entry)
            self._apply(state, entry, tracker)
            self.summary.scored += 1

    def _read(self, state: StateDir, tracker: ArrivalTracker, a: Arrival) -> _Read | None:
        """Read, hash and decode one file; None when it is skipped, deferred or a copy."""
        from musc_edge.runtime.preprocess import FileReadError, input_from_bytes, read_image_file

        try:
            data = read_image_file(a.path, max_bytes=self.config.max_file_bytes)
        except FileReadError as e:
            if e.errno == errno.ENOENT:  # vanished since it was seen: nothing to wait for
                self._skip(state, tracker, a, str(e))
            else:
                self._retry_later(tracker, a, e)
            return None
        except ImageDecodeError as e:  # what the file holds: final until the file changes
            self._skip(state, tracker, a, str(e))
            return None
        self._readable_again(a)
        digest = hashlib.sha256(data).digest()
        if self._is_copy(state, tracker, a, digest):
            return None
        try:
            x, hw = input_from_bytes(data, self.meta, name=str(a.path))
        except ImageDecodeError as e:
            self._skip(state, tracker, a, str(e))
            return None
        return _Read(a, x, hw, digest)

    def _retry_later(self, tracker: ArrivalTracker, a: Arrival, error: Exception) -> None:
        """A read the OS refused (EACCES, EIO, ESTALE...) passes: try again with backoff, never journal it."""
        failures = self._read_failures.get(a.path, 0) + 1
        self._read_failures[a.path] = failures
        delay = self._read_backoff.delay(failures)
        tracker.defer(a, delay)
        if failures == 1:
            log.warning("%s; not skipped: trying again in %.0f s, then with backoff up to %.0f s until it can be read",
                        readable(str(error)), delay, self._read_backoff.max_s)
        else:
            log.info("%s (try %d); next try in %.0f s", readable(str(error)), failures, delay)

    def _readable_again(self, a: Arrival) -> None:
        failures = self._read_failures.pop(a.path, 0)
        if failures:
            log.warning("%s can be read again after %d failed tries", readable(a.path), failures)

    def _is_copy(self, state: StateDir, tracker: ArrivalTracker, a: Arrival, digest: bytes) -> bool:
        """An exact copy (the same bytes) of a pool or reported image: journaled as a skip with
        ``duplicate_of``, logged, not scored (it would match itself) and not added to the pool."""
        hit = self._copies.get(digest)
        if hit is None:
            return False
        seq, original = hit
        self.summary.copies += 1
        tracker.mark_handled(a)
        if original == str(a.path):  # touched, or a lost journal: the very file that was reported
            log.info("%s: unchanged content, already scored as seq %d; not scored again", readable(a.path), seq)
            reason = f"unchanged content, already scored as seq {seq}"
        else:
            log.warning("%s is an exact copy of seq %d (%s): not scored (it would match itself in the pool) and "
                        "not added to the pool", readable(a.path), seq, readable(original))
            reason = f"an exact copy of seq {seq} ({readable(original)})"
        state.journal({"skip": str(a.path), "size": a.size, "mtime_ns": a.mtime_ns, "reason": reason,
                       "duplicate_of": seq})
        return True

    def _skip(self, state: StateDir, tracker: ArrivalTracker, a: Arrival, reason: str) -> None:
        log.warning("skipped: %s", readable(reason))
        self.summary.skipped += 1
        self.status.skip()
        tracker.mark_handled(a)
        if a.path.exists():  # remembered: not retried unless the file changes
            state.journal({"skip": str(a.path), "size": a.size, "mtime_ns": a.mtime_ns, "reason": reason})

    # ------------------------------------------------------------------------------------ disk full
    def _guarded(self, step: Callable[[], None]) -> bool:
        """Run a step that writes under OUTDIR; a full disk pauses the daemon instead of ending it.

        Nothing is lost: what was not committed is redone from the durable state at the next try
        (:meth:`_resume`, as after a crash), and new files wait in the folder. False: it failed.
        """
        try:
            step()
        except OSError as e:
            if e.errno not in DISK_FULL:
                raise
            self._tracker = None
            self._disk.failed(lambda delay: self._disk_full_message(e, delay))
            return False
        return True

    def _disk_full_message(self, e: OSError, delay: float) -> str:
        """One line: the folder, what it needs, that nothing is lost, when the next try is."""
        c = self.config
        size = self._entry_bytes()
        per_image = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{max(1, round(size / 1e3))} kB"
        also = (", plus its heatmap; --keep-heatmaps N keeps only the newest N" if c.heatmaps else "")
        where = f" ({readable(e.filename)})" if e.filename else ""
        return (f"no space left on the disk of {readable(c.out_dir)}{where}: each image needs about "
                f"{per_image} there (its pool entry{also}); free some space. Nothing is lost: new files wait "
                f"in {readable(c.folder)} and scoring resumes by itself; next try in {delay:.0f} s")

    def _entry_bytes(self) -> int:
        """What one image's entry takes on disk (docs/watch.md, "State and crash safety")."""
        m, c = self.meta, self.config
        patches = m.grid ** 2
        tokens = 4 * sum((1 + patches) * d for d in m.token_dims)
        rows = 8 * (c.window + len(self.references) - 1) * len(m.token_dims) * len(c.params.r_list) * patches
        return tokens + rows + 4 * m.embed_dim + 4096  # + the embedding and the npz's headers and info

    # ------------------------------------------------------------------------------------ run
    def run(self) -> WatchSummary:
        """Tick until ``stop`` is set; between idle ticks wait ``tick_s`` (real time)."""
        with self.session() as tick:
            while not self.stop.is_set():
                if not tick():
                    self.stop.wait(self.config.tick_s)
        return self.summary

    @contextmanager
    def session(self) -> Iterator[Callable[[], bool]]:
        """Open the state (replaying an interrupted image), start the source and the sinks, and
        yield ``tick``: one pass of the loop, True when it handled files. All is closed on exit,
        also when a test simulates a crash by raising a BaseException from a durable step.
        """
        c = self.config
        state = StateDir(c.out_dir)
        restore_signals = self._install_signals()
        source: Source | None = None
        server = None
        try:
            root = Path(c.folder).resolve()
            # the source first: a file that lands while the state opens is nominated by it
            source = PollSource(c.poll_interval_s, self.clock) if c.poll else WatchdogSource(root, c.recursive,
                                                                                             clock=self.clock)
            self._guarded(lambda: self._resume(state, reread=False))
            self._start_sinks(state)
            server = self._start_server(state)
            log.info("watching %s (%s); results in %s", root, "poll" if c.poll else "inotify", state.results_path)
            yield lambda: self._tick(state, source)
        finally:
            if server is not None:
                server.close()
            if source is not None:
                source.close()
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._dispatcher = None
            restore_signals()
            state.close()

    def _tick(self, state: StateDir, source: Source) -> bool:
        """Poll the source, then score what is ready; after a full disk, first reopen the state."""
        if self._tracker is None:
            if not self._disk.due() or not self._guarded(lambda: self._resume(state, reread=True)):
                return False
        tracker = self._tracker
        source.poll(tracker)
        ready = tracker.ready()
        self.status.update(queue_length=len(ready) + tracker.watching + tracker.deferred)
        scored = self._guarded(lambda: self._score(state, tracker, ready))
        if self._tracker is tracker:
            self.status.update(queue_length=tracker.watching + tracker.deferred)
        return scored and bool(ready)

    def _start_server(self, state: StateDir):
        """The live page over results.jsonl and the status (docs/line.md), when --http is set."""
        if self.config.http is None:
            return None
        from .http import LiveServer

        host, port = self.config.http
        return LiveServer(state.results_path, self.status, host=host, port=port,
                          token=self.config.http_token).start()

    def _start_sinks(self, state: StateDir) -> None:
        """One thread per sink, catching up from results.jsonl by its saved seq."""
        if not self.sinks:
            return
        c = self.config
        self._dispatcher = Dispatcher(self.sinks, state.results_path, state.dir, clock=self.clock,
                                      backoff=Backoff(c.sink_retry_s, c.sink_retry_max_s),
                                      drain_s=c.sink_drain_s)
        self._dispatcher.start()
        log.info("sinks: %s", ", ".join(s.name for s in self.sinks))

    def _load_journal(self, state: StateDir, tracker: ArrivalTracker) -> None:
        """Fill the tracker's memory of handled files; compact the journal to files that exist.

        A lost journal is no longer dangerous: the files it knew are recognised by their content
        (results.jsonl and the pool's entries keep their SHA-256) and not reported again.
        """
        if not state.has_journal and (state.last_reported >= 0 or len(self.scorer.pool) > len(self.references)):
            log.warning("%s is missing: files already reported are recognised by their content (sha256 in %s) "
                        "and not reported again; the others are scored", state.journal_path, state.results_path)
        records = state.journal_records(self.next_seq)
        live = []
        for r in records:
            if _read_error_skip(r):
                continue  # an older version journaled a refused read as final: retried now
            path = r.get("path") or r.get("skip")
            if Path(path).exists():
                tracker.handled[path] = (int(r["size"]), int(r["mtime_ns"]))
                live.append(r)
        if len(live) < len(records):
            state.compact_journal(live)

    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, frame):  # noqa: ARG001
            log.warning("%s: finishing the current image, then stopping", signal.Signals(signum).name)
            self.stop.set()

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return lambda: [signal.signal(s, h) for s, h in old.items()]


def _read_error_skip(record: dict) -> bool:
    """A skip an older version journaled for a read the OS refused (keyed on size and mtime, which
    a chmod does not change, so the file was never looked at again)."""
    return "skip" in record and "duplicate_of" not in record and ": cannot read file (" in record.get("reason", "")


def _check_reference_outside(folder: Path, reference: Path | None, recursive: bool) -> None:
    """Reference images inside the watched folder would also be scored, each matching its own copy."""
    if reference is None:
        return
    watched, ref = Path(folder).resolve(), Path(reference).resolve()
    if ref == watched or (recursive and watched in ref.parents):
        raise InputError(f"--reference {reference} is inside the watched folder {folder}: its images would be "
                         "scored against themselves; keep the known-good images in a folder of their own")
