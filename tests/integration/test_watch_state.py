"""The watch daemon's durable state files (docs/watch.md, "State and crash safety").

The arrival rules, on a fake clock, are in tests/unit/watch/test_arrivals.py.
"""

from __future__ import annotations

import json

import pytest

from musc_edge.core.errors import StateError
from musc_edge.watch.journal import StateDir, read_jsonl


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
