"""Arrival rules on a fake clock (docs/watch.md, "Which files are scored"): no sleeping.

Files are real (tmp_path); time is not. A FakeClock's wall time starts in 2023, so a file a test
writes has an mtime "in the future" and is never an old backlog unless the test ages it with
``os.utime``.
"""

from __future__ import annotations

import logging
import os

from musc_edge.watch.arrivals import ArrivalTracker, PollSource
from musc_edge.watch.clock import FakeClock


def tracker(root, clock: FakeClock, **kw) -> ArrivalTracker:
    return ArrivalTracker(root, clock=clock.monotonic, wall_clock=clock.wall, **kw)


def age(path, clock: FakeClock, seconds: float) -> None:
    """Give ``path`` an mtime ``seconds`` before the fake wall clock."""
    ns = clock.wall_ns(-seconds)
    os.utime(path, ns=(ns, ns))


def test_waits_exactly_stable_s_and_applies_name_rules(tmp_path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.2)
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.JPG", ".c.png", "d.png.tmp", "e.jpg.part", "f.txt", "sub/g.png"):
        (tmp_path / name).write_bytes(b"x" * 10)
    t.scan()
    assert t.ready() == []  # just written: not stable yet
    clock.advance(0.19)
    assert t.ready() == []
    clock.advance(0.01)
    assert sorted(a.path.name for a in t.ready()) == ["a.png", "b.JPG"]
    assert t.watching == 0


def test_a_growing_file_restarts_the_wait_and_an_empty_one_never_is_ready(tmp_path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.2)
    f = tmp_path / "slow.png"
    f.write_bytes(b"")
    t.nominate(f)
    clock.advance(5.0)
    assert t.ready() == []  # empty: never ready
    f.write_bytes(b"x" * 100)
    assert t.ready() == []  # changed: the wait restarts now
    clock.advance(0.15)
    assert t.ready() == []  # 0.15 s since the change, not 5.15 s since it was first seen
    clock.advance(0.05)
    [a] = t.ready()
    assert a.size == 100


def test_the_arrival_time_is_the_wall_clock_when_first_seen(tmp_path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.2)
    (tmp_path / "a.png").write_bytes(b"x")
    clock.advance(3.0)
    seen = clock.wall()
    t.scan()
    clock.advance(0.5)
    [a] = t.ready()
    assert a.arrived == seen


def test_a_backlog_is_ready_at_once_in_mtime_order(tmp_path) -> None:
    """Files unchanged for longer than stable_s when first seen (start-up) wait no more."""
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.5)
    for name, seconds in (("z.png", 30), ("a.png", 20), ("m.png", 0.1)):
        (tmp_path / name).write_bytes(b"x")
        age(tmp_path / name, clock, seconds)
    t.scan()
    assert [a.path.name for a in t.ready()] == ["z.png", "a.png"]  # oldest mtime first, not by name
    clock.advance(0.38)
    assert t.ready() == []  # m.png was 0.1 s old: it waits the other 0.4 s (margins: ns -> float)
    clock.advance(0.03)
    assert [a.path.name for a in t.ready()] == ["m.png"]


def test_a_handled_file_is_offered_again_only_when_it_changes(tmp_path) -> None:
    t = tracker(tmp_path, FakeClock(), stable_s=0.0)
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    t.scan()
    [a] = t.ready()
    t.mark_handled(a)
    t.scan()
    assert t.ready() == []
    f.write_bytes(b"y" * 20)  # rewritten: a new image
    t.scan()
    assert [x.size for x in t.ready()] == [20]
    f.unlink()
    t.prune_handled()
    assert t.handled == {}


def test_since_and_recursive(tmp_path) -> None:
    clock = FakeClock()
    old = tmp_path / "old.png"
    old.write_bytes(b"x")
    age(old, clock, 10)
    (tmp_path / "line" / ".hidden").mkdir(parents=True)
    (tmp_path / "line" / "n.png").write_bytes(b"x")
    (tmp_path / "line" / ".hidden" / "h.png").write_bytes(b"x")
    (tmp_path / "new.png").write_bytes(b"x")
    t = tracker(tmp_path, clock, recursive=True, stable_s=0.0, since_ns=clock.wall_ns(-1),
                exclude=[tmp_path / "out"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heat.png").write_bytes(b"x")
    t.scan()
    assert sorted(a.path.name for a in t.ready()) == ["n.png", "new.png"]


def test_a_file_that_vanishes_before_it_is_stable_is_forgotten(tmp_path, caplog) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.2)
    f = tmp_path / "gone.png"
    f.write_bytes(b"x")
    t.scan()
    f.unlink()
    clock.advance(1.0)
    with caplog.at_level(logging.INFO, logger="musc_edge.watch.arrivals"):
        assert t.ready() == []
    assert t.watching == 0 and "gone.png vanished" in caplog.text


def test_the_poll_source_scans_once_per_interval_of_its_clock(tmp_path) -> None:
    clock = FakeClock()
    t = tracker(tmp_path, clock, stable_s=0.0)
    source = PollSource(1.0, clock.monotonic)
    (tmp_path / "a.png").write_bytes(b"x")
    source.poll(t)
    assert t.watching == 0  # the caller scanned at start; the next scan is due in 1 s
    clock.advance(0.99)
    source.poll(t)
    assert t.watching == 0
    clock.advance(0.01)
    source.poll(t)
    assert t.watching == 1
    (tmp_path / "b.png").write_bytes(b"x")
    clock.advance(0.5)
    source.poll(t)
    assert t.watching == 1  # half an interval after that scan: b.png not seen yet
    clock.advance(0.5)
    source.poll(t)
    assert t.watching == 2
