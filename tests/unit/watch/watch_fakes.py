"""Test doubles for the watch unit tests: sinks that fail on cue, and a daemon stepped by hand.

Everything here runs on a :class:`musc_edge.watch.clock.FakeClock` (STYLE.md, "Time as a
parameter"): a test advances the clock and ticks the daemon instead of sleeping, so "not yet
stable", "backing off" and "nothing more arrives" are exact statements, not timing guesses.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import replace
from pathlib import Path

from musc_edge.watch.clock import FakeClock
from musc_edge.watch.daemon import WatchConfig, WatchDaemon, WatchSummary

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "integration"))
from watch_helpers import config, part_image, results, tiny_model, write_png  # noqa: E402,F401

#: Poll interval of a stepped daemon (fake seconds; 1/16 is exact in binary, so sums of steps are
#: exact): every step of settle() is longer, so each one scans.
POLL_S = 0.0625


class Stepped:
    """A WatchDaemon driven tick by tick on a FakeClock, with the poll source (no inotify thread)."""

    def __init__(self, cfg: WatchConfig, model, clock: FakeClock, sinks=()) -> None:
        self.clock = clock
        self.daemon = WatchDaemon(replace(cfg, poll=True, poll_interval_s=POLL_S), model, sinks=sinks,
                                  clock=clock.monotonic, wall_clock=clock.wall)

    def __enter__(self) -> "Stepped":
        self._session = self.daemon.session()
        self._tick = self._session.__enter__()
        return self

    def __exit__(self, *exc) -> bool | None:
        return self._session.__exit__(*exc)

    def step(self, dt: float = 0.0) -> bool:
        """Advance the fake clock by ``dt`` seconds, then run one tick of the loop."""
        self.clock.advance(dt)
        return self._tick()

    def settle(self) -> None:
        """Long enough for a file written before the call to be scanned, become stable and be handled."""
        dt = self.daemon.config.stable_s + POLL_S  # strictly longer than both, whatever the rounding
        self.step(dt)  # the poll scan nominates it
        self.step(dt)  # stable for stable_s: read, scored or skipped

    @property
    def summary(self) -> WatchSummary:
        return self.daemon.summary


class RecordingSink:
    """Keeps what it was given; ``fail`` is how many emits raise before it works (an outage)."""

    def __init__(self, name: str = "rec", fail: int = 0, clock: FakeClock | None = None) -> None:
        self.name, self.fail, self.clock = name, fail, clock
        self.emitted: list[dict] = []
        self.tries: list[float] = []  # clock time of each emit call, failed or not
        self.closed = False

    @property
    def seqs(self) -> list[int]:
        return [r["seq"] for r in self.emitted]

    def emit(self, result: dict) -> None:
        self.tries.append(self.clock.monotonic() if self.clock else 0.0)
        if self.fail > 0:
            self.fail -= 1
            raise ConnectionError("broker unreachable")
        self.emitted.append(result)

    def close(self) -> None:
        self.closed = True


class DeadSink(RecordingSink):
    """Never delivers."""

    def __init__(self, name: str = "dead") -> None:
        super().__init__(name, fail=10**9)


class BlockedSink(RecordingSink):
    """Hangs in its first emit until ``release`` is set (or ``limit_s`` real seconds pass)."""

    def __init__(self, name: str = "hung", limit_s: float = 5.0) -> None:
        super().__init__(name)
        self.entered, self.release = threading.Event(), threading.Event()
        self.limit_s = limit_s
        self.returned = 0  # emits that have returned

    def emit(self, result: dict) -> None:
        if not self.entered.is_set():  # only the first: a test that waited on it fails in limit_s
            self.entered.set()
            self.release.wait(self.limit_s)
        super().emit(result)
        self.returned += 1
