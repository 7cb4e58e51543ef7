"""The watch loop tick by tick on a fake clock (docs/watch.md): arrival rules, skips, references,
timestamps and sinks, with the tiny ONNX model and real files, without sleeping.

``Stepped.settle()`` is "long enough for what was written to be seen, stable and handled", so
"nothing else is reported" is checked by stepping on, not by waiting and hoping.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from musc_edge.core.errors import InputError, StateError
from musc_edge.runtime.preprocess import load_input
from musc_edge.watch.clock import FakeClock
from musc_edge.watch.daemon import WatchDaemon, iso_time
from musc_edge.watch.sinks import FolderSink, SeqFile

sys.path.insert(0, str(Path(__file__).parent))
from watch_fakes import (BlockedSink, DeadSink, RecordingSink, Stepped, config, part_image,  # noqa: E402
                         results, write_png)


def names(out_dir: Path) -> list[str]:
    return [Path(line["path"]).name for line in results(out_dir)]


def test_name_rules_subfolders_and_write_then_rename(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, min_pool=2)
    (cfg.folder / "sub").mkdir()
    for i in range(3):
        write_png(cfg.folder / f"part_{i}.png", part_image(i))
    write_png(cfg.folder / ".hidden.png", part_image(7))
    write_png(cfg.folder / "sub" / "nested.png", part_image(8))
    write_png(cfg.folder / "late.png.tmp", part_image(9))
    (cfg.folder / "notes.txt").write_text("not an image")
    with Stepped(cfg, model, clock) as d:
        d.settle()
        assert sorted(names(cfg.out_dir)) == ["part_0.png", "part_1.png", "part_2.png"]
        (cfg.folder / "late.png.tmp").rename(cfg.folder / "late.png")
        for _ in range(5):
            d.settle()
    assert sorted(names(cfg.out_dir)) == ["late.png", "part_0.png", "part_1.png", "part_2.png"]


def test_recursive_and_new_only(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, recursive=True, new_only=True, min_pool=2)
    (cfg.folder / "line2").mkdir()
    before = write_png(cfg.folder / "before.png", part_image(0))
    old = clock.wall_ns(-1.0)  # written a second before the first start
    os.utime(before, ns=(old, old))
    with Stepped(cfg, model, clock) as d:
        d.settle()
        assert results(cfg.out_dir) == []
        write_png(cfg.folder / "after.png", part_image(1))
        write_png(cfg.folder / "line2" / "nested.png", part_image(2))
        for _ in range(3):
            d.settle()
    assert sorted(names(cfg.out_dir)) == ["after.png", "nested.png"]  # before.png predates the first start


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


def test_file_written_slowly_in_chunks_is_scored_once_and_complete(tmp_path, model, clock) -> None:
    """Pauses longer than the stability interval: the cut file is skipped until it is complete."""
    cfg = config(tmp_path, stable_s=0.15, min_pool=2)
    write_png(cfg.folder / "a.png", part_image(0))
    full = write_png(tmp_path / "full.png", part_image(1, defect=True)).read_bytes()
    rec = Recording(model)
    with Stepped(cfg, rec, clock) as d:
        d.settle()
        assert len(rec.batches) == 1
        target = cfg.folder / "slow.png"
        for chunk in np.array_split(np.frombuffer(full, np.uint8), 4):
            with open(target, "ab") as f:
                f.write(chunk.tobytes())
            d.settle()  # longer than --stable: the daemon sees a stable, cut file
        d.settle()
    assert names(cfg.out_dir).count("slow.png") == 1 and len(results(cfg.out_dir)) == 2
    expected, _ = load_input(tmp_path / "full.png", model.meta)
    seen = [b[i] for b in rec.batches for i in range(len(b))]
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], expected)  # the complete image, not a cut one
    skips = [json.loads(x) for x in (cfg.out_dir / "state" / "journal.jsonl").read_text().splitlines()
             if "skip" in x]
    assert len(skips) == 3 and all("truncated" in s["reason"] for s in skips)  # each cut state once


def test_corrupt_and_vanished_files_are_skipped_and_the_daemon_goes_on(tmp_path, model, clock, caplog) -> None:
    cfg = config(tmp_path, min_pool=2)
    write_png(cfg.folder / "a.png", part_image(0))
    (cfg.folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 50 + b"IEND\xaeB`\x82")
    (cfg.folder / "empty.jpg").write_bytes(b"")
    (cfg.folder / "text.jpg").write_bytes(b"hello, not a jpeg")
    with Stepped(cfg, model, clock) as d:
        d.settle()
        assert d.summary.skipped == 2  # corrupt.png and text.jpg; empty.jpg is never ready
        gone = write_png(cfg.folder / "gone.png", part_image(5))
        gone.unlink()  # vanishes before it is stable
        write_png(cfg.folder / "b.png", part_image(1))
        for _ in range(3):
            d.settle()
    assert sorted(names(cfg.out_dir)) == ["a.png", "b.png"] and d.summary.skipped == 2
    assert "corrupt.png" in caplog.text and "text.jpg" in caplog.text
    # Remembered: a restart does not look at the corrupt files again (nor report anything twice).
    with Stepped(cfg, model, clock) as d:
        for _ in range(3):
            d.settle()
    assert d.summary.skipped == 0 and len(results(cfg.out_dir)) == 2


def test_reference_images_seed_the_pool_and_are_never_reported(tmp_path, model, clock) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(3):
        write_png(refs / f"ref_{i}.png", part_image(100 + i))
    cfg = config(tmp_path, reference=refs, window=3, min_pool=4)
    with Stepped(cfg, model, clock) as d:
        write_png(cfg.folder / "p0.png", part_image(0))
        d.settle()
        assert len(results(cfg.out_dir)) == 1  # 3 refs + 1 = min-pool
        for i in range(1, 6):
            write_png(cfg.folder / f"p{i}.png", part_image(i))
        d.settle()
    lines = results(cfg.out_dir)
    assert len(lines) == 6 and all("ref_" not in line["path"] for line in lines)
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


def test_results_are_stamped_with_the_wall_clock_given(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, min_pool=2, stable_s=0.5)
    with Stepped(cfg, model, clock) as d:
        write_png(cfg.folder / "a.png", part_image(0))
        write_png(cfg.folder / "b.png", part_image(1))
        d.step(0.0625)  # the scan that first sees them (steps exact in binary: 1/16, 1/4)
        seen = clock.wall()
        d.step(0.25)
        assert results(cfg.out_dir) == []  # 0.25 s stable of 0.5
        d.step(0.25)
        scored = clock.wall()
    lines = results(cfg.out_dir)
    assert [line["arrival_time"] for line in lines] == [iso_time(seen)] * 2
    assert [line["scoring_time"] for line in lines] == [iso_time(scored)] * 2
    assert lines[0]["arrival_time"].startswith("2023-11-14T22:13:20")  # the fake epoch, not today


# ----------------------------------------------------------------------------------------- sinks
def run_images(cfg, model, clock, sinks, seeds) -> None:
    """Write parts one settle apart (a line) and score them; the sinks are closed on exit."""
    with Stepped(cfg, model, clock, sinks=sinks) as d:
        for s in seeds:
            write_png(cfg.folder / f"p{s:03d}.png", part_image(s))
            d.settle()


def test_results_jsonl_is_the_same_with_a_dead_sink_which_catches_up_later(tmp_path, model) -> None:
    plain, failing = config(tmp_path / "plain", min_pool=2), config(tmp_path / "dead", min_pool=2)
    run_images(plain, model, FakeClock(), [], range(6))
    run_images(failing, model, FakeClock(), [DeadSink("mqtt")], range(6))
    # The same fake clock, the same images: byte for byte the same durable record (but the folder).
    assert (failing.out_dir / "results.jsonl").read_text().replace("/dead/", "/plain/") == \
        (plain.out_dir / "results.jsonl").read_text()
    assert len(results(failing.out_dir)) == 6
    assert SeqFile(failing.out_dir / "state" / "sinks" / "mqtt.seq").load() == -1
    # The broker is back: the restart catches up from the saved seq, every line in order.
    back = RecordingSink("mqtt")
    run_images(failing, model, FakeClock(), [back], [])
    assert back.seqs == [0, 1, 2, 3, 4, 5] and back.closed
    assert back.emitted == results(failing.out_dir)


def test_a_restart_delivers_only_what_the_sink_has_not_had(tmp_path, model, clock) -> None:
    cfg = config(tmp_path, min_pool=2)
    first, folder = RecordingSink("rec"), FolderSink(tmp_path / "outbox")
    run_images(cfg, model, clock, [first, folder], range(4))
    assert first.seqs == [0, 1, 2, 3]
    again = RecordingSink("rec")
    run_images(cfg, model, clock, [again, FolderSink(tmp_path / "outbox")], range(4, 7))
    assert again.seqs == [4, 5, 6]
    lines = results(cfg.out_dir)
    assert [json.loads(p.read_text()) for p in sorted((tmp_path / "outbox").iterdir())] == lines


def test_a_hung_sink_does_not_slow_scoring(tmp_path, model, clock) -> None:
    """The sink is stuck in its first emit (an event shows it) while every image is scored."""
    cfg = config(tmp_path, min_pool=2, sink_drain_s=10.0)
    hung = BlockedSink("webhook", limit_s=5.0)
    with Stepped(cfg, model, clock, sinks=[hung]) as d:
        for s in range(2):
            write_png(cfg.folder / f"p{s}.png", part_image(s))
        d.settle()
        assert hung.entered.wait(5.0), "the sink was never called"
        start = time.monotonic()
        for s in range(2, 8):
            write_png(cfg.folder / f"p{s}.png", part_image(s))
            d.settle()
        took = time.monotonic() - start
        assert len(results(cfg.out_dir)) == 8 and d.summary.scored == 8
        assert hung.returned == 0  # still stuck: scoring did not wait for it
        assert took < hung.limit_s
        hung.release.set()
    assert hung.seqs == list(range(8))  # the stop let it drain


def test_sinks_with_one_name_are_refused_before_anything_starts(tmp_path, model) -> None:
    cfg = config(tmp_path)
    with pytest.raises(InputError, match="two sinks named rec"):
        WatchDaemon(cfg, model, sinks=[RecordingSink(), RecordingSink()])
    assert not (cfg.out_dir / "state").exists()
