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

Signals: SIGINT / SIGTERM set a stop flag; the image being added is finished and committed, then
:meth:`WatchDaemon.run` returns (exit 0). Unprocessed files are not journaled and are picked up on
the next start.
"""

from __future__ import annotations

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
from musc_edge.core.memory import DEFAULT_SHARE, check_fits, pool_footprint
from musc_edge.core.meta import ModelMeta
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.types import Features
from musc_edge.datasets import reference_images

from .journal import StateDir
from .sinks import Backoff, Dispatcher, Sink, check_names
from musc_edge.core.window import Emission, Entry, RollingScorer, check_stream_settings

log = logging.getLogger(__name__)


class Extractor(Protocol):
    """What the daemon needs of a model (``musc_edge.runtime.model.FeatureExtractor`` is one)."""

    @property
    def meta(self) -> ModelMeta: ...

    def __call__(self, batch: np.ndarray) -> Features: ...


#: Images the pool must hold before anything is reported, unless --min-pool says otherwise (capped at
#: the pool's size, so a small --window works without also lowering --min-pool).
DEFAULT_MIN_POOL = 8

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
    poll: bool = False
    poll_interval_s: float = 1.0
    new_only: bool = False
    recursive: bool = False
    stable_s: float = 0.5
    batch: int = 8
    params: MuscParams = DEFAULT_PARAMS
    mem_budget_bytes: int | None = None  #: the pool's memory budget (None: a share of what is available)
    score_device: str = "cpu"  #: where the pool lives and scores: cpu, cuda (CuPy) or auto
    precision: str = "exact"  #: exact, or fast (GPU only)
    tick_s: float = 0.05
    sink_retry_s: float = 1.0  #: first delay before a failed sink is tried again; doubles per failure
    sink_retry_max_s: float = 60.0  #: the longest delay between tries of a failed sink
    sink_drain_s: float = 5.0  #: how long a stop waits for the sinks to deliver what is committed


@dataclass
class WatchSummary:
    """What a run did (for the exit message and for tests)."""

    scored: int = 0
    reported: int = 0
    skipped: int = 0
    replayed: int = 0


def _describe(meta: ModelMeta) -> str:
    return (f"{meta.backbone}/{meta.weights} at {meta.image_size} px "
            f"(layers {list(meta.layers)}, widths {list(meta.token_dims)})")


def iso_time(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


class WatchDaemon:
    """One watch run over a folder. ``run()`` returns when ``stop`` is set (or on a signal).

    ``sinks`` receive every result after results.jsonl holds it (:mod:`musc_edge.watch.sinks`);
    ``clock`` (monotonic) drives every wait, ``wall_clock`` every timestamp.
    """

    def __init__(self, config: WatchConfig, model: Extractor, stop: threading.Event | None = None, *,
                 sinks: Sequence[Sink] = (), clock: Clock = time.monotonic,
                 wall_clock: Clock = time.time) -> None:
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
        check_fits(pool_footprint(pool_max, self.meta.grid ** 2, self.meta.token_dims, len(config.params.r_list),
                                  self.meta.embed_dim),
                   config.mem_budget_bytes if config.mem_budget_bytes is not None or not self.device.is_gpu
                   else int(self.device.free_bytes() * DEFAULT_SHARE),
                   what=f"--window {config.window}", reserved_slots=len(self.references))
        self.settings = self._settings([str(p.resolve()) for p in self.references])

    # ------------------------------------------------------------------------------------ setup
    def _settings(self, references: Sequence[str]) -> dict:
        c = self.config
        return {"window": c.window, "r_list": list(c.params.r_list), "k_list": list(c.params.k_list),
                "interval": list(c.params.interval), "references": list(references)}

    def _new_scorer(self, n_references: int) -> RollingScorer:
        c, m = self.config, self.meta
        return RollingScorer(m.grid, m.token_dims, m.embed_dim, capacity=c.window, delay=c.delay,
                             min_pool=self.min_pool, n_references=n_references, params=c.params,
                             mem_budget_bytes=c.mem_budget_bytes, device=self.device)

    def _open(self, state: StateDir) -> None:
        """Load saved state (checking it fits this model and these settings) or start afresh."""
        settings, refs = self.settings, self.references
        saved = state.load_state()
        if saved is None:
            self.scorer = self._new_scorer(len(refs))
            self.next_seq = 0
            self.since_ns = int(self.wall_clock() * 1e9) if self.config.new_only else None
            self._add_references(state, refs)
            self._commit(state)
            return
        saved_meta = ModelMeta.from_dict(saved["meta"], source=str(state.state_path))
        if not saved_meta.compatible_with(self.meta):
            raise StateError(f"{state.dir} was made with model {_describe(saved_meta)}, not "
                             f"{_describe(self.meta)}; use that model, or another --out for a new pool")
        changed = [k for k, v in settings.items() if saved["settings"].get(k) != v]
        if changed:
            diff = "; ".join(f"{k}: saved {saved['settings'].get(k)}, now {settings[k]}" for k in changed)
            raise StateError(f"{state.dir} was made with other settings ({diff}); use the same "
                             "settings, or another --out for a new pool")
        self.scorer = self._new_scorer(len(refs))
        self.next_seq = int(saved["next_seq"])
        self.since_ns = saved.get("since_ns")
        window = saved["window"]
        entries = {s: state.load_entry(s) for s in window["references"] + window["stream"]}
        self.scorer.restore(window, entries)
        log.info("resumed %s: %d images in the pool, %d pending, next seq %d", state.dir,
                 len(self.scorer.pool), len(self.scorer.pending), self.next_seq)

    def _add_references(self, state: StateDir, refs: list[Path]) -> None:
        """Reference images get seqs -R..-1: in the pool, never reported, never evicted."""
        for i, path in enumerate(refs):
            try:
                x, _ = self._load(path)
            except ImageDecodeError as e:
                raise InputError(f"reference image cannot be used: {e}; remove it from {self.config.reference}") from None
            feats = self.model(x[None])
            seq = i - len(refs)
            entry = self.scorer.pool.prepare(seq, [t[0] for t in feats.tokens], feats.embedding[0],
                                             info={"path": str(path)})
            state.save_entry(entry)
            self.scorer.add_reference(entry)
        if refs:
            log.info("%d reference images seed the pool", len(refs))

    def _load(self, path: Path) -> tuple[np.ndarray, tuple[int, int]]:
        from musc_edge.runtime.preprocess import load_input

        return load_input(path, self.meta)

    # ------------------------------------------------------------------------------------ steps
    def _commit(self, state: StateDir) -> None:
        state.save_state({"meta": self.meta.to_dict(), "settings": self.settings,
                          "next_seq": self.next_seq, "since_ns": self.since_ns,
                          "window": self.scorer.state()})

    def _apply(self, state: StateDir, entry: Entry, tracker: ArrivalTracker | None) -> None:
        """Add a durable entry: push, report, journal, commit, drop the evicted entry."""
        leaving = self.scorer.evictee()
        emissions = self.scorer.push(entry)
        lines = [self._line(e, state) for e in emissions if e.seq > state.last_reported]
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
        if tracker is not None:
            tracker.handled[info["path"]] = (info["size"], info["mtime_ns"])

    def _line(self, e: Emission, state: StateDir) -> dict:
        line = {"seq": e.seq, "path": e.info["path"], "arrival_time": e.info["arrival_time"],
                "scoring_time": iso_time(self.wall_clock()), "image_score": round(e.image_score, 7),
                "raw_score": round(e.raw_score, 7), "pool_size": e.pool_size}
        if self.config.threshold is not None:
            # On the raw score: RsCIN min-max normalises within each window (MUSC_SPEC 5), so the
            # top image of every window scores near 1, defective or not.
            line["verdict"] = "anomalous" if e.raw_score >= self.config.threshold else "good"
        if self.config.heatmaps:
            line["heatmap"] = self._write_heatmap(e, state)
        return line

    def _write_heatmap(self, e: Emission, state: StateDir) -> str | None:
        """Overlay at the original size; colours scaled to the pool's map range (comparable)."""
        from musc_edge.outputs import heatmap_overlay, write_png
        from musc_edge.runtime.preprocess import decode_image
        from musc_edge.core.scorer import upsample_map

        path = state.out_dir / "heatmaps" / f"{e.seq:08d}_{Path(e.info['path']).stem}.png"
        try:
            image = decode_image(e.info["path"])
        except ImageDecodeError as err:  # vanished since it was scored
            log.warning("no heatmap for %s: %s", e.info["path"], err)
            return None
        amap = upsample_map(e.patch_map[None], image.shape[:2])[0]
        write_png(path, heatmap_overlay(image, amap, *e.map_range))
        return str(path.absolute())  # like "path": usable from any working directory

    def _process(self, state: StateDir, tracker: ArrivalTracker, arrivals: list[Arrival]) -> None:
        """Decode, extract features in one batch, then add the images one by one."""
        inputs, kept = [], []
        for a in arrivals:
            try:
                x, hw = self._load(a.path)
            except ImageDecodeError as e:
                self._skip(state, tracker, a, str(e))
                continue
            inputs.append(x)
            kept.append((a, hw))
        if not inputs:
            return
        feats = self.model(np.stack(inputs))
        for i, (a, hw) in enumerate(kept):
            if self.stop.is_set():
                return  # not journaled: picked up on the next start
            info = {"path": str(a.path), "arrival_time": iso_time(a.arrived), "size": a.size,
                    "mtime_ns": a.mtime_ns, "height": hw[0], "width": hw[1]}
            entry = self.scorer.prepare(self.next_seq, [t[i] for t in feats.tokens], feats.embedding[i], info)
            state.save_entry(entry)
            self._apply(state, entry, tracker)
            self.summary.scored += 1

    def _skip(self, state: StateDir, tracker: ArrivalTracker, a: Arrival, reason: str) -> None:
        log.warning("skipped: %s", reason)
        self.summary.skipped += 1
        tracker.mark_handled(a)
        if a.path.exists():  # remembered: not retried unless the file changes
            state.journal({"skip": str(a.path), "size": a.size, "mtime_ns": a.mtime_ns, "reason": reason})

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
        try:
            self._open(state)
            if state.has_entry(self.next_seq):  # crashed after the entry was written: finish it
                self._apply(state, state.load_entry(self.next_seq), None)
                self.summary.replayed += 1
            state.drop_entries_except(set(self.scorer.pool.seqs))
            self._start_sinks(state)
            tracker = ArrivalTracker(c.folder, recursive=c.recursive, stable_s=c.stable_s,
                                     exclude=[c.out_dir], since_ns=self.since_ns,
                                     clock=self.clock, wall_clock=self.wall_clock)
            self._load_journal(state, tracker)
            source = (PollSource(c.poll_interval_s, self.clock) if c.poll
                      else WatchdogSource(tracker.root, c.recursive, clock=self.clock))
            tracker.scan()
            log.info("watching %s (%s); results in %s", tracker.root, "poll" if c.poll else "inotify",
                     state.results_path)
            yield lambda: self._tick(state, source, tracker)
        finally:
            if source is not None:
                source.close()
            if self._dispatcher is not None:
                self._dispatcher.close()
                self._dispatcher = None
            restore_signals()
            state.close()

    def _tick(self, state: StateDir, source: Source, tracker: ArrivalTracker) -> bool:
        """Poll the source, then score what is ready, a batch at a time (stopping between images)."""
        source.poll(tracker)
        ready = tracker.ready()
        for start in range(0, len(ready), self.config.batch):
            if self.stop.is_set():
                break
            self._process(state, tracker, ready[start:start + self.config.batch])
        return bool(ready)

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
        """Fill the tracker's memory of handled files; compact the journal to files that exist."""
        records = state.journal_records(self.next_seq)
        live = []
        for r in records:
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


def _check_reference_outside(folder: Path, reference: Path | None, recursive: bool) -> None:
    """Reference images inside the watched folder would also be scored, each matching its own copy."""
    if reference is None:
        return
    watched, ref = Path(folder).resolve(), Path(reference).resolve()
    if ref == watched or (recursive and watched in ref.parents):
        raise InputError(f"--reference {reference} is inside the watched folder {folder}: its images would be "
                         "scored against themselves; keep the known-good images in a folder of their own")
