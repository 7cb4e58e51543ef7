"""The live page's data: results.jsonl indexed by seq, the daemon's status, latency statistics."""

from __future__ import annotations

import base64
import json
import os
import threading

import pytest

from musc_edge.core.errors import InputError
from musc_edge.watch.http import check_bind, is_loopback, parse_bind
from musc_edge.watch.journal import append_durably
from musc_edge.watch.live import BUCKETS_S, LatencyStats, LiveStatus, ResultsLog, file_of


def line(seq: int, **kw) -> str:
    rec = {"seq": seq, "path": f"/in/{seq}.png", "arrival_time": "2026-11-24T08:00:00.000+00:00",
           "scoring_time": f"2026-11-24T08:00:0{seq % 10}.000+00:00", "raw_score": 1.0 + seq / 100,
           "image_score": 0.5, "verdict": "anomalous" if seq % 4 == 3 else "good"}
    return json.dumps({**rec, **kw})


def test_results_are_read_incrementally_and_indexed_by_seq(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    log = ResultsLog(path)
    log.refresh()
    assert log.snapshot().scored == 0 and log.after(-1, 10) == []  # no file yet
    append_durably(path, [line(s) for s in range(10)])
    with open(path, "a") as f:
        f.write(line(10)[:15])  # being written: not a result yet
    log.refresh()
    snap = log.snapshot()
    assert (snap.scored, snap.anomalous, snap.first_seq, snap.last_seq) == (10, 2, 0, 9)
    assert [r["seq"] for r in log.after(3, 4)] == [4, 5, 6, 7]
    assert [r["seq"] for r in log.after(-1, 1000)] == list(range(10))
    assert log.get(7)["path"] == "/in/7.png" and log.get(10) is None and log.get(-3) is None
    with open(path, "a") as f:
        f.write(line(10)[15:] + "\n")
    log.refresh()
    assert log.snapshot().last_seq == 10 and log.get(10)["seq"] == 10
    # arrival to report: seq % 10 seconds each
    e2e = log.snapshot().end_to_end
    assert e2e.count == 11 and e2e.sum_s == pytest.approx(sum(s % 10 for s in range(11)))


def test_a_rotated_file_is_indexed_afresh(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    append_durably(path, [line(s) for s in range(20)])
    log = ResultsLog(path)
    log.refresh()
    path.rename(tmp_path / "old.jsonl")
    append_durably(path, [line(s) for s in range(20, 23)])
    log.refresh()
    snap = log.snapshot()
    assert (snap.scored, snap.first_seq, snap.last_seq) == (3, 20, 22)
    assert [r["seq"] for r in log.after(-1, 10)] == [20, 21, 22]


def test_lines_that_are_not_results_are_skipped(tmp_path) -> None:
    path = tmp_path / "results.jsonl"
    append_durably(path, [line(0), "not json", json.dumps({"no": "seq"}), line(1), line(1)])
    log = ResultsLog(path)
    log.refresh()
    assert [r["seq"] for r in log.after(-1, 10)] == [0, 1]  # the repeat of seq 1 is not a new image


def test_file_of_prefers_the_exact_bytes_of_a_name_that_is_not_utf8() -> None:
    name = os.fsdecode(b"/in/caf\xe9.png")  # a Latin-1 camera PC's name on a UTF-8 line PC
    rec = {"path": "/in/caf\ufffd.png", "path_bytes_b64": base64.b64encode(os.fsencode(name)).decode()}
    assert file_of(rec, "path") == name
    assert file_of({"path": "/in/a.png"}, "path") == "/in/a.png"
    assert file_of({"heatmap": None}, "heatmap") is None and file_of({}, "heatmap") is None
    assert file_of({"path": "x", "path_bytes_b64": "%%%"}, "path") is None  # garbage is no file


def test_latency_buckets_are_cumulative_with_le_bounds() -> None:
    stats = LatencyStats(recent=4)
    for v in (0.005, 0.02, 0.3, 100.0, 0.3):
        stats.observe(v)
    cum = dict(stats.cumulative())
    assert cum["0.005"] == 1  # a value on a bound counts in it (Prometheus' le)
    assert cum["0.025"] == 2 and cum["0.5"] == 4 and cum[repr(BUCKETS_S[-1])] == 4 and cum["+Inf"] == 5
    p = stats.percentiles()  # the last 4 only
    assert p["n"] == 4 and p["p50"] == 0.3 and p["p95"] == 100.0
    assert LatencyStats().percentiles() == {"p50": None, "p95": None, "n": 0}


def test_live_status_updates_snapshot_and_readiness() -> None:
    st = LiveStatus(window=32, min_pool=8, references=4)
    assert not st.ready
    st.update(model_loaded=True, pool_size=7)
    assert not st.ready and not st.snapshot()["ready"]
    st.update(pool_size=20, queue_length=3)
    snap = st.snapshot()
    assert st.ready and snap["ready"] and snap["window_fill"] == pytest.approx(16 / 32)
    with pytest.raises(AttributeError, match="no field pool"):
        st.update(pool=3)
    with pytest.raises(ValueError, match="stage"):
        st.observe("decode", 0.1)
    threads = [threading.Thread(target=lambda: [st.skip() or st.observe("scoring", 0.01) for _ in range(500)])
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = st.snapshot()
    assert snap["skipped"] == 2000 and snap["latency"]["scoring"].count == 2000
    snap["latency"]["scoring"].observe(1.0)  # a snapshot is a copy
    assert st.snapshot()["latency"]["scoring"].count == 2000


@pytest.mark.parametrize("text,expected", [("8080", ("127.0.0.1", 8080)), ("0.0.0.0:9000", ("0.0.0.0", 9000)),
                                           ("[::1]:8080", ("::1", 8080)), ("line-pc:80", ("line-pc", 80))])
def test_parse_bind(text, expected) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "1.2.3.4:", ":80", "70000", "[::1]8080", "host:-1"])
def test_parse_bind_refuses_nonsense(text) -> None:
    with pytest.raises(InputError, match=r"\[HOST:\]PORT"):
        parse_bind(text)


def test_loopback_and_the_token_rule() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1") and is_loopback("localhost")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.20", "line-pc.local", "localhost.evil"))
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "x" * 16)
    with pytest.raises(InputError, match="reachable from the network.*--http-token") as e:
        check_bind("0.0.0.0", None)
    assert "\n" not in str(e.value)  # one line
    with pytest.raises(InputError, match="at least 16"):
        check_bind("0.0.0.0", "short")
