"""``musc-edge watch`` end to end, in real time, in-process with the tiny ONNX model (docs/watch.md).

Inotify, the daemon's thread, its sink threads and real waits; the behaviour of each rule is tested
tick by tick on a fake clock in tests/unit/watch/.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import pytest

from musc_edge.cli import main
from musc_edge.watch.daemon import WatchDaemon
from musc_edge.watch.journal import StateDir
from musc_edge.watch.sinks import FolderSink

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import (ThreadedDaemon, config, part_image, results, tiny_model, wait_for,  # noqa: E402
                           write_png)

FIELDS = {"seq", "path", "arrival_time", "scoring_time", "image_score", "raw_score", "pool_size"}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    _, m = tiny_model(tmp_path_factory.mktemp("model"))
    yield m
    m.close()


def test_existing_and_new_images_are_each_reported_once(tmp_path, model) -> None:
    cfg = config(tmp_path, threshold=0.5, heatmaps=True)
    for i in range(5):
        write_png(cfg.folder / f"old_{i}.png", part_image(i))
    with ThreadedDaemon(cfg, model, sinks=[FolderSink(tmp_path / "outbox")]):
        wait_for(lambda: len(results(cfg.out_dir)) == 5, what="the 5 existing images")
        for i in range(5):
            write_png(cfg.folder / f"new_{i}.png", part_image(10 + i, defect=(i == 2)))
            time.sleep(0.05)
        wait_for(lambda: len(results(cfg.out_dir)) == 10, what="the 5 new images")
    lines = results(cfg.out_dir)
    assert [line["seq"] for line in lines] == list(range(10))
    assert sorted(Path(line["path"]).name for line in lines) == sorted(
        [f"old_{i}.png" for i in range(5)] + [f"new_{i}.png" for i in range(5)])
    for line in lines:
        assert FIELDS <= set(line) and line["verdict"] in ("good", "anomalous")
        assert line["verdict"] == ("anomalous" if line["raw_score"] >= 0.5 else "good")
        assert line["scoring_time"] >= line["arrival_time"]
    assert [Path(line["path"]).name for line in lines][5:] == [f"new_{i}.png" for i in range(5)]
    overlay = cv2.imread(lines[7]["heatmap"])  # at the original size of the part image
    assert overlay is not None and overlay.shape == (40, 48, 3)
    assert max(lines[5:], key=lambda line: line["raw_score"])["path"].endswith("new_2.png")
    # The folder sink, fed from results.jsonl in its own thread, holds the same lines (the stop drains it).
    assert [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").glob("*.json"))] == lines


def test_heatmap_paths_are_absolute_with_a_relative_out(tmp_path, model, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, out_dir=Path("out"), heatmaps=True)
    for i in range(3):
        write_png(cfg.folder / f"p_{i}.png", part_image(i))
    with ThreadedDaemon(cfg, model):
        wait_for(lambda: len(results(cfg.out_dir)) == 3, what="the 3 images")
    for line in results(cfg.out_dir):
        assert Path(line["heatmap"]).is_absolute() and Path(line["heatmap"]).is_file()


def test_file_vanishing_between_arrival_and_decoding_is_skipped(tmp_path, model) -> None:
    from musc_edge.watch.arrivals import Arrival, ArrivalTracker

    cfg = config(tmp_path)
    daemon = WatchDaemon(cfg, model)
    state = StateDir(cfg.out_dir)
    try:
        daemon._open(state)
        tracker = ArrivalTracker(cfg.folder)
        daemon._process(state, tracker, [Arrival(cfg.folder / "gone.png", 10, 1, time.time())])
    finally:
        state.close()
    assert daemon.summary.skipped == 1 and daemon.summary.scored == 0


def test_state_of_another_model_or_window_is_refused(tmp_path, model, capsys) -> None:
    cfg = config(tmp_path, min_pool=2)
    for i in range(3):
        write_png(cfg.folder / f"p{i}.png", part_image(i))
    with ThreadedDaemon(cfg, model):
        wait_for(lambda: len(results(cfg.out_dir)) == 3, what="three images")
    other_path, other = tiny_model(tmp_path / "m64", image_size=64)
    other.close()
    capsys.readouterr()
    argv = ["watch", str(cfg.folder), "--model", str(other_path), "--out", str(cfg.out_dir), "--window", "6",
            "--min-pool", "3"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "was made with model tiny_patchify/synthetic at 32 px" in err and "not tiny_patchify/synthetic at 64 px" in err
    assert "another --out" in err and "Traceback" not in err
    argv = ["watch", str(cfg.folder), "--model", str(model.path), "--out", str(cfg.out_dir),
            "--window", "9", "--min-pool", "3"]
    assert main(argv) == 2
    assert "window: saved 6, now 9" in capsys.readouterr().err


def test_cli_messages_for_bad_settings(tmp_path, model, capsys) -> None:
    (tmp_path / "in").mkdir()
    base = ["watch", str(tmp_path / "in"), "--model", str(model.path), "--out", str(tmp_path / "out")]
    assert main(base + ["--window", "4", "--delay", "4"]) == 2
    assert "--delay must be in [0, window)" in capsys.readouterr().err
    assert main(base + ["--window", "4", "--min-pool", "8"]) == 2
    assert "--min-pool" in capsys.readouterr().err
    assert main(["watch", str(tmp_path / "missing"), "--model", str(model.path),
                 "--out", str(tmp_path / "out")]) == 2
    assert "watch folder not found" in capsys.readouterr().err
    assert main(base + ["--window", "1"]) == 2
    assert "leaves a pool of one" in capsys.readouterr().err


def test_a_small_window_needs_no_min_pool_of_its_own(tmp_path, model) -> None:
    """--min-pool defaults to 8 capped at the pool's size: `watch --window 4` alone just works."""
    daemon = WatchDaemon(config(tmp_path, window=4, min_pool=None), model)
    assert daemon.min_pool == 4
    assert WatchDaemon(config(tmp_path, window=32, min_pool=None), model).min_pool == 8
    assert WatchDaemon(config(tmp_path, window=4, min_pool=3), model).min_pool == 3


def test_reference_folder_inside_the_watched_folder_is_refused(tmp_path, model, capsys) -> None:
    watched = tmp_path / "in"
    (watched / "refs").mkdir(parents=True)
    cv2.imwrite(str(watched / "refs" / "good.png"), part_image(0))
    base = ["watch", str(watched), "--model", str(model.path), "--out", str(tmp_path / "out")]
    assert main(base + ["--reference", str(watched / "refs"), "--recursive"]) == 2
    assert "inside the watched folder" in capsys.readouterr().err
    cv2.imwrite(str(watched / "good.png"), part_image(1))
    assert main(base + ["--reference", str(watched)]) == 2
    assert "inside the watched folder" in capsys.readouterr().err


def test_window_over_the_memory_budget_is_refused_before_reading(tmp_path, capsys):
    """watch --window W that cannot fit exits 2 with one line naming the GiB and the largest W."""
    from musc_edge.cli import main
    from musc_edge.runtime.testing import make_tiny_model

    model = make_tiny_model(tmp_path / "tiny.onnx")
    folder = tmp_path / "in"
    folder.mkdir()
    rc = main(["watch", str(folder), "--model", str(model), "--out", str(tmp_path / "out"), "--window", "100000",
               "--mem-budget", "512MiB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("error: --window 100000 needs") and "the largest --window that fits is" in err[0]
    assert not (tmp_path / "out" / "results.jsonl").exists()


@pytest.mark.parametrize("away", ["rm -rf", "mv"])
def test_a_watched_folder_deleted_and_created_again_is_watched_again(tmp_path, model, caplog, away) -> None:
    """`rm -rf in && mkdir in` (or `mv in old && mkdir in`): the inotify watch dies with (or follows)
    the old folder; the daemon re-arms it within its folder check (1 s), not at the 30 s safety
    rescan, and says so in the log."""
    import shutil

    cfg = config(tmp_path, min_pool=2)
    for i in range(2):
        write_png(cfg.folder / f"p{i}.png", part_image(i))
    with ThreadedDaemon(cfg, model):
        wait_for(lambda: len(results(cfg.out_dir)) == 2, what="the first images")
        if away == "mv":
            cfg.folder.rename(tmp_path / "old")
        else:
            shutil.rmtree(cfg.folder)
        cfg.folder.mkdir()
        time.sleep(0.05)
        write_png(cfg.folder / "after.png", part_image(5))
        wait_for(lambda: len(results(cfg.out_dir)) == 3, timeout=10, what="the image in the new folder")
        write_png(cfg.folder / "later.png", part_image(6))  # inotify again, not a rescan
        wait_for(lambda: len(results(cfg.out_dir)) == 4, timeout=5, what="an image written after the re-arm")
    assert "was deleted and created again: inotify re-armed" in caplog.text
    assert [Path(line["path"]).name for line in results(cfg.out_dir)][2:] == ["after.png", "later.png"]


def test_new_flags_are_checked_where_they_enter(tmp_path, model, capsys) -> None:
    (tmp_path / "in").mkdir()
    base = ["watch", str(tmp_path / "in"), "--model", str(model.path), "--out", str(tmp_path / "out")]
    assert main(base + ["--max-file-size", "lots"]) == 2
    assert "--max-file-size expects a size such as 256MiB" in capsys.readouterr().err
    assert main(base + ["--keep-heatmaps", "0"]) == 2
    assert "--keep-heatmaps" in capsys.readouterr().err
