"""Clocks for the watch daemon: time as a parameter (STYLE.md, "Time as a parameter").

Everything in watch that waits (arrival stability, polling, sink backoff) or stamps a time reads a
clock it was given instead of :mod:`time`, so tests advance a :class:`FakeClock` instead of
sleeping. A clock is any callable returning seconds; there are two kinds:

- a *monotonic* clock (default :func:`time.monotonic`) for intervals: it never jumps when the
  wall clock is set (NTP on a line PC);
- a *wall* clock (default :func:`time.time`) for timestamps in results.jsonl and for comparing
  with file mtimes, which are wall-clock times.
"""

from __future__ import annotations

import threading
from typing import Callable

#: A callable returning seconds: ``time.monotonic`` for waits, ``time.time`` for timestamps.
Clock = Callable[[], float]

#: Where a FakeClock's wall time starts: 2023-11-14 22:13:20 UTC, before any file a test writes,
#: so a real file's mtime is "in the future" (never an old backlog) unless a test sets it.
FAKE_EPOCH = 1_700_000_000.0


class FakeClock:
    """Both kinds of clock, moved only by :meth:`advance` (thread-safe: sink threads read it).

    ``clock.monotonic`` and ``clock.wall`` are the callables to pass; ``wall() - monotonic()`` stays
    ``FAKE_EPOCH`` (or the ``wall`` given).
    """

    def __init__(self, wall: float = FAKE_EPOCH) -> None:
        self._t = 0.0
        self._offset = float(wall)
        self._lock = threading.Lock()

    def monotonic(self) -> float:
        with self._lock:
            return self._t

    def wall(self) -> float:
        with self._lock:
            return self._offset + self._t

    def wall_ns(self, delta_s: float = 0.0) -> int:
        """Wall time (plus ``delta_s``) in ns, e.g. for ``os.utime`` on a file a test ages."""
        return int(round((self.wall() + delta_s) * 1e9))

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back: advance({seconds})")
        with self._lock:
            self._t += seconds
