"""Crash safety of ``musc-edge watch``: every image in results.jsonl exactly once (docs/watch.md).

Real processes in real time: ``kill -9`` of the CLI at random moments while images keep arriving,
then SIGTERM, which must exit 0. The crash injected after (or inside) each durable step, then a
restart, is stepped on a fake clock in tests/unit/watch/test_crash_points.py.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import part_image, results, tiny_model, wait_for, write_png  # noqa: E402

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


_DIE_INSIDE_AN_ENTRY_WRITE = """
import os, signal, sys
from pathlib import Path
from musc_edge.core.durable import atomic_write_bytes
os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # after the temp file, before the rename
atomic_write_bytes(Path(sys.argv[1]) / "state" / "entries" / "000000000003.npz", b"x" * 2**20, fsync=True)
"""


def test_kill_9_inside_an_entry_write_leaves_a_temp_file_that_the_next_start_removes(tmp_path) -> None:
    from musc_edge.watch.journal import StateDir

    out = tmp_path / "out"
    (out / "state" / "entries").mkdir(parents=True)
    (out / "state" / "entries" / "notes.txt").write_text("not ours: stays")
    proc = subprocess.run([sys.executable, "-c", _DIE_INSIDE_AN_ENTRY_WRITE, str(out)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    leaked = list((out / "state" / "entries").glob(".*.tmp"))
    assert len(leaked) == 1 and leaked[0].name.startswith(".000000000003.npz.")
    StateDir(out).close()
    assert not list((out / "state" / "entries").glob(".*.tmp"))
    assert (out / "state" / "entries" / "notes.txt").exists()
