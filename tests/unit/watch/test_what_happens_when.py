"""docs/watch.md, "What happens when": what the line throws at the daemon, one test per row.

Stepped on a fake clock with the tiny ONNX model and real files (tests/unit/watch/watch_fakes.py):
"retried after 1 s, not before" and "nothing more is reported" are exact here. Errors the OS gives
only on a real broken mount or a full disk (EIO, ESTALE, ENOSPC) are raised by a wrapper around the
one call that meets them; the real-inotify and real-``kill -9`` cases are in tests/integration/.
"""

from __future__ import annotations

import base64
import builtins
import errno
import io
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import cv2
import pytest

from musc_edge.core.errors import StateError
from musc_edge.outputs.writers import MAX_NAME_BYTES
from musc_edge.watch.journal import StateDir
from musc_edge.watch.paths import real_path

sys.path.insert(0, str(Path(__file__).parent))
from watch_fakes import Stepped, config, part_image, results, write_png  # noqa: E402

LONG_STEM = "検査" * 39  # 78 characters, 234 bytes: with "00000002_", ".png" and a temp name, over 255


def names(out_dir: Path) -> list[str]:
    return [Path(real_path(line)).name for line in results(out_dir)]


def journal(out_dir: Path) -> list[dict]:
    path = out_dir / "state" / "journal.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def parts(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [write_png(folder / f"p{i}.png", part_image(i)) for i in range(start, start + n)]


def run(cfg, model, clock, settles: int = 3):
    with Stepped(cfg, model, clock) as d:
        for _ in range(settles):
            d.settle()
    return d.summary


# ------------------------------------------------------------------------------ layout
def test_out_holding_the_watched_folder_scores_it(tmp_path, model, clock) -> None:
    """`watch /data/line1/incoming --out /data/line1`: only OUTDIR's own folders are left out."""
    line = tmp_path / "line1"
    (line / "incoming").mkdir(parents=True)
    cfg = config(tmp_path, folder=line / "incoming", out_dir=line, min_pool=2)
    parts(cfg.folder, 3)
    run(cfg, model, clock)
    assert sorted(names(line)) == ["p0.png", "p1.png", "p2.png"]


def test_out_equal_to_the_watched_folder_never_scores_its_own_heatmaps(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, out_dir=tmp_path / "in", recursive=True, heatmaps=True, min_pool=2)
    parts(cfg.folder, 3)
    run(cfg, model, clock, settles=4)
    lines = results(cfg.out_dir)
    assert sorted(names(cfg.out_dir)) == ["p0.png", "p1.png", "p2.png"]
    assert all(Path(line["heatmap"]).parent == cfg.folder / "heatmaps" for line in lines)


# ------------------------------------------------------------------------------ outputs
def test_a_long_file_name_gets_a_heatmap_with_a_short_stable_name(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, heatmaps=True, min_pool=2)
    parts(cfg.folder, 2)
    write_png(cfg.folder / f"{LONG_STEM}.png", part_image(9))
    summary = run(cfg, model, clock)
    assert summary.reported == 3
    line = next(x for x in results(cfg.out_dir) if x["path"].endswith(f"{LONG_STEM}.png"))
    heatmap = Path(line["heatmap"])
    assert heatmap.is_file() and len(os.fsencode(heatmap.name)) <= MAX_NAME_BYTES
    assert heatmap.name.startswith(f"{line['seq']:08d}_検査") and "heatmap_error" not in line


def test_a_heatmap_that_cannot_be_written_does_not_stop_the_line(tmp_path, model, clock, caplog) -> None:
    cfg = config(tmp_path, heatmaps=True, min_pool=2)
    cfg.out_dir.mkdir()
    (cfg.out_dir / "heatmaps").write_text("a file where the folder should be")
    parts(cfg.folder, 3)
    summary = run(cfg, model, clock)
    lines = results(cfg.out_dir)
    assert summary.reported == 3 and [x["seq"] for x in lines] == [0, 1, 2]
    assert all(x["heatmap"] is None and "cannot write" in x["heatmap_error"] for x in lines)
    assert "no heatmap for seq 0" in caplog.text


def test_keep_heatmaps_keeps_the_newest_n(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, heatmaps=True, keep_heatmaps=2, min_pool=2)
    parts(cfg.folder, 5)
    run(cfg, model, clock)
    kept = sorted(p.name for p in (cfg.out_dir / "heatmaps").iterdir())
    assert kept == ["00000003_p3.png", "00000004_p4.png"]
    assert [Path(x["heatmap"]).name for x in results(cfg.out_dir)][-2:] == kept


def test_a_name_that_is_not_utf8_is_valid_json_that_gives_the_file_back(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, heatmaps=True, min_pool=2)
    parts(cfg.folder, 2)
    odd = write_png(cfg.folder / os.fsdecode(b"caf\xe9.png"), part_image(7))  # Latin-1 "café.png"
    run(cfg, model, clock)
    raw = (cfg.out_dir / "results.jsonl").read_bytes()
    raw.decode("utf-8")  # strict: no lone surrogates, no invalid bytes
    assert b"\\udc" not in raw  # what json.dumps writes for a surrogate-escaped byte
    line = next(x for x in results(cfg.out_dir) if "path_bytes_b64" in x)
    assert line["path"].endswith("caf\ufffd.png")
    assert base64.b64decode(line["path_bytes_b64"]) == os.fsencode(odd)
    assert real_path(line) == str(odd) and Path(real_path(line)).is_file()
    assert Path(line["heatmap"]).is_file() and "heatmap_bytes_b64" not in line  # our own name is UTF-8


def test_an_exif_rotated_jpeg_gets_an_upright_heatmap(tmp_path, model, clock) -> None:
    """Orientation 6 (a camera turned 90 degrees): the overlay is the image as viewers show it."""
    Image = pytest.importorskip("PIL.Image")
    cfg = config(tmp_path, heatmaps=True, min_pool=2)
    parts(cfg.folder, 2)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(part_image(5)).save(cfg.folder / "turned.jpg", exif=exif, quality=95)  # stored 40 x 48
    run(cfg, model, clock)
    line = next(x for x in results(cfg.out_dir) if x["path"].endswith("turned.jpg"))
    assert cv2.imread(line["heatmap"]).shape[:2] == (48, 40)


# ------------------------------------------------------------------------------ what arrives
class Refusing:
    """``open`` that fails on one path with an OS error until ``fixed``, as a file without read
    permission (the tests run as root, which chmod does not stop) or a broken mount does."""

    def __init__(self, path: Path, code: int) -> None:
        self.path, self.code, self.fixed, self.tries = str(path), code, False, 0
        self._open = builtins.open

    def __call__(self, file, *args, **kwargs):
        if str(file) == self.path:
            self.tries += 1
            if not self.fixed:
                raise OSError(self.code, os.strerror(self.code), str(file))
        return self._open(file, *args, **kwargs)

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(builtins, "open", self)
        monkeypatch.setattr(io, "open", self)  # what Path.read_bytes and friends call


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO, errno.ESTALE])
def test_a_read_the_os_refuses_is_retried_with_backoff_and_never_skipped(tmp_path, model, clock, monkeypatch,
                                                                          caplog, code) -> None:
    cfg = config(tmp_path, min_pool=2)
    parts(cfg.folder, 2)
    locked = write_png(cfg.folder / "locked.png", part_image(5))
    gate = Refusing(locked, code)
    gate.install(monkeypatch)
    with Stepped(cfg, model, clock) as d:
        d.settle()
        assert sorted(names(cfg.out_dir)) == ["p0.png", "p1.png"] and gate.tries == 1
        assert not any(r.get("skip") == str(locked) for r in journal(cfg.out_dir))  # not a final skip
        d.step(0.5)  # several scans, but the first retry is due 1 s after the failure
        assert gate.tries == 1
        d.step(0.6)
        assert gate.tries == 2  # refused again: next try 2 s later
        gate.fixed = True  # chmod 644, the mount is back
        d.step(1.5)
        assert gate.tries == 2
        d.step(0.6)
    assert gate.tries == 3 and names(cfg.out_dir)[-1] == "locked.png" and d.summary.skipped == 0
    assert f"{locked}: cannot read file ({os.strerror(code)}); not skipped: trying again in 1 s" in caplog.text
    assert "can be read again after 2 failed tries" in caplog.text


def test_a_read_error_an_older_version_journaled_as_final_is_tried_again(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, min_pool=2)
    parts(cfg.folder, 2)
    run(cfg, model, clock)
    locked = write_png(cfg.folder / "locked.png", part_image(5))
    st = locked.stat()
    with open(cfg.out_dir / "state" / "journal.jsonl", "a") as f:
        f.write(json.dumps({"skip": str(locked), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                            "reason": f"{locked}: cannot read file (Permission denied)"}) + "\n")
    run(cfg, model, clock)
    assert names(cfg.out_dir) == ["p0.png", "p1.png", "locked.png"]


def test_files_that_are_not_images_or_too_big_are_skipped_before_they_are_read(tmp_path, model, clock,
                                                                                 caplog) -> None:
    cfg = config(tmp_path, min_pool=2, max_file_bytes=20_000)
    parts(cfg.folder, 2)
    noisy = write_png(cfg.folder / "noisy.png", part_image(3, size=(200, 200)) * 3)  # a real image, too big
    assert noisy.stat().st_size > 20_000
    with open(cfg.folder / "x.jpg", "wb") as f:  # 64 MiB of nothing (sparse), named like an image
        f.truncate(64 * 2**20)
    summary = run(cfg, model, clock)
    assert sorted(names(cfg.out_dir)) == ["p0.png", "p1.png"] and summary.skipped == 2
    assert "noisy.png: file of" in caplog.text and "over the limit of 0.0 MiB; raise --max-file-size" in caplog.text
    assert "x.jpg: not a jpg/png/bmp/tiff image" in caplog.text
    assert {Path(r["skip"]).name for r in journal(cfg.out_dir) if "skip" in r} == {"noisy.png", "x.jpg"}


def test_a_gif_is_counted_and_skipped_with_its_reason(tmp_path, model, clock, caplog) -> None:
    Image = pytest.importorskip("PIL.Image")
    cfg = config(tmp_path, min_pool=2)
    parts(cfg.folder, 2)
    Image.fromarray(part_image(4)).save(cfg.folder / "frame.gif")
    summary = run(cfg, model, clock)
    assert summary.skipped == 1 and "frame.gif: GIF images are not read" in caplog.text
    assert sorted(names(cfg.out_dir)) == ["p0.png", "p1.png"]


def test_an_exact_copy_is_not_scored_against_itself(tmp_path, model, clock, caplog) -> None:
    """Renamed, touched or copied again: not scored (it would find itself in the pool), not pooled."""
    caplog.set_level(logging.INFO, logger="musc_edge.watch.daemon")
    cfg = config(tmp_path, min_pool=2)
    p = parts(cfg.folder, 4)
    with Stepped(cfg, model, clock) as d:
        d.settle()
        assert len(results(cfg.out_dir)) == 4
        p[2].rename(cfg.folder / "renamed.png")
        later = clock.wall_ns(5.0)
        os.utime(p[1], ns=(later, later))  # touched: same bytes, new mtime
        shutil.copy(p[3], cfg.folder / "copy_of_p3.png")
        for _ in range(2):
            d.settle()
        assert len(results(cfg.out_dir)) == 4 and d.summary.copies == 3
        window = json.loads((cfg.out_dir / "state" / "state.json").read_text())["window"]
        assert window["stream"] == [0, 1, 2, 3]  # no copy joined the pool
        write_png(cfg.folder / "new.png", part_image(20))
        write_png(cfg.folder / "new_again.png", part_image(20))  # a copy in the same batch as its original
        for _ in range(2):
            d.settle()
    lines = results(cfg.out_dir)
    assert names(cfg.out_dir)[4:] in (["new.png"], ["new_again.png"]) and lines[4]["pool_size"] == 5
    assert d.summary.copies == 4
    assert "renamed.png is an exact copy of seq 2" in caplog.text
    assert "p1.png: unchanged content, already scored as seq 1" in caplog.text
    dupes = {Path(r["skip"]).name: r["duplicate_of"] for r in journal(cfg.out_dir) if "duplicate_of" in r}
    assert {k: v for k, v in dupes.items() if not k.startswith("new")} == {"renamed.png": 2, "p1.png": 1,
                                                                        "copy_of_p3.png": 3}
    assert lines[0]["sha256"] != lines[1]["sha256"] and len(lines[0]["sha256"]) == 64


# ------------------------------------------------------------------------------ the state
def test_a_fresh_state_next_to_kept_results_numbers_on_and_reports_nothing_twice(tmp_path, model, clock) -> None:
    """"Move OUTDIR/state away to start afresh" with results.jsonl left, images archived meanwhile."""
    cfg = config(tmp_path, min_pool=2)
    p = parts(cfg.folder, 4)
    run(cfg, model, clock)
    shutil.move(cfg.out_dir / "state", tmp_path / "old_state")
    (tmp_path / "archive").mkdir()
    for path in p[2:]:
        shutil.move(path, tmp_path / "archive" / path.name)  # the nightly clean-up; p0, p1 stay
    parts(cfg.folder, 3, start=4)
    summary = run(cfg, model, clock)
    lines = results(cfg.out_dir)
    assert [x["seq"] for x in lines] == list(range(7))
    assert names(cfg.out_dir) == [f"p{i}.png" for i in range(7)]
    assert summary.copies == 2  # p0 and p1: already reported, recognised by content


@pytest.mark.parametrize("delay", [0, 1])
def test_a_lost_journal_reports_no_image_twice(tmp_path, model, clock, delay) -> None:
    cfg = config(tmp_path, min_pool=2, delay=delay)
    parts(cfg.folder, 5)
    run(cfg, model, clock)
    assert len(results(cfg.out_dir)) == 5 - delay
    shutil.move(cfg.out_dir / "state" / "journal.jsonl", tmp_path / "journal.jsonl.bak")
    with Stepped(cfg, model, clock) as d:
        for _ in range(3):
            d.settle()
        assert len(results(cfg.out_dir)) == 5 - delay  # every image in the folder: known by content
        parts(cfg.folder, 1, start=5)
        for _ in range(2):
            d.settle()
    assert [x["seq"] for x in results(cfg.out_dir)] == list(range(6 - delay))
    assert names(cfg.out_dir) == [f"p{i}.png" for i in range(6 - delay)]


@pytest.mark.parametrize("damage", ["cut", "garbled"])
def test_a_damaged_pool_entry_is_one_line_and_its_advice_is_safe(tmp_path, model, clock, damage) -> None:
    cfg = config(tmp_path, min_pool=2)
    parts(cfg.folder, 4)
    run(cfg, model, clock)
    entry = sorted((cfg.out_dir / "state" / "entries").glob("*.npz"))[1]
    data = entry.read_bytes()
    entry.write_bytes(data[:len(data) // 2] if damage == "cut" else data[:200] + bytes(len(data) - 400) + data[-200:])
    with pytest.raises(StateError) as info:
        run(cfg, model, clock)
    message = str(info.value)
    assert "\n" not in message and str(entry) in message and "cannot be read (" in message
    assert f"Move {cfg.out_dir / 'state'} away to start a new pool" in message
    shutil.move(cfg.out_dir / "state", tmp_path / "damaged_state")  # as the message says
    parts(cfg.folder, 2, start=4)  # the new pool starts empty: --min-pool 2 reports once two are in
    run(cfg, model, clock)
    assert [x["seq"] for x in results(cfg.out_dir)] == list(range(6))
    assert names(cfg.out_dir) == [f"p{i}.png" for i in range(6)]


class Crash(BaseException):
    """The process dying (a BaseException: no handler catches it)."""


def test_a_damaged_entry_that_was_never_committed_is_dropped_and_its_image_read_again(tmp_path, model, clock,
                                                                                         monkeypatch, caplog) -> None:
    cfg = config(tmp_path, min_pool=2, batch=1)
    parts(cfg.folder, 4)
    original, calls = StateDir.save_entry, {"n": 0}

    def dies_after_the_third(self, entry):
        original(self, entry)
        calls["n"] += 1
        if calls["n"] == 3:
            raise Crash

    monkeypatch.setattr(StateDir, "save_entry", dies_after_the_third)
    with pytest.raises(Crash):
        run(cfg, model, clock)
    monkeypatch.undo()
    entry = cfg.out_dir / "state" / "entries" / f"{2:012d}.npz"
    entry.write_bytes(entry.read_bytes()[:100])
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, model, clock)
    assert "it was never committed, so it is dropped and its image read again" in caplog.text
    assert summary.replayed == 0
    assert [x["seq"] for x in results(cfg.out_dir)] == [0, 1, 2, 3]
    assert sorted(names(cfg.out_dir)) == [f"p{i}.png" for i in range(4)]


def fill_disk(monkeypatch, method: str, first: int, count: int, *, torn: bool = False) -> dict:
    """Calls ``first`` .. ``first + count - 1`` of ``StateDir.<method>`` fail with ENOSPC (the
    report's half-written, if ``torn``); returns the call counter."""
    original = getattr(StateDir, method)
    calls = {"n": 0}

    def wrapper(self, *args, **kwargs):
        calls["n"] += 1
        if first <= calls["n"] < first + count:
            if torn and args[0]:
                text = json.dumps(args[0][0])
                with open(self.results_path, "a") as f:
                    f.write(text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StateDir, method, wrapper)
    return calls


@pytest.mark.parametrize("method, first, torn", [("save_entry", 3, False), ("report", 3, True),
                                                 ("save_state", 3, False), ("save_state", 1, False)])
def test_a_full_disk_pauses_with_one_line_and_loses_nothing(tmp_path, model, clock, monkeypatch, caplog,
                                                            method, first, torn) -> None:
    """The third call of a durable step fails and the next two tries too (save_state's first call is
    the start's own commit: the disk is full before anything is scored)."""
    cfg = config(tmp_path, min_pool=2, batch=2)
    parts(cfg.folder, 6)
    calls = fill_disk(monkeypatch, method, first=first, count=3, torn=torn)
    with Stepped(cfg, model, clock) as d:
        d.settle()
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, errors
        assert errors[0].startswith(f"no space left on the disk of {cfg.out_dir}")
        assert "B there (its pool entry)" in errors[0] and "Nothing is lost" in errors[0]
        assert errors[0].endswith("next try in 1 s")
        for _ in range(12):  # retries after 1, 2, 4 s: the third try finds space
            d.step(1.0)
        for _ in range(2):
            d.settle()
    assert calls["n"] >= first + 3
    assert [x["seq"] for x in results(cfg.out_dir)] == list(range(6))
    assert sorted(names(cfg.out_dir)) == [f"p{i}.png" for i in range(6)]
    assert "disk space is back after 3 failed tries" in caplog.text
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # one line per outage
