"""Which files in a watched folder are new, complete images (docs/watch.md, "Which files are scored").

Cameras and copy tools write files in pieces. A file is offered for scoring only when

1. its name is an image name (jpg/png/bmp/tiff, and gif, which the caller skips with its reason)
   that is not hidden: names starting with '.' and names ending in ``.tmp`` / ``.part`` are
   ignored, so write-then-rename is always safe;
2. its size and mtime have not changed for ``stable_s`` seconds and it is not empty;
3. (checked by the caller) it decodes; a file that does not decode is skipped, and looked at again
   only if it changes later (a writer that paused longer than ``stable_s``). A file the OS would
   not let the caller read (permissions, I/O, a stale NFS handle) is not skipped: the caller
   defers it (:meth:`ArrivalTracker.defer`), and it is offered again when its delay has passed.

Two sources tell the tracker about files: watchdog (inotify on Linux) by default, and polling
(``--poll``) for network mounts where inotify sees nothing. Both only *nominate* paths; the tracker
stats them itself, so a missed or duplicated event changes nothing. An inotify watch dies with its
folder, so the watchdog source checks the folder's identity and re-arms on a folder deleted and
created again (docs/watch.md, "What happens when").

The tracker and the poll source read the clocks they are given (:mod:`musc_edge.watch.clock`):
``clock`` (monotonic) for how long a file has been stable and when the next poll is due,
``wall_clock`` for arrival stamps and the comparison with file mtimes.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol

from musc_edge.datasets import is_image_name

from .clock import Clock

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    size: int
    mtime_ns: int
    first_seen: float  # wall_clock time the file was first seen (its arrival time)
    changed_at: float  # clock (monotonic) time of the last size/mtime change


@dataclass(frozen=True)
class Arrival:
    """A file that looks complete: path, its size and mtime when it was judged stable, arrival time."""

    path: Path
    size: int
    mtime_ns: int
    arrived: float


class ArrivalTracker:
    """Keeps nominated files until they are stable; remembers files already handled.

    ``handled`` maps a path to the (size, mtime_ns) it had when processed or skipped: the file is
    not offered again unless it changes (a skipped file that is rewritten gets another try).
    """

    def __init__(self, root: Path, *, recursive: bool = False, stable_s: float = 0.5,
                 exclude: Iterable[Path] = (), since_ns: int | None = None,
                 clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self.root = Path(root).resolve()
        self.clock, self.wall_clock = clock, wall_clock
        self.recursive = recursive
        self.stable_s = float(stable_s)
        self.exclude = tuple(Path(p).resolve() for p in exclude)
        self.since_ns = since_ns
        self.handled: dict[str, tuple[int, int]] = {}
        self._watching: dict[Path, _Watch] = {}
        self._deferred: dict[Path, tuple[float, Arrival]] = {}  # path -> (clock time due, the arrival)

    def accepts(self, path: Path) -> bool:
        """Name and place rules (not the content): image name, in the root (or below it)."""
        if not is_image_name(path.name):  # also refuses x.png.tmp, x.jpg.part, .hidden.png
            return False
        try:
            rel = path.relative_to(self.root)
        except ValueError:
            return False
        if len(rel.parts) > 1 and (not self.recursive or any(p.startswith(".") for p in rel.parts[:-1])):
            return False
        return not any(path.is_relative_to(ex) for ex in self.exclude)

    def nominate(self, path: Path | str) -> None:
        """A source saw ``path`` appear or change."""
        path = Path(path)
        if not path.is_absolute():
            path = self.root / path
        if not self.accepts(path) or path in self._watching or path in self._deferred:
            return
        try:
            st = path.stat()
        except OSError:
            return
        if self.since_ns is not None and st.st_mtime_ns < self.since_ns:
            return
        if self.handled.get(str(path)) == (st.st_size, st.st_mtime_ns):
            return
        # Unchanged for stable_s already (a backlog at start-up): ready at the next check, so a
        # backlog is taken in mtime order rather than in the order the folder listing gave.
        wall = self.wall_clock()
        age = max(0.0, wall - st.st_mtime_ns / 1e9)
        self._watching[path] = _Watch(st.st_size, st.st_mtime_ns, wall, self.clock() - min(age, self.stable_s))

    def ready(self) -> list[Arrival]:
        """Files that have been stable for ``stable_s``, oldest mtime first. They stop being watched."""
        now = self.clock()
        self._wake_deferred(now)
        out = []
        for path, w in list(self._watching.items()):
            try:
                st = path.stat()
            except OSError:
                log.info("%s vanished before it was complete; ignored", path)
                del self._watching[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (w.size, w.mtime_ns):
                w.size, w.mtime_ns, w.changed_at = st.st_size, st.st_mtime_ns, now
            elif st.st_size > 0 and now - w.changed_at >= self.stable_s:
                out.append(Arrival(path, st.st_size, st.st_mtime_ns, w.first_seen))
                del self._watching[path]
        return sorted(out, key=lambda a: (a.mtime_ns, str(a.path)))

    def defer(self, arrival: Arrival, delay_s: float) -> None:
        """Offer ``arrival`` again once ``delay_s`` seconds of ``clock`` have passed.

        For a read that failed for a reason that may pass (docs/watch.md, "What happens when"):
        until then scans do not nominate the file, so the caller's backoff holds.
        """
        self._deferred[arrival.path] = (self.clock() + float(delay_s), arrival)

    def _wake_deferred(self, now: float) -> None:
        """Deferred files that are due are watched again, stable already unless they changed."""
        for path, (due, a) in list(self._deferred.items()):
            if now >= due:
                del self._deferred[path]
                self._watching[path] = _Watch(a.size, a.mtime_ns, a.arrived, now - self.stable_s)

    @property
    def watching(self) -> int:
        return len(self._watching)

    @property
    def deferred(self) -> int:
        return len(self._deferred)

    def mark_handled(self, arrival: Arrival) -> None:
        self.handled[str(arrival.path)] = (arrival.size, arrival.mtime_ns)

    def scan(self) -> None:
        """Nominate every accepted file in the folder (start-up, and each poll)."""
        for path in _walk(self.root, self.recursive):
            self.nominate(path)

    def prune_handled(self) -> None:
        """Forget handled files that are gone, so memory stays flat on a line that cleans up."""
        self.handled = {p: v for p, v in self.handled.items() if os.path.exists(p)}


def _walk(root: Path, recursive: bool) -> Iterable[Path]:
    try:
        with os.scandir(root) as it:
            entries = list(it)
    except OSError as e:
        log.warning("cannot list %s: %s", root, e)
        return
    for e in entries:
        if e.name.startswith("."):
            continue
        try:
            if e.is_file():
                yield Path(e.path)
            elif recursive and e.is_dir(follow_symlinks=False):
                yield from _walk(Path(e.path), recursive)
        except OSError:
            continue


# ----------------------------------------------------------------------------------------- sources
class Source(Protocol):
    """Tells a tracker about files: ``poll()`` is called every loop tick; ``close()`` once."""

    def poll(self, tracker: ArrivalTracker) -> None: ...

    def close(self) -> None: ...


class PollSource:
    """Rescan the folder every ``interval_s`` seconds (network mounts: no inotify events)."""

    def __init__(self, interval_s: float = 1.0, clock: Clock = time.monotonic) -> None:
        self.interval_s = float(interval_s)
        self.clock = clock
        self._next = clock() + self.interval_s  # the caller scans once at start
        self._scans = 0

    def poll(self, tracker: ArrivalTracker) -> None:
        now = self.clock()
        if now >= self._next:
            tracker.scan()
            self._next = now + self.interval_s
            self._scans += 1
            if self._scans % 100 == 0:
                tracker.prune_handled()

    def close(self) -> None:
        pass


def folder_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, None when it is not there: a folder deleted and created
    again under the same name is another folder, and an inotify watch on the old one is dead."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class WatchdogSource:
    """Filesystem events from watchdog (inotify on Linux); its thread only queues paths.

    Every ``check_s`` seconds of ``clock`` the source checks that its watch still hears the
    folder (watchdog's emitter is alive and the folder's identity is the one it was armed on):
    after ``rm -rf in && mkdir in`` or ``mv in old && mkdir in`` the old watch hears nothing, so the
    source logs it, arms a new one and has the folder rescanned (files written meanwhile are
    found). A folder that is gone is logged once and waited for.
    """

    def __init__(self, root: Path, recursive: bool, rescan_s: float = 30.0, clock: Clock = time.monotonic,
                 check_s: float = 1.0) -> None:
        self.root, self.recursive = Path(root), recursive
        self.clock, self.check_s = clock, float(check_s)
        self._queue: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._observer = None
        self._armed_on = self._arm()
        self._next_check = clock() + self.check_s
        self._said_gone = False
        self._seen = 0
        self._rescan = PollSource(rescan_s, clock)

    def _arm(self) -> tuple[int, int] | None:
        """Start an observer on the folder as it is now; its identity (None: not there, no observer)."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        identity = folder_identity(self.root)
        if identity is None:
            return None
        q = self._queue

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # created, modified, closed, moved (to)
                if event.is_directory or event.event_type == "deleted":
                    return
                q.put(getattr(event, "dest_path", "") or event.src_path)

        observer = Observer()
        observer.schedule(Handler(), str(self.root), recursive=self.recursive)
        observer.daemon = True
        observer.start()
        self._observer = observer
        return identity

    def _alive(self) -> bool:
        """watchdog stops a folder's emitter when the folder is deleted (IN_DELETE_SELF); checked as
        well as the identity because a new folder often gets the old one's inode number."""
        return self._observer is not None and all(e.is_alive() for e in self._observer.emitters)

    def _disarm(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def _check_folder(self, tracker: ArrivalTracker) -> None:
        """Re-arm on a replaced folder (docs/watch.md, "What happens when")."""
        now = self.clock()
        if now < self._next_check:
            return
        self._next_check = now + self.check_s
        current = folder_identity(self.root)
        if current is not None and current == self._armed_on and self._alive():
            return
        self._disarm()
        self._armed_on = None
        if current is None:
            if not self._said_gone:
                log.warning("watched folder %s is gone; waiting for it to come back", self.root)
                self._said_gone = True
            return
        self._armed_on = self._arm()
        self._said_gone = False
        log.warning("watched folder %s was deleted and created again: inotify re-armed on the new folder, "
                    "which is scanned now", self.root)
        tracker.scan()

    def poll(self, tracker: ArrivalTracker) -> None:
        self._rescan.poll(tracker)  # a slow rescan as a safety net (inotify queue overflow)
        self._check_folder(tracker)
        while True:
            try:
                path = self._queue.get_nowait()
            except queue.Empty:
                break
            tracker.nominate(path)
            self._seen += 1
            if self._seen % 1000 == 0:
                tracker.prune_handled()

    def close(self) -> None:
        self._disarm()
