"""A crash injected after (or inside) each durable step of adding an image, then a restart: every
image in results.jsonl exactly once, with the numbers of an uninterrupted run (docs/watch.md,
"State and crash safety"). Stepped on a fake clock; the real ``kill -9`` runs are in
tests/integration/test_watch_crash.py.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from musc_edge.watch.clock import FakeClock
from musc_edge.watch.journal import StateDir

sys.path.insert(0, str(Path(__file__).parent))
from watch_fakes import RecordingSink, Stepped, config, part_image, results, write_png  # noqa: E402

N_IMAGES = 10


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs (BaseException: no handler catches it)."""


def inject_crash(monkeypatch, method: str, nth: int, *, torn: bool = False) -> None:
    """Make the nth call of ``StateDir.<method>`` die after its work (or halfway, if ``torn``)."""
    original = getattr(StateDir, method)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == nth and torn:  # half a result line reaches the disk, then the crash
            text = json.dumps(args[0][0])
            with open(self.results_path, "a") as f:
                f.write(text[: len(text) // 2])
            raise Crash
        out = original(self, *args, **kwargs)
        if calls["n"] == nth:
            raise Crash
        return out

    monkeypatch.setattr(StateDir, method, wrapper)


def backlog(cfg, clock: FakeClock) -> None:
    """N images already there at start-up, a second apart by mtime: taken in that order."""
    for i in range(N_IMAGES):
        path = write_png(cfg.folder / f"p{i:02d}.png", part_image(i, defect=(i == 6)))
        ns = clock.wall_ns(-100.0 + i)
        os.utime(path, ns=(ns, ns))


def run_to_end(cfg, model, clock, sinks=()):
    with Stepped(cfg, model, clock, sinks=sinks) as d:
        for _ in range(3):
            d.settle()
    return d.summary


def scores_by_name(out_dir: Path) -> dict[str, tuple[float, float]]:
    return {Path(line["path"]).name: (line["raw_score"], line["image_score"]) for line in results(out_dir)}


@pytest.fixture(scope="module")
def clean_scores(tmp_path_factory, model):
    """Scores of an uninterrupted run per delay, computed once: every crash point compares to it."""
    cache: dict[int, dict[str, tuple[float, float]]] = {}

    def get(delay: int) -> dict[str, tuple[float, float]]:
        if delay not in cache:
            clean, clock = config(tmp_path_factory.mktemp(f"clean{delay}"), delay=delay, batch=1), FakeClock()
            backlog(clean, clock)
            run_to_end(clean, model, clock)
            cache[delay] = scores_by_name(clean.out_dir)
        return cache[delay]

    return get


@pytest.mark.parametrize("delay", [0, 2])
@pytest.mark.parametrize("method, torn", [("save_entry", False), ("report", False), ("report", True),
                                          ("journal", False), ("save_state", False)])
def test_crash_at_each_step_then_restart_reports_each_image_once(tmp_path, model, clean_scores, monkeypatch,
                                                                 method, torn, delay) -> None:
    cfg, clock = config(tmp_path / "crash", delay=delay, batch=1), FakeClock()
    backlog(cfg, clock)
    expected = N_IMAGES - delay  # the last D wait for newer images

    sink = RecordingSink("outbox")
    inject_crash(monkeypatch, method, 5, torn=torn)  # the 5th call: well into the stream
    with pytest.raises(Crash):
        run_to_end(cfg, model, clock, [sink])
    monkeypatch.undo()

    again = RecordingSink("outbox")
    summary = run_to_end(cfg, model, clock, [again])
    # The 5th save_state is image 3's commit (the first start commits once): nothing to replay.
    # Every other crash point comes after entry 4 was written: image 4 is replayed from it.
    assert summary.replayed == (0 if method == "save_state" else 1)
    lines = results(cfg.out_dir)
    assert [line["seq"] for line in lines] == list(range(expected))
    names = [Path(line["path"]).name for line in lines]
    assert len(set(names)) == len(names) == expected
    state = json.loads((cfg.out_dir / "state" / "state.json").read_text())
    assert state["next_seq"] == N_IMAGES and len(state["window"]["pending"]) == delay
    # The replayed image gives the numbers an uninterrupted run gives.
    ref, got = clean_scores(delay), scores_by_name(cfg.out_dir)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=1e-6)
    # A sink sees each seq (at least once, in order, none missing) across the crash: never the torn line.
    delivered = sink.seqs + again.seqs
    assert sorted(set(delivered)) == list(range(expected)) and delivered == sorted(delivered)
    assert again.emitted[-1] == lines[-1]
