"""Sinks over results.jsonl (docs/watch.md, "Sinks"): order, catch-up, backoff, isolation.

Delivery is pumped by hand on a FakeClock, except where the point is the threads (a hung sink
must not hold up the producer): there an event shows the sink stuck while the producer goes on.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

from musc_edge.core.errors import InputError, StateError
from musc_edge.watch.clock import FakeClock
from musc_edge.watch.journal import append_durably
from musc_edge.watch.sinks import Backoff, Dispatcher, FolderSink, SeqFile, complete_lines

sys.path.insert(0, str(Path(__file__).parent))
from watch_fakes import BlockedSink, DeadSink, RecordingSink  # noqa: E402


def add_results(out: Path, seqs) -> None:
    """Lines as the journal writes them (one append, fsynced)."""
    append_durably(out / "results.jsonl", (json.dumps({"seq": s, "path": f"p{s}.png"}) for s in seqs))


def dispatcher(out: Path, sinks, clock: FakeClock, **kw) -> Dispatcher:
    kw.setdefault("backoff", Backoff(1.0, 8.0))
    return Dispatcher(sinks, out / "results.jsonl", out / "state", clock=clock.monotonic, **kw)


def saved_seq(out: Path, name: str) -> int:
    return SeqFile(out / "state" / "sinks" / f"{name}.seq").load()


def test_a_sink_that_fails_then_recovers_gets_every_seq_once_in_order(tmp_path, caplog) -> None:
    clock = FakeClock()
    sink = RecordingSink(fail=3, clock=clock)
    d = dispatcher(tmp_path, [sink], clock)
    add_results(tmp_path, range(10))
    before = (tmp_path / "results.jsonl").read_bytes()
    with caplog.at_level(logging.DEBUG, logger="musc_edge.watch.sinks"):
        for _ in range(80):  # pump every 1/8 s (exact in binary) of fake time for 10 s
            d.pump()
            clock.advance(0.125)
    assert sink.tries == [0.0, 1.0, 3.0] + [7.0] * 10  # backoff 1, 2, 4 s (not every pump), then all 10
    assert sink.seqs == list(range(10))  # none missing, none twice, in order
    add_results(tmp_path, range(10, 15))
    d.pump()
    assert sink.seqs == list(range(15))
    assert saved_seq(tmp_path, "rec") == 14
    assert (tmp_path / "results.jsonl").read_bytes()[:len(before)] == before  # sinks never write it
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # once per outage, not per line or per try
    assert "sink rec failed after seq -1 (ConnectionError: broker unreachable)" in warnings[0]
    assert "retrying with backoff from seq 0" in warnings[0]
    assert "recovered after 3 failed tries (7.0 s)" in warnings[1]


def test_a_failure_mid_backlog_resumes_at_the_line_that_failed(tmp_path) -> None:
    clock = FakeClock()

    class FailsOnSeq3(RecordingSink):
        def emit(self, result):
            if result["seq"] == 3 and self.fail:
                self.fail -= 1
                raise OSError("disk full")
            self.emitted.append(result)

    sink = FailsOnSeq3(fail=2)
    d = dispatcher(tmp_path, [sink], clock)
    add_results(tmp_path, range(8))
    d.pump()
    assert sink.seqs == [0, 1, 2] and saved_seq(tmp_path, "rec") == 2
    clock.advance(1.0)
    d.pump()
    assert sink.seqs == [0, 1, 2]  # failed again; next try 2 s later
    clock.advance(1.9)
    d.pump()
    assert sink.seqs == [0, 1, 2]  # still backing off
    clock.advance(0.1)
    d.pump()
    assert sink.seqs == list(range(8))


def test_a_restart_resumes_from_the_saved_seq(tmp_path) -> None:
    clock = FakeClock()
    add_results(tmp_path, range(5))
    first = RecordingSink("mqtt")
    d = dispatcher(tmp_path, [first], clock)
    d.pump()
    d.close()
    assert first.seqs == [0, 1, 2, 3, 4] and first.closed
    assert (tmp_path / "state" / "sinks" / "mqtt.seq").read_text() == "4\n"
    add_results(tmp_path, range(5, 8))  # scored while the daemon ran without this sink, say
    again, newcomer = RecordingSink("mqtt"), RecordingSink("webhook")
    d = dispatcher(tmp_path, [again, newcomer], clock)
    d.pump()
    assert again.seqs == [5, 6, 7]  # from its saved seq, nothing twice
    assert newcomer.seqs == list(range(8))  # no saved seq: the whole of results.jsonl


def test_a_crash_between_emit_and_save_delivers_that_line_again(tmp_path, monkeypatch) -> None:
    """At least once: the one line whose seq was not saved comes again, then the rest in order."""
    clock = FakeClock()
    sink = RecordingSink()
    d = dispatcher(tmp_path, [sink], clock)
    add_results(tmp_path, range(4))
    original = SeqFile.save
    calls = {"n": 0}

    def save_fails_once(self, seq):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("no space left on device")
        original(self, seq)

    monkeypatch.setattr(SeqFile, "save", save_fails_once)
    d.pump()
    clock.advance(1.0)
    d.pump()
    assert sink.seqs == [0, 1, 1, 2, 3]
    assert saved_seq(tmp_path, "rec") == 3


def test_a_line_being_written_waits_until_it_is_complete(tmp_path) -> None:
    clock = FakeClock()
    sink = RecordingSink()
    d = dispatcher(tmp_path, [sink], clock)
    add_results(tmp_path, [0, 1])
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('{"seq": 2, "pa')
    d.pump()
    assert sink.seqs == [0, 1]
    with open(tmp_path / "results.jsonl", "a") as f:
        f.write('th": "p2.png"}\n')
    d.pump()
    assert sink.seqs == [0, 1, 2]


def test_complete_lines_reads_a_backlog_in_pieces(tmp_path, monkeypatch) -> None:
    """A long outage leaves more than one read's worth: lines split across reads come out whole."""
    import musc_edge.watch.sinks as sinks

    monkeypatch.setattr(sinks, "_CHUNK", 7)
    add_results(tmp_path, range(30))
    lines = list(complete_lines(tmp_path / "results.jsonl", 0))
    assert [json.loads(raw)["seq"] for _, raw in lines] == list(range(30))
    assert lines[-1][0] == (tmp_path / "results.jsonl").stat().st_size
    assert [json.loads(raw)["seq"] for _, raw in complete_lines(tmp_path / "results.jsonl", lines[9][0])] == \
        list(range(10, 30))


def test_a_dead_sink_does_not_hold_up_the_others_and_leaves_results_alone(tmp_path) -> None:
    clock = FakeClock()
    dead, live = DeadSink(), RecordingSink("live")
    d = dispatcher(tmp_path, [dead, live], clock)
    add_results(tmp_path, range(6))
    before = (tmp_path / "results.jsonl").read_bytes()
    for _ in range(20):
        d.pump()
        clock.advance(3.0)
    assert live.seqs == list(range(6))
    assert dead.emitted == [] and saved_seq(tmp_path, "dead") == -1
    assert len(dead.tries) == 9  # only once the delay (1, 2, 4, then the 8 s cap) has passed: not 20
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_folder_sink_writes_one_json_file_per_result(tmp_path) -> None:
    clock = FakeClock()
    d = dispatcher(tmp_path, [FolderSink(tmp_path / "outbox")], clock)
    add_results(tmp_path, range(3))
    d.pump()
    files = sorted(p.name for p in (tmp_path / "outbox").iterdir())
    assert files == ["00000000.json", "00000001.json", "00000002.json"]  # no temp files left over
    assert json.loads((tmp_path / "outbox" / "00000001.json").read_text()) == {"seq": 1, "path": "p1.png"}
    assert saved_seq(tmp_path, "folder") == 2


def test_a_hung_sink_never_holds_up_the_producer(tmp_path) -> None:
    """The producer's side is append + notify; with the sink stuck in emit it must all go through."""
    hung = BlockedSink(limit_s=5.0)
    d = Dispatcher([hung], tmp_path / "results.jsonl", tmp_path / "state", drain_s=5.0)
    d.start()
    try:
        add_results(tmp_path, [0])
        d.notify()
        assert hung.entered.wait(5.0), "the sink thread never called emit"
        start = time.monotonic()
        for seq in range(1, 50):
            add_results(tmp_path, [seq])
            d.notify()
        took = time.monotonic() - start
        assert hung.returned == 0  # the sink was stuck in its first emit all along
        assert took < hung.limit_s  # had notify waited for the sink, this would be >= 5 s
    finally:
        hung.release.set()
        d.close()
    assert hung.seqs == list(range(50)) and hung.closed  # the stop drained what was committed


def test_close_does_not_wait_forever_for_a_hung_sink(tmp_path, caplog) -> None:
    hung = BlockedSink(limit_s=5.0)
    d = Dispatcher([hung], tmp_path / "results.jsonl", tmp_path / "state", drain_s=0.2)
    d.start()
    add_results(tmp_path, [0, 1])
    d.notify()
    assert hung.entered.wait(5.0)
    start = time.monotonic()
    try:
        d.close()
        assert time.monotonic() - start < 2.0
        assert "sink hung still busy after 0.2 s; it resumes after seq -1" in caplog.text
        assert not hung.closed  # still in use by its thread: not closed under it
    finally:
        hung.release.set()


def test_sink_names_and_seq_files_are_checked(tmp_path) -> None:
    clock = FakeClock()
    with pytest.raises(InputError, match="two sinks named rec"):
        dispatcher(tmp_path, [RecordingSink(), RecordingSink()], clock)
    with pytest.raises(InputError, match="cannot name a file in state/sinks/"):
        dispatcher(tmp_path, [RecordingSink("../escape")], clock)
    (tmp_path / "state" / "sinks").mkdir(parents=True)
    (tmp_path / "state" / "sinks" / "rec.seq").write_text("garbage")
    with pytest.raises(StateError, match="delete it to deliver results.jsonl to that sink again"):
        dispatcher(tmp_path, [RecordingSink()], clock)


def test_backoff_doubles_up_to_its_cap() -> None:
    assert [Backoff(1.0, 10.0).delay(n) for n in range(1, 7)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert Backoff(1.0, 60.0).delay(10_000) == 60.0
    with pytest.raises(InputError, match="0 < initial"):
        Backoff(0.0, 1.0)


def test_a_failing_close_is_logged_not_raised(tmp_path, caplog) -> None:
    class BadClose(RecordingSink):
        def close(self):
            raise RuntimeError("socket already gone")

    other = RecordingSink("other")
    dispatcher(tmp_path, [BadClose("bad"), other], FakeClock()).close()
    assert "sink bad: close failed (RuntimeError: socket already gone)" in caplog.text
    assert other.closed
