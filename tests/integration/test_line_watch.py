"""``musc-edge watch`` with the line's outputs switched on by its flags (docs/line.md).

The CLI runs in a subprocess, as systemd runs it, on the tiny ONNX model: the live page and
/metrics agree with results.jsonl, a webhook receives every seq, a real Mosquitto (skipped where
there is none, as in tests/integration/test_line_mqtt.py) one message per image, and bad
combinations of flags are one line and exit 2 before the model is even opened.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musc_edge.cli import main
from musc_edge.core.threshold import Threshold, normalised_score, write_threshold

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import part_image, results, wait_for, write_png  # noqa: E402

try:
    from test_line_mqtt import MOSQUITTO, Broker, Subscriber  # noqa: E402
except (ImportError, pytest.skip.Exception):  # paho-mqtt missing: only the MQTT test is skipped
    MOSQUITTO = Broker = Subscriber = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    from musc_edge.runtime.testing import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("model") / "tiny.onnx")


class Watch:
    """``python -m musc_edge watch`` on ``tmp/in`` -> ``tmp/out``; :meth:`stop` sends SIGTERM."""

    def __init__(self, tmp_path: Path, model_path: Path, *extra: str) -> None:
        self.folder, self.out = tmp_path / "in", tmp_path / "out"
        self.folder.mkdir(exist_ok=True)
        self.log = tmp_path / "watch.log"
        cmd = [sys.executable, "-m", "musc_edge", "watch", str(self.folder), "--model", str(model_path),
               "--out", str(self.out), "--window", "6", "--min-pool", "3", "--stable", "0.1", "--device", "cpu",
               *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("MUSC_EDGE_HTTP_TOKEN", None)
        self._log = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def alive(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"watch exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        return True

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=60)
        finally:
            self._log.close()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


class WebhookReceiver:
    """An endpoint on loopback recording the seq of every POST (the body, and the header beside it)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                receiver.bodies.append(body)
                receiver.headers.append(dict(self.headers))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/mes/results"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def seqs(self) -> list[int]:
        return [b["seq"] for b in list(self.bodies)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def metric_values(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples if not s.labels
            or set(s.labels) == set()}


def test_page_metrics_and_webhook_agree_with_results_jsonl(tmp_path, model_path) -> None:
    th = Threshold(value=0.9, score="raw_score", method="f1", target=None, scale=0.05, basis="labels",
                   n_good=10, n_anomalous=2)
    write_threshold(tmp_path / "threshold.json", th)
    hook = WebhookReceiver()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    (tmp_path / "in").mkdir()
    for i in range(6):
        write_png(tmp_path / "in" / f"old_{i}.png", part_image(i))
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image at all")  # skipped: the skip counter
    watch = Watch(tmp_path, model_path, "--http", f"127.0.0.1:{port}", "--webhook", hook.url,
                  "--webhook-header", "X-Line: 3", "--source", "cam1", "--threshold-file",
                  str(tmp_path / "threshold.json"))
    try:
        wait_for(lambda: watch.alive() and _up(base), timeout=60, what="the live page")
        for i in range(6):
            write_png(watch.folder / f"new_{i}.png", part_image(10 + i, defect=(i == 3)))
            time.sleep(0.1)
        wait_for(lambda: watch.alive() and len(results(watch.out)) == 12, timeout=60, what="12 results")
        wait_for(lambda: set(hook.seqs()) >= set(range(12)), timeout=30, what="12 webhook POSTs")
        lines = results(watch.out)
        api = json.loads(get(f"{base}/api/results?after=-1&limit=1000"))["results"]
        status = json.loads(get(f"{base}/api/status"))
        metrics = metric_values(get(f"{base}/metrics").decode())
        assert get(f"{base}/").startswith(b"<!")  # the page itself
        ready = urllib.request.urlopen(f"{base}/readyz", timeout=10).status
    finally:
        rc = watch.stop()
        hook.close()
    assert rc == 0, watch.log.read_text()[-2000:]
    assert [line["seq"] for line in lines] == list(range(12))
    assert api == lines  # the API serves results.jsonl
    assert status["counts"] == {"scored": 12, "anomalous": sum(x["verdict"] == "anomalous" for x in lines),
                                "skipped": 1}
    assert status["model_loaded"] and status["ready"] and ready == 200
    assert (status["window"], status["min_pool"], status["references"], status["threshold"]) == (6, 3, 0, 0.9)
    assert status["pool_size"] == 6 and status["queue_length"] == 0 and status["device"].startswith("onnxruntime")
    assert status["latency_s"]["features"]["n"] >= 1 and status["latency_s"]["scoring"]["n"] == 12
    assert metrics["musc_edge_images_scored_total"] == len(lines) == 12
    assert metrics["musc_edge_images_skipped_total"] == 1
    assert metrics["musc_edge_scoring_seconds_count"] == 12
    assert metrics["musc_edge_feature_extraction_seconds_count"] >= 1
    assert metrics["musc_edge_arrival_to_report_seconds_count"] == 12
    assert metrics["musc_edge_threshold"] == 0.9
    for line in lines:  # the threshold file: its value decides, and the normalised score is beside the raw one
        assert line["verdict"] == ("anomalous" if line["raw_score"] >= 0.9 else "good")
        assert line["normalised_score"] == pytest.approx(normalised_score(line["raw_score"], th), abs=1e-6)
    # every seq POSTed (at least once, in order), tagged with the source, the header on each
    firsts = list(dict.fromkeys(hook.seqs()))
    assert firsts == list(range(12))
    by_seq = {b["seq"]: b for b in hook.bodies}
    assert all(by_seq[x["seq"]]["raw_score"] == x["raw_score"] and by_seq[x["seq"]]["source"] == "cam1"
               for x in lines)
    assert by_seq[5]["normalised_score"] == lines[5]["normalised_score"]
    assert all(h["X-Line"] == "3" and h["Idempotency-Key"].startswith("cam1:") for h in hook.headers)


def _up(base: str) -> bool:
    try:
        return get(f"{base}/healthz") is not None
    except OSError:
        return False


@pytest.mark.skipif(MOSQUITTO is None, reason="no mosquitto binary or paho-mqtt: apt-get install -y mosquitto, "
                                              "pip install 'musc-edge[line]'")
def test_mqtt_gets_one_message_per_image(tmp_path, model_path) -> None:
    broker = Broker(tmp_path / "broker").start()
    sub = Subscriber(broker.port, topic="factory/line3/musc")
    (tmp_path / "in").mkdir()
    for i in range(4):
        write_png(tmp_path / "in" / f"old_{i}.png", part_image(i))
    watch = Watch(tmp_path, model_path, "--mqtt", f"127.0.0.1:{broker.port}", "--mqtt-topic", "factory/line3/musc",
                  "--source", "cam1", "--threshold", "0.9")
    try:
        wait_for(lambda: watch.alive() and len(results(watch.out)) == 4, timeout=60, what="4 results")
        for i in range(4):
            write_png(watch.folder / f"new_{i}.png", part_image(20 + i))
            time.sleep(0.1)
        wait_for(lambda: watch.alive() and len(sub.seqs()) >= 8, timeout=60, what="8 MQTT messages")
        time.sleep(0.3)  # nothing more comes
    finally:
        rc = watch.stop()
        sub.close()
        broker.stop()
    assert rc == 0, watch.log.read_text()[-2000:]
    lines = results(watch.out)
    assert sub.seqs() == [line["seq"] for line in lines] == list(range(8))  # one per image, in order
    for m, line in zip(sub.messages, lines):
        assert (m["source"], m["path"], m["raw_score"], m["verdict"]) == ("cam1", line["path"], line["raw_score"],
                                                                         line["verdict"])


@pytest.mark.parametrize("args, message", [
    (["--mqtt", "127.0.0.1", "--mqtt-rate-limit", "2"], "--mqtt-rate-limit attaches the heatmap overlays"),
    (["--webhook", "http://127.0.0.1:9/x", "--webhook-rate-limit", "1"], "it needs --heatmaps"),
    (["--threshold", "0.8", "--threshold-file", "THRESHOLD"], "not both"),
    (["--http", "0.0.0.0:8080"], "--http 0.0.0.0 is reachable from the network"),
    (["--http", "nonsense:port"], "--http expects [HOST:]PORT"),
    (["--http-token-file", "TOKEN"], "give --http [HOST:]PORT too"),
    (["--mqtt-username", "line3"], "give --mqtt HOST[:PORT] too"),
    (["--mqtt", "broker:99999"], "--mqtt expects HOST[:PORT]"),
    (["--webhook", "ftp://mes/x"], "--webhook expects an http:// or https:// URL"),
    (["--webhook", "http://mes/x", "--webhook-header", "no colon"], "expected a header as 'Name: value'"),
    (["--threshold-file", "MISSING"], "threshold file not found"),
])
def test_bad_flags_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, args, message) -> None:
    monkeypatch.delenv("MUSC_EDGE_HTTP_TOKEN", raising=False)
    (tmp_path / "token").write_text("0123456789abcdef0123\n")
    (tmp_path / "token").chmod(0o600)
    write_threshold(tmp_path / "threshold.json", Threshold(value=0.9, score="raw_score", method="f1", target=None,
                                                           scale=0.05, basis="labels", n_good=10, n_anomalous=2))
    names = {"THRESHOLD": str(tmp_path / "threshold.json"), "TOKEN": str(tmp_path / "token"),
             "MISSING": str(tmp_path / "missing.json")}
    args = [names.get(a, a) for a in args]
    # the model does not exist: an error about it would mean the flags were checked too late
    rc = main(["watch", str(tmp_path / "in"), "--model", str(tmp_path / "no_model.onnx"), "--out",
               str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err and "Traceback" not in err and "no_model" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_http_token_on_the_command_line_is_warned_about(tmp_path, capsys, caplog, monkeypatch) -> None:
    monkeypatch.delenv("MUSC_EDGE_HTTP_TOKEN", raising=False)
    caplog.set_level(logging.WARNING, logger="musc_edge.cli.commands.watch")
    rc = main(["watch", str(tmp_path / "in"), "--model", str(tmp_path / "no_model.onnx"), "--out",
               str(tmp_path / "out"), "--http", "0.0.0.0:8080", "--http-token", "short"])
    err = capsys.readouterr().err
    assert rc == 2 and "at least 16" in err, err
    assert "visible to every user of this machine (ps" in caplog.text


def test_score_with_a_threshold_file_adds_the_normalised_score(tmp_path, model_path, capsys) -> None:
    import csv

    data = tmp_path / "flat"
    data.mkdir()
    for i in range(6):
        write_png(data / f"p{i}.png", part_image(i, defect=(i == 4)))
    th = Threshold(value=0.9, score="raw_score", method="f1", target=None, scale=0.05, basis="labels",
                   n_good=10, n_anomalous=2)
    write_threshold(tmp_path / "threshold.json", th)
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model_path), "--out", str(out), "--quiet", "--device", "cpu",
                 "--threshold-file", str(tmp_path / "threshold.json")]) == 0
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6 and list(rows[0])[:4] == ["path", "image_score", "raw_score", "normalised_score"]
    for row in rows:
        raw = float(row["raw_score"])
        assert float(row["normalised_score"]) == pytest.approx(normalised_score(raw, th), abs=1e-12)
        assert row["verdict"] == ("anomalous" if raw >= 0.9 else "good")
    run = json.loads((out / "run.json").read_text())
    assert run["threshold_file"]["value"] == 0.9 and run["threshold_file"]["scale"] == 0.05
    capsys.readouterr()
    assert main(["score", str(data), "--model", str(model_path), "--out", str(out), "--threshold", "0.5",
                 "--threshold-file", str(tmp_path / "threshold.json")]) == 2
    assert "not both" in capsys.readouterr().err
