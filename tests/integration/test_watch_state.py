"""The watch daemon's building blocks: arrival rules and the durable state files (issue 4)."""

from __future__ import annotations

import json
import os
import time

import pytest

from musc_edge.watch.arrivals import ArrivalTracker
from musc_edge.core.errors import StateError
from musc_edge.watch.journal import StateDir, read_jsonl


def test_tracker_waits_for_stability_and_applies_name_rules(tmp_path) -> None:
    t = ArrivalTracker(tmp_path, stable_s=0.2)
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.JPG", ".c.png", "d.png.tmp", "e.jpg.part", "f.txt", "sub/g.png"):
        (tmp_path / name).write_bytes(b"x" * 10)
    t.scan()
    assert t.ready() == []  # just written: not stable yet
    time.sleep(0.25)
    assert sorted(a.path.name for a in t.ready()) == ["a.png", "b.JPG"]
    assert t.watching == 0


def test_tracker_restarts_the_clock_when_a_file_grows_and_skips_empty_files(tmp_path) -> None:
    t = ArrivalTracker(tmp_path, stable_s=0.2)
    f = tmp_path / "slow.png"
    f.write_bytes(b"")
    t.nominate(f)
    time.sleep(0.25)
    assert t.ready() == []  # empty: never ready
    f.write_bytes(b"x" * 100)
    assert t.ready() == []  # changed: the clock restarts
    time.sleep(0.25)
    [a] = t.ready()
    assert a.size == 100


def test_tracker_offers_a_handled_file_again_only_when_it_changes(tmp_path) -> None:
    t = ArrivalTracker(tmp_path, stable_s=0.0)
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


def test_tracker_since_and_recursive(tmp_path) -> None:
    old = tmp_path / "old.png"
    old.write_bytes(b"x")
    os.utime(old, ns=(time.time_ns() - 10**10, time.time_ns() - 10**10))
    (tmp_path / "line" / ".hidden").mkdir(parents=True)
    (tmp_path / "line" / "n.png").write_bytes(b"x")
    (tmp_path / "line" / ".hidden" / "h.png").write_bytes(b"x")
    (tmp_path / "new.png").write_bytes(b"x")
    t = ArrivalTracker(tmp_path, recursive=True, stable_s=0.0, since_ns=time.time_ns() - 10**9,
                       exclude=[tmp_path / "out"])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "heat.png").write_bytes(b"x")
    t.scan()
    assert sorted(a.path.name for a in t.ready()) == ["n.png", "new.png"]


def test_results_torn_tail_is_cut_and_reports_are_not_repeated(tmp_path) -> None:
    (tmp_path / "results.jsonl").write_text('{"seq": 0}\n{"seq": 1}\n{"seq": 2, "pa')
    state = StateDir(tmp_path)
    try:
        assert state.last_reported == 1
        assert (tmp_path / "results.jsonl").read_text() == '{"seq": 0}\n{"seq": 1}\n'
        assert state.report([{"seq": 1}, {"seq": 2}, {"seq": 3}]) == 2
    finally:
        state.close()
    assert [r["seq"] for r in read_jsonl(tmp_path / "results.jsonl")] == [0, 1, 2, 3]


def test_a_bad_line_inside_results_is_an_error(tmp_path) -> None:
    (tmp_path / "results.jsonl").write_text('{"seq": 0}\nnot json\n{"seq": 2}\n')
    with pytest.raises(StateError, match="line 2 is not JSON"):
        StateDir(tmp_path)


def test_one_daemon_per_output_folder(tmp_path) -> None:
    first = StateDir(tmp_path)
    try:
        with pytest.raises(StateError, match="in use by another musc-edge watch"):
            StateDir(tmp_path)
    finally:
        first.close()
    StateDir(tmp_path).close()  # free again


def test_state_file_is_replaced_atomically_and_versioned(tmp_path) -> None:
    state = StateDir(tmp_path)
    try:
        state.save_state({"next_seq": 3})
        assert state.load_state()["next_seq"] == 3
        assert not list(state.dir.glob(".*.tmp"))
        state.state_path.write_text(json.dumps({"version": 99}))
        with pytest.raises(StateError, match="state version 99"):
            state.load_state()
    finally:
        state.close()


def test_state_file_that_is_not_an_object_is_a_state_error(tmp_path) -> None:
    state = StateDir(tmp_path)
    try:
        state.state_path.write_text("[]")
        with pytest.raises(StateError, match="not a state object"):
            state.load_state()
    finally:
        state.close()
