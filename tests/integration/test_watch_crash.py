"""Crash safety of ``musc-edge watch``: every image in results.jsonl exactly once (issue 4).

Two kinds of test: a crash injected deterministically after (or inside) each durable step of
adding an image, then a restart; and real ``kill -9`` of the CLI at random moments while images
keep arriving, then SIGTERM, which must exit 0.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from musc_edge.watch.journal import StateDir

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import (ThreadedDaemon, config, part_image, results, tiny_model, wait_for,  # noqa: E402
                           write_png)

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


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, m = tiny_model(tmp_path_factory.mktemp("model"))
    yield m
    m.close()


def run_to_end(cfg, model, expected: int):
    with ThreadedDaemon(cfg, model) as td:
        wait_for(lambda: len(results(cfg.out_dir)) >= expected, what=f"{expected} results")
        time.sleep(0.2)
    return td.daemon.summary


def scores_by_path(out_dir: Path) -> dict[str, tuple[float, float]]:
    return {line["path"]: (line["raw_score"], line["image_score"]) for line in results(out_dir)}


@pytest.mark.parametrize("delay", [0, 2])
@pytest.mark.parametrize("method, torn", [("save_entry", False), ("report", False), ("report", True),
                                          ("journal", False), ("save_state", False)])
def test_crash_at_each_step_then_restart_reports_each_image_once(tmp_path, model, monkeypatch, method, torn,
                                                                 delay) -> None:
    clean = config(tmp_path / "clean", delay=delay, batch=1)
    cfg = config(tmp_path / "crash", delay=delay, batch=1)
    for i in range(N_IMAGES):
        img = part_image(i, defect=(i == 6))
        write_png(clean.folder / f"p{i:02d}.png", img)
        write_png(cfg.folder / f"p{i:02d}.png", img)
        time.sleep(0.01)  # distinct mtimes: the same order in both folders
    time.sleep(cfg.stable_s)  # a backlog at start-up: taken in mtime order, the same in both runs
    expected = N_IMAGES - delay  # the last D wait for newer images
    run_to_end(clean, model, expected)

    inject_crash(monkeypatch, method, 5, torn=torn)  # the 5th call: well into the stream
    td = ThreadedDaemon(cfg, model)
    td.thread.join(timeout=30)
    assert isinstance(td.error, Crash), "the injected crash did not happen"
    monkeypatch.undo()

    summary = run_to_end(cfg, model, expected)
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
    ref = {Path(p).name: s for p, s in scores_by_path(clean.out_dir).items()}
    got = {Path(p).name: s for p, s in scores_by_path(cfg.out_dir).items()}
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name] == pytest.approx(ref[name], abs=1e-6)


def _cli(folder: Path, model_path: Path, out_dir: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "musc_edge", "watch", str(folder), "--model", str(model_path), "--out",
           str(out_dir), "--window", "8", "--min-pool", "3", "--stable", "0.05", "--device", "cpu"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_kill_9_mid_stream_and_restart_reports_each_image_once(tmp_path) -> None:
    model_path, m = tiny_model(tmp_path / "model")
    m.close()
    folder, out_dir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    rng = random.Random(0)
    written = 0
    for cycle in range(5):
        proc = _cli(folder, model_path, out_dir)
        end = time.monotonic() + 1.5 + rng.random() * 1.5
        while time.monotonic() < end:  # images keep arriving while the daemon runs
            write_png(folder / f"img_{written:04d}.png", part_image(written))
            written += 1
            time.sleep(0.03)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
    proc = _cli(folder, model_path, out_dir)
    try:
        wait_for(lambda: len(results(out_dir)) >= written, timeout=60, what="all images after the restarts")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    lines = results(out_dir)
    names = [Path(line["path"]).name for line in lines]
    assert sorted(names) == [f"img_{i:04d}.png" for i in range(written)]  # each exactly once
    assert [line["seq"] for line in lines] == list(range(written))


def test_sigterm_finishes_and_exits_0(tmp_path) -> None:
    model_path, m = tiny_model(tmp_path / "model")
    m.close()
    folder, out_dir = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        write_png(folder / f"img_{i}.png", part_image(i))
    proc = _cli(folder, model_path, out_dir)
    try:
        wait_for(lambda: len(results(out_dir)) == 4, timeout=60, what="the first results")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "SIGTERM" in err and "stopped: 4 images scored, 4 reported" in err
    assert not (out_dir / "state" / ".state.json.tmp").exists()
