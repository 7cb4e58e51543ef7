"""``musc-edge watch`` end to end, in-process with the tiny ONNX model (issue 4)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.cli import main
from musc_edge.watch.daemon import WatchDaemon
from musc_edge.core.errors import StateError
from musc_edge.watch.journal import StateDir
from musc_edge.runtime.preprocess import load_input

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
    with ThreadedDaemon(cfg, model):
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


def test_heatmap_paths_are_absolute_with_a_relative_out(tmp_path, model, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = config(tmp_path, out_dir=Path("out"), heatmaps=True)
    for i in range(3):
        write_png(cfg.folder / f"p_{i}.png", part_image(i))
    with ThreadedDaemon(cfg, model):
        wait_for(lambda: len(results(cfg.out_dir)) == 3, what="the 3 images")
    for line in results(cfg.out_dir):
        assert Path(line["heatmap"]).is_absolute() and Path(line["heatmap"]).is_file()


def test_name_rules_subfolders_and_write_then_rename(tmp_path, model) -> None:
    cfg = config(tmp_path, poll=True, poll_interval_s=0.05, min_pool=2)
    (cfg.folder / "sub").mkdir()
    for i in range(3):
        write_png(cfg.folder / f"part_{i}.png", part_image(i))
    write_png(cfg.folder / ".hidden.png", part_image(7))
    write_png(cfg.folder / "sub" / "nested.png", part_image(8))
    write_png(cfg.folder / "late.png.tmp", part_image(9))
    (cfg.folder / "notes.txt").write_text("not an image")
    with ThreadedDaemon(cfg, model):
        wait_for(lambda: len(results(cfg.out_dir)) == 3, what="the 3 visible images")
        (cfg.folder / "late.png.tmp").rename(cfg.folder / "late.png")
        wait_for(lambda: len(results(cfg.out_dir)) == 4, what="the renamed image")
        time.sleep(0.3)
    names = sorted(Path(line["path"]).name for line in results(cfg.out_dir))
    assert names == ["late.png", "part_0.png", "part_1.png", "part_2.png"]


def test_recursive_and_new_only(tmp_path, model) -> None:
    cfg = config(tmp_path, recursive=True, new_only=True, min_pool=2)
    (cfg.folder / "line2").mkdir()
    write_png(cfg.folder / "before.png", part_image(0))
    time.sleep(0.02)
    with ThreadedDaemon(cfg, model):
        time.sleep(0.3)
        write_png(cfg.folder / "after.png", part_image(1))
        write_png(cfg.folder / "line2" / "nested.png", part_image(2))
        wait_for(lambda: len(results(cfg.out_dir)) == 2, what="two new images")
        time.sleep(0.3)
    names = sorted(Path(line["path"]).name for line in results(cfg.out_dir))
    assert names == ["after.png", "nested.png"]  # before.png predates the first start


class Recording:
    """Wraps a model and keeps every batch it was given."""

    def __init__(self, model) -> None:
        self.model, self.batches = model, []

    @property
    def meta(self):
        return self.model.meta

    def __call__(self, batch):
        self.batches.append(batch.copy())
        return self.model(batch)


def test_file_written_slowly_in_chunks_is_scored_once_and_complete(tmp_path, model) -> None:
    """Pauses longer than the stability interval: the cut file is skipped until it is complete."""
    cfg = config(tmp_path, stable_s=0.15, min_pool=2)
    write_png(cfg.folder / "a.png", part_image(0))
    full = write_png(tmp_path / "full.png", part_image(1, defect=True)).read_bytes()
    rec = Recording(model)
    with ThreadedDaemon(cfg, rec):
        wait_for(lambda: len(rec.batches) == 1, what="the first image")
        target = cfg.folder / "slow.png"
        chunks = np.array_split(np.frombuffer(full, np.uint8), 4)
        for chunk in chunks:
            with open(target, "ab") as f:
                f.write(chunk.tobytes())
            time.sleep(0.4)  # longer than --stable: the daemon sees a stable, cut file
        wait_for(lambda: len(results(cfg.out_dir)) == 2, what="the slow file")
        time.sleep(0.3)
    lines = results(cfg.out_dir)
    assert [Path(line["path"]).name for line in lines].count("slow.png") == 1
    expected, _ = load_input(tmp_path / "full.png", model.meta)
    seen = [b[i] for b in rec.batches for i in range(len(b))]
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], expected)  # the complete image, not a cut one
    skips = [json.loads(x) for x in (cfg.out_dir / "state" / "journal.jsonl").read_text().splitlines()
             if "skip" in x]
    assert skips and all("truncated" in s["reason"] for s in skips)


def test_corrupt_and_vanished_files_are_skipped_and_the_daemon_goes_on(tmp_path, model, caplog) -> None:
    cfg = config(tmp_path, min_pool=2)
    write_png(cfg.folder / "a.png", part_image(0))
    (cfg.folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50 + b"IEND\xaeB`\x82")
    (cfg.folder / "empty.jpg").write_bytes(b"")
    (cfg.folder / "text.jpg").write_bytes(b"hello, not a jpeg")
    with ThreadedDaemon(cfg, model) as td:
        wait_for(lambda: td.daemon.summary.skipped >= 2, what="the corrupt files")
        gone = write_png(cfg.folder / "gone.png", part_image(5))
        gone.unlink()  # vanishes before it is stable
        write_png(cfg.folder / "b.png", part_image(1))
        wait_for(lambda: len(results(cfg.out_dir)) == 2, what="the good images")
        time.sleep(0.3)
    names = sorted(Path(line["path"]).name for line in results(cfg.out_dir))
    assert names == ["a.png", "b.png"]
    assert "corrupt.png" in caplog.text and "text.jpg" in caplog.text
    # Remembered: a restart does not look at the corrupt files again (nor report anything twice).
    caplog.clear()
    with ThreadedDaemon(cfg, model) as td:
        time.sleep(0.4)
    assert td.daemon.summary.skipped == 0 and len(results(cfg.out_dir)) == 2


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


def test_reference_images_seed_the_pool_and_are_never_reported(tmp_path, model) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        write_png(refs / f"ref_{i}.png", part_image(100 + i))
    cfg = config(tmp_path, reference=refs, window=3, min_pool=4)
    with ThreadedDaemon(cfg, model):
        write_png(cfg.folder / "p0.png", part_image(0))
        wait_for(lambda: len(results(cfg.out_dir)) == 1, what="the first image (3 refs + 1 = min-pool)")
        for i in range(1, 6):
            write_png(cfg.folder / f"p{i}.png", part_image(i))
            time.sleep(0.03)
        wait_for(lambda: len(results(cfg.out_dir)) == 6, what="six images")
    lines = results(cfg.out_dir)
    assert all("ref_" not in line["path"] for line in lines)
    assert lines[0]["pool_size"] == 4 and max(line["pool_size"] for line in lines) == 6  # 3 refs + W 3
    state = json.loads((cfg.out_dir / "state" / "state.json").read_text())
    assert state["window"]["references"] == [-3, -2, -1]
    assert len(state["window"]["stream"]) == 3
    # A restart with another reference set is refused: the pool was built on these.
    other = tmp_path / "refs2"
    other.mkdir()
    write_png(other / "x.png", part_image(200))
    with pytest.raises(StateError, match="references"):
        WatchDaemon(config(tmp_path, reference=other, window=3, min_pool=4), model).run()


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
