"""Outputs of the watch daemon: sinks that consume results.jsonl by sequence number.

STYLE.md, "Outputs as sinks over a durable log" (the outbox pattern): ``results.jsonl`` is the
durable record, written first and exactly once by :class:`musc_edge.watch.journal.StateDir`
(docs/watch.md, "State and crash safety"). Every other output is a *sink* behind the small
:class:`Sink` protocol, fed from that file, never from memory:

- a sink remembers the last ``seq`` it delivered in ``state/sinks/<name>.seq`` (rewritten
  atomically after each delivery), so after a restart or an outage it catches up from the file;
- delivery is *at least once, in seq order, none missing*: a crash between ``emit`` and the save
  delivers that one line again; each result carries its ``seq``, so a sink can drop repeats;
- a sink that raises is logged once per outage (not once per line), retried with a doubling
  delay on a clock (STYLE.md, "Time as a parameter"), and resumes from its saved seq;
  ``results.jsonl`` is never touched by a sink.

Why a thread per sink rather than emitting in the daemon's loop: scoring must never wait on an
output (a broker that hangs for a minute would stall the line). The daemon's only call after a
commit is :meth:`Dispatcher.notify`, which sets an event: the bounded hand-off holds no data, so
nothing is lost when a sink is behind; the sink's thread reads the lines from ``results.jsonl``.
One thread per sink also keeps a slow sink from delaying the others. A sink's ``emit`` and
``close`` are only ever called from its own thread, so a sink need not be thread-safe.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Protocol, Sequence

from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.errors import InputError, StateError

from .clock import Clock

log = logging.getLogger(__name__)

#: A sink's name names its file in state/sinks/: letters, digits, '_', '-', '.', not hidden.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: Bytes read from results.jsonl at a time (a long outage leaves a backlog to catch up in pieces).
_CHUNK = 1 << 20


class Sink(Protocol):
    """An output of watch results. ``emit`` raising means "not delivered, try again later"."""

    name: str

    def emit(self, result: dict) -> None: ...

    def close(self) -> None: ...


# ----------------------------------------------------------------------------------------- built-in
class FolderSink:
    """One JSON file per result, ``<folder>/<seq:08d>.json`` (like anomalib's folder sink).

    Written atomically with fsync: a consumer never sees half a file, and the file is on disk
    before the saved seq says it was delivered, so a power cut cannot lose one. A repeat after a
    crash rewrites the same file with the same content: for this sink, at least once is exactly once.
    """

    def __init__(self, folder: Path | str, name: str = "folder") -> None:
        self.folder = Path(folder)
        self.name = name

    def emit(self, result: dict) -> None:
        path = self.folder / f"{int(result['seq']):08d}.json"
        atomic_write_bytes(path, (json.dumps(result) + "\n").encode(), fsync=True)

    def close(self) -> None:
        pass


# ----------------------------------------------------------------------------------------- pieces
class Backoff:
    """Delay before retry n (1-based): ``initial_s`` doubling up to ``max_s``."""

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0) -> None:
        if not 0 < initial_s <= max_s:
            raise InputError(f"sink retry delays must satisfy 0 < initial ({initial_s}) <= max ({max_s})")
        self.initial_s, self.max_s = float(initial_s), float(max_s)

    def delay(self, failures: int) -> float:
        return min(self.max_s, self.initial_s * 2.0 ** min(failures - 1, 62))


def complete_lines(path: Path, offset: int) -> Iterator[tuple[int, bytes]]:
    """(end offset, line) of each complete line after byte ``offset``; a last line without its
    newline is being written (or was cut by a crash) and is left for later (docs/watch.md,
    "Reading it"). A file shorter than ``offset`` was rotated: read it from the start.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        if os.fstat(f.fileno()).st_size < offset:
            log.info("%s is shorter than the last read: rotated; reading it from the start", path)
            offset = 0
        f.seek(offset)
        rest = b""
        while chunk := f.read(_CHUNK):
            data = rest + chunk
            pos = 0
            while (nl := data.find(b"\n", pos)) >= 0:
                yield offset + nl + 1, data[pos:nl]
                pos = nl + 1
            offset, rest = offset + pos, data[pos:]


class SeqFile:
    """``state/sinks/<name>.seq``: the last seq a sink delivered (-1: none yet)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return -1
        try:
            return int(text.strip())
        except ValueError:
            raise StateError(f"{self.path} does not hold a seq ({text[:20]!r}); delete it to deliver "
                             "results.jsonl to that sink again from the start") from None

    def save(self, seq: int) -> None:
        # fsync before the rename: after a power cut the file holds the old seq (one line sent
        # again) or the new one, never nothing; paid in the sink's thread, never in scoring.
        atomic_write_bytes(self.path, f"{seq}\n".encode(), fsync=True)


# ----------------------------------------------------------------------------------------- one feed
class SinkFeed:
    """One sink, its saved seq and its place in results.jsonl. :meth:`pump` delivers what is there.

    Not thread-safe: one caller at a time (the sink's thread, or a test stepping a fake clock).
    """

    def __init__(self, sink: Sink, results_path: Path, seq_dir: Path, *, clock: Clock = time.monotonic,
                 backoff: Backoff | None = None) -> None:
        self.sink = sink
        self.results_path = Path(results_path)
        self.seq_file = SeqFile(Path(seq_dir) / f"{sink.name}.seq")
        self.clock = clock
        self.backoff = backoff or Backoff()
        self.delivered = self.seq_file.load()
        self.failures = 0  # consecutive failed tries in the current outage
        self.retry_at: float | None = None  # clock time of the next try while in an outage
        self._offset = 0  # byte offset in results.jsonl after the last line looked at
        self._outage_started = 0.0

    def pump(self, abort: Callable[[], bool] = lambda: False) -> None:
        """Deliver every complete line after the saved seq, in order, until one fails or ``abort``."""
        if self.retry_at is not None and self.clock() < self.retry_at:
            return  # backing off: the line stays in results.jsonl
        while True:
            progressed = False
            for end, raw in complete_lines(self.results_path, self._offset):
                if abort():
                    return
                if not self._deliver(raw):
                    return
                self._offset, progressed = end, True
            if not progressed:  # nothing new since the last read
                return

    def wait_s(self, idle_s: float) -> float:
        """How long the thread may sleep: until the next retry, else ``idle_s`` (a notify wakes it)."""
        if self.retry_at is None:
            return idle_s
        return max(0.0, min(idle_s, self.retry_at - self.clock()))

    def _deliver(self, raw: bytes) -> bool:
        """Emit one line unless it was delivered already; False when the sink failed."""
        try:
            result = json.loads(raw)
            seq = int(result["seq"])
            if seq <= self.delivered:
                return True
            self.sink.emit(result)
            self.seq_file.save(seq)
        except Exception as e:  # noqa: BLE001 - any sink error is an outage, never the daemon's
            self._failed(e)
            return False
        self.delivered = seq
        if self.failures:
            self._recovered()
        return True

    def _failed(self, error: Exception) -> None:
        now = self.clock()
        self.failures += 1
        delay = self.backoff.delay(self.failures)
        self.retry_at = now + delay
        if self.failures == 1:  # once per outage, not once per line or per retry
            self._outage_started = now
            log.warning("sink %s failed after seq %d (%s: %s); results.jsonl keeps every line, retrying "
                        "with backoff from seq %d", self.sink.name, self.delivered, type(error).__name__,
                        error, self.delivered + 1)
        else:
            log.debug("sink %s: try %d failed (%s); next in %.1f s", self.sink.name, self.failures, error, delay)

    def _recovered(self) -> None:
        log.warning("sink %s recovered after %d failed tries (%.1f s); delivered up to seq %d, catching up",
                    self.sink.name, self.failures, self.clock() - self._outage_started, self.delivered)
        self.failures, self.retry_at = 0, None


# ----------------------------------------------------------------------------------------- dispatcher
class Dispatcher:
    """Feeds each sink from results.jsonl, one thread per sink once :meth:`start` is called.

    Without :meth:`start`, :meth:`pump` delivers synchronously (tests on a fake clock).
    """

    def __init__(self, sinks: Sequence[Sink], results_path: Path, state_dir: Path, *,
                 clock: Clock = time.monotonic, backoff: Backoff | None = None, drain_s: float = 5.0,
                 idle_s: float = 1.0) -> None:
        check_names(sinks)
        seq_dir = Path(state_dir) / "sinks"
        self.feeds = [SinkFeed(s, results_path, seq_dir, clock=clock, backoff=backoff) for s in sinks]
        self.drain_s = float(drain_s)
        self.idle_s = float(idle_s)
        self._workers: list[_Worker] = []

    def start(self) -> None:
        self._workers = [_Worker(feed, self.idle_s) for feed in self.feeds]
        for w in self._workers:
            w.start()

    def notify(self) -> None:
        """New lines were committed: wake the sinks. Never blocks (sets one event per sink)."""
        for w in self._workers:
            w.wake.set()

    def pump(self) -> None:
        """Deliver synchronously, each sink in turn (only when not started)."""
        if self._workers:
            raise RuntimeError("Dispatcher.pump() with the sink threads running")
        for feed in self.feeds:
            feed.pump()

    def close(self) -> None:
        """Let each sink deliver what is committed (up to ``drain_s`` in all), then close it.

        A sink still busy after that is left to finish its current line in its (daemon) thread and
        is not closed; its saved seq says where the next start resumes.
        """
        for w in self._workers:
            w.stopping.set()
            w.wake.set()
        deadline = time.monotonic() + self.drain_s  # real time: how long a stop may take
        for w in self._workers:
            w.join(timeout=max(0.0, deadline - time.monotonic()))
            if w.is_alive():
                w.abort.set()
                log.warning("sink %s still busy after %.1f s; it resumes after seq %d at the next start",
                            w.feed.sink.name, self.drain_s, w.feed.delivered)
        busy = {id(w.feed) for w in self._workers if w.is_alive()}
        for feed in self.feeds:
            if id(feed) not in busy:
                _close_sink(feed.sink)
        self._workers = []


class _Worker(threading.Thread):
    """The thread of one sink: pump, then sleep until notified, a retry is due, or ``idle_s``."""

    def __init__(self, feed: SinkFeed, idle_s: float) -> None:
        super().__init__(name=f"sink-{feed.sink.name}", daemon=True)
        self.feed, self.idle_s = feed, idle_s
        self.wake, self.stopping, self.abort = threading.Event(), threading.Event(), threading.Event()

    def run(self) -> None:
        while True:
            # Both read before the pump: a notify during the pump is not lost, and a pump that
            # began after the stop request (so after the last commit) is the final drain.
            final = self.stopping.is_set()
            self.wake.clear()
            try:
                self.feed.pump(self.abort.is_set)
            except Exception:  # noqa: BLE001 - pump catches sink errors; this is a last resort
                log.exception("sink %s: unexpected error; the thread goes on", self.feed.sink.name)
            if final:
                return
            self.wake.wait(self.feed.wait_s(self.idle_s))


def check_names(sinks: Sequence[Sink]) -> None:
    """Each sink's name must be unique and usable as a file name (it names its saved seq)."""
    names = [getattr(s, "name", None) for s in sinks]
    for name in names:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise InputError(f"sink name {name!r} cannot name a file in state/sinks/: use letters, digits, "
                             "'_', '-' or '.', starting with a letter or digit")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"two sinks named {', '.join(dupes)}: give each sink its own name (it names the "
                         "file that remembers what the sink delivered)")


def _close_sink(sink: Sink) -> None:
    try:
        sink.close()
    except Exception as e:  # noqa: BLE001 - closing an output must not fail a clean stop
        log.warning("sink %s: close failed (%s: %s)", sink.name, type(e).__name__, e)
