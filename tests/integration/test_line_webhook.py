"""WebhookSink against a real HTTP server (http.server in a thread) with injected failures.

The endpoint answers 500 and 503, redirects, hangs, and goes away (connection refused) for a
while; the dispatcher's real threads retry with backoff (docs/watch.md, "Sinks"). What the
endpoint *accepted* (answered 2xx) must be every seq, at least once, in order.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from musc_edge.watch.journal import append_durably
from musc_edge.watch.outbound import parse_header
from musc_edge.watch.sinks import Backoff, Dispatcher, SeqFile
from musc_edge.watch.webhook import WebhookError, WebhookSink

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import first_occurrences, wait_for  # noqa: E402


class Endpoint:
    """An HTTP endpoint on 127.0.0.1 whose answer to each POST is decided by ``plan(seq, attempt)``:
    an int status, "redirect", or "hang" (sleep past the client's timeout, then 200)."""

    def __init__(self, plan=lambda seq, attempt: 200, port: int = 0) -> None:
        self.plan = plan
        self.accepted: list[dict] = []
        self.headers: list[dict] = []
        self.attempts: dict[int, int] = {}
        self.answers: list[tuple[int, object]] = []
        self._lock = threading.Lock()
        self.port = port
        self.server: ThreadingHTTPServer | None = None
        self.start()

    def start(self) -> None:
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                msg = json.loads(body)
                with endpoint._lock:
                    attempt = endpoint.attempts.get(msg["seq"], 0) + 1
                    endpoint.attempts[msg["seq"]] = attempt
                answer = endpoint.plan(msg["seq"], attempt)
                with endpoint._lock:
                    endpoint.answers.append((msg["seq"], answer))
                if answer == "hang":
                    time.sleep(1.0)
                    answer = 200
                if answer == "redirect":
                    self.send_response(302)
                    self.send_header("Location", "/elsewhere")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                payload = b"ok" if answer < 300 else b"database is down"
                self.send_response(answer)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                if 200 <= answer < 300:
                    with endpoint._lock:
                        endpoint.accepted.append(msg)
                        endpoint.headers.append(dict(self.headers))

            def do_GET(self) -> None:  # noqa: N802 - a redirect followed as GET would land here
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that timed out on "hang" leaves a broken pipe: expected here

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def seqs(self) -> list[int]:
        with self._lock:
            return [m["seq"] for m in self.accepted]


def add_results(out: Path, seqs) -> None:
    append_durably(out / "results.jsonl", (json.dumps({"seq": s, "path": f"/in/p{s}.png", "raw_score": 1 + s / 1000,
                                                       "verdict": "good"}) for s in seqs))


def test_every_seq_is_accepted_at_least_once_in_order_through_failures(tmp_path, monkeypatch, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="musc_edge.watch.sinks")  # repeated tries log at debug

    def plan(seq: int, attempt: int):
        if seq == 3 and attempt == 1:
            return 500
        if seq == 7 and attempt <= 2:
            return 503
        if seq == 11 and attempt == 1:
            return "redirect"  # followed as a GET it would answer 200: must count as a failure
        if seq == 14 and attempt == 1:
            return 404
        return 200

    endpoint = Endpoint(plan)
    port = endpoint.port
    monkeypatch.setenv("MES_TOKEN", "Bearer line3-secret")
    out = tmp_path / "out"
    out.mkdir()
    sink = WebhookSink(endpoint.url, headers=[parse_header("Authorization: env:MES_TOKEN"),
                                              parse_header("X-Line: 3")], timeout_s=2, source="cam1")
    d = Dispatcher([sink], out / "results.jsonl", out / "state", backoff=Backoff(0.02, 0.2), idle_s=0.1)
    d.start()
    total = 60
    try:
        for seq in range(total):
            add_results(out, [seq])
            d.notify()
            if seq == 25:
                wait_for(lambda: len(endpoint.seqs()) >= 20, 20, "the first part")
                endpoint.stop()  # the port is closed: connection refused
                stopped = time.monotonic()
            if seq == 40:
                time.sleep(max(0.0, 0.6 - (time.monotonic() - stopped)))  # down for 0.6 s at least
                endpoint.port = port
                endpoint.start()  # back on the same port
            time.sleep(0.01)
        wait_for(lambda: set(endpoint.seqs()) >= set(range(total)), 30, "every seq accepted")
    finally:
        d.close()
        endpoint.stop()
    got = endpoint.seqs()
    assert first_occurrences(got) == list(range(total)), got
    failures = [(s, a) for s, a in endpoint.answers if a != 200]
    assert (3, 500) in failures and (7, 503) in failures and (11, "redirect") in failures and (14, 404) in failures
    assert "Connection refused" in caplog.text  # the outage happened (first try: warning, later: debug)
    h = endpoint.headers[0]
    assert h["Authorization"] == "Bearer line3-secret" and h["X-Line"] == "3"
    assert h["Content-Type"] == "application/json"
    assert {(hh["Idempotency-Key"], hh["X-Musc-Edge-Seq"]) for hh in endpoint.headers[:3]} == \
        {("cam1:0", "0"), ("cam1:1", "1"), ("cam1:2", "2")}
    assert endpoint.accepted[5] == {"schema": "musc-edge.result/1", "source": "cam1", "seq": 5, "path": "/in/p5.png",
                                    "raw_score": 1.005, "verdict": "good"}
    assert SeqFile(out / "state" / "sinks" / "webhook.seq").load() == total - 1


def test_non_2xx_refused_and_timeouts_raise(tmp_path) -> None:
    answers = iter([500, "redirect", 204, "hang"])
    endpoint = Endpoint(lambda seq, attempt: next(answers))
    sink = WebhookSink(endpoint.url, timeout_s=0.3)
    try:
        with pytest.raises(WebhookError, match=r"answered HTTP 500 .* to seq 0: database is down"):
            sink.emit({"seq": 0})
        with pytest.raises(WebhookError, match="HTTP 302"):
            sink.emit({"seq": 1})
        sink.emit({"seq": 2})  # 204 is a 2xx: delivered
        with pytest.raises((TimeoutError, ConnectionError)):
            sink.emit({"seq": 3})
    finally:
        endpoint.stop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectionError, match="Connection refused"):
        WebhookSink(f"http://127.0.0.1:{free}/hook", timeout_s=1).emit({"seq": 4})
