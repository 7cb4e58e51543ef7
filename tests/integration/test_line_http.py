"""The live page's server on loopback, through a real HTTP client (urllib): routes, /metrics, security.

docs/line.md, "Live page and metrics". The server reads results.jsonl as the daemon writes it
(whole lines, appended) and a LiveStatus the test updates as the daemon would.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.watch.journal import append_durably
from musc_edge.watch.live import LiveStatus

prometheus = pytest.importorskip("prometheus_client", reason="prometheus-client is not installed: "
                                                             "pip install 'musc-edge[line]'")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from musc_edge.watch import http as live_http  # noqa: E402
from musc_edge.watch.http import LiveServer  # noqa: E402

TOKEN = "t0ken-for-tests-0123456789"


def write_image(path: Path, seed: int, size=(120, 160)) -> Path:
    rng = np.random.default_rng(seed)
    img = (rng.random((*size, 3)) * 255).astype(np.uint8)
    ok, buf = cv2.imencode(path.suffix, img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def add_results(root: Path, seqs, *, verdict=lambda s: "anomalous" if s % 5 == 4 else "good") -> None:
    """Result lines as the daemon writes them, each with its image and heatmap on disk."""
    (root / "in").mkdir(exist_ok=True)
    (root / "out" / "heatmaps").mkdir(parents=True, exist_ok=True)
    lines = []
    for s in seqs:
        image = write_image(root / "in" / f"part_{s:04d}.png", s)
        heat = write_image(root / "out" / "heatmaps" / f"{s:08d}_part_{s:04d}.png", 1000 + s)
        lines.append(json.dumps({"seq": s, "path": str(image), "arrival_time": "2026-11-24T08:00:00.000+00:00",
                                 "scoring_time": f"2026-11-24T08:00:00.{(s % 9) + 1}00+00:00",
                                 "image_score": 0.3, "raw_score": 1.0 + s / 100, "pool_size": 8,
                                 "verdict": verdict(s), "heatmap": str(heat)}))
    append_durably(root / "out" / "results.jsonl", lines)


def status() -> LiveStatus:
    return LiveStatus(model="vit_b16_224.onnx", weights="openai", device="cpu", window=32, min_pool=8,
                      references=4, threshold=1.05)


@pytest.fixture
def served(tmp_path):
    add_results(tmp_path, range(12))
    st = status()
    with LiveServer(tmp_path / "out" / "results.jsonl", st, port=0) as server:
        yield server, st, tmp_path


def get(url: str, headers: dict | None = None, method: str = "GET") -> tuple[int, dict, bytes]:
    """(status, headers, body), also for 4xx/5xx; no redirects followed."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None

    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def raw_request(server: LiveServer, target: str, method: str = "GET", host_header: str | None = None) -> int:
    """A request line sent as-is (urllib would normalise ``..`` and percent-escapes)."""
    host, port = server.address
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True, skip_host=host_header is not None)
        if host_header is not None:
            conn.putheader("Host", host_header)
        conn.endheaders()
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


# ----------------------------------------------------------------------------------------- routes
def test_page_and_its_assets_are_served_by_us(served) -> None:
    server, _, _ = served
    code, headers, body = get(server.url)
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    html = body.decode()
    assert '<script src="/static/live.js"' in html and "http" not in html.replace("http://www.w3.org", "")  # no CDN
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    for name, ctype in (("live.js", "text/javascript"), ("live.css", "text/css"), ("favicon.svg", "image/svg+xml")):
        code, headers, body = get(server.url + "static/" + name)
        assert code == 200 and headers["Content-Type"].startswith(ctype) and body
    js = get(server.url + "static/live.js")[2].decode()
    assert "innerHTML" not in js  # server data is written as text, never as markup


def test_api_results_pages_by_seq(served) -> None:
    server, _, root = served
    code, _, body = get(server.url + "api/results?after=3&limit=4")
    assert code == 200 and [r["seq"] for r in json.loads(body)["results"]] == [4, 5, 6, 7]
    assert [r["seq"] for r in json.loads(get(server.url + "api/results")[2])["results"]] == list(range(12))
    add_results(root, range(12, 15))
    got = json.loads(get(server.url + "api/results?after=11")[2])["results"]
    assert [r["seq"] for r in got] == [12, 13, 14]
    assert json.loads(get(server.url + "api/results?after=14")[2])["results"] == []


def test_api_status_health_and_readiness(served) -> None:
    server, st, _ = served
    s = json.loads(get(server.url + "api/status")[2])
    assert s["counts"] == {"scored": 12, "anomalous": 2, "skipped": 0}
    assert (s["model"], s["device"], s["references"], s["window"], s["threshold"]) == \
        ("vit_b16_224.onnx", "cpu", 4, 32, 1.05)
    assert s["last_seq"] == 11 and s["last"]["seq"] == 11 and s["latency_s"]["end_to_end"]["n"] == 12
    assert get(server.url + "healthz")[0] == 200
    code, _, body = get(server.url + "readyz")
    assert code == 503 and json.loads(body)["reason"] == "model not loaded"
    st.update(model_loaded=True, pool_size=5)
    assert "5 of the 8" in json.loads(get(server.url + "readyz")[2])["reason"]
    st.update(pool_size=20, queue_length=2)
    st.skip(3)
    st.observe("features", 0.04)
    assert get(server.url + "readyz")[0] == 200
    s = json.loads(get(server.url + "api/status")[2])
    assert s["ready"] and s["window_fill"] == 0.5 and s["counts"]["skipped"] == 3 and s["queue_length"] == 2
    assert s["latency_s"]["features"]["p50"] == 0.04


def test_images_and_heatmaps_by_seq(served) -> None:
    server, _, root = served
    code, headers, body = get(server.url + "image/3")
    assert code == 200 and headers["Content-Type"] == "image/png"
    assert body == (root / "in" / "part_0003.png").read_bytes()
    code, headers, body = get(server.url + "heatmap/3?thumb=1")
    assert code == 200 and headers["Content-Type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    assert get(server.url + "heatmap/3")[2] == (root / "out" / "heatmaps" / "00000003_part_0003.png").read_bytes()
    assert get(server.url + "image/99")[0] == 404  # no such seq
    (root / "in" / "part_0005.png").unlink()
    assert get(server.url + "image/5")[0] == 404  # moved away since: gone, not an error
    code, headers, body = get(server.url + "image/3", method="HEAD")
    assert code == 200 and body == b"" and int(headers["Content-Length"]) > 0


def test_an_image_whose_name_is_not_utf8_is_served_from_its_exact_bytes(tmp_path) -> None:
    import base64
    import os

    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    write_image(Path(os.fsdecode(raw)), 1)
    line = {"seq": 0, "path": raw.decode("utf-8", "replace"), "path_bytes_b64": base64.b64encode(raw).decode(),
            "raw_score": 1.0}
    append_durably(tmp_path / "results.jsonl", [json.dumps(line)])
    with LiveServer(tmp_path / "results.jsonl", status(), port=0) as server:
        code, _, body = get(server.url + "image/0")
    assert code == 200 and body == Path(os.fsdecode(raw)).read_bytes()


def test_metrics_parse_and_counters_equal_the_lines_of_results_jsonl(served) -> None:
    server, st, root = served
    st.update(model_loaded=True, pool_size=20, queue_length=1)
    st.observe("features", 0.2)
    st.observe("scoring", 0.03)
    st.skip()

    def scrape() -> dict:
        code, headers, body = get(server.url + "metrics")
        assert code == 200 and headers["Content-Type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(body.decode())}

    def value(fam, sample_name: str, **labels) -> float:
        return next(s.value for s in fam.samples
                    if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()))

    def lines() -> list[dict]:
        return [json.loads(x) for x in (root / "out" / "results.jsonl").read_text().splitlines()]

    m = scrape()
    assert value(m["musc_edge_images_scored"], "musc_edge_images_scored_total") == len(lines()) == 12
    assert value(m["musc_edge_images_anomalous"], "musc_edge_images_anomalous_total") == \
        sum(r["verdict"] == "anomalous" for r in lines())
    assert value(m["musc_edge_images_skipped"], "musc_edge_images_skipped_total") == 1
    e2e = m["musc_edge_arrival_to_report_seconds"]
    assert value(e2e, "musc_edge_arrival_to_report_seconds_count") == 12
    assert value(e2e, "musc_edge_arrival_to_report_seconds_bucket", le="+Inf") == 12
    assert value(m["musc_edge_feature_extraction_seconds"], "musc_edge_feature_extraction_seconds_sum") == 0.2
    assert value(m["musc_edge_scoring_seconds"], "musc_edge_scoring_seconds_bucket", le="0.05") == 1
    assert value(m["musc_edge_queue_length"], "musc_edge_queue_length") == 1
    assert value(m["musc_edge_window_fill_ratio"], "musc_edge_window_fill_ratio") == 0.5
    assert value(m["musc_edge_reference_images"], "musc_edge_reference_images") == 4
    assert value(m["musc_edge_last_raw_score"], "musc_edge_last_raw_score") == lines()[-1]["raw_score"]
    info = next(s for s in m["musc_edge_build_info"].samples)  # the text format has no info type: a gauge
    assert info.name == "musc_edge_build_info" and info.value == 1
    assert info.labels["model"] == "vit_b16_224.onnx" and info.labels["device"] == "cpu" and info.labels["version"]
    add_results(root, range(12, 40))
    m = scrape()
    assert value(m["musc_edge_images_scored"], "musc_edge_images_scored_total") == len(lines()) == 40
    assert value(m["musc_edge_images_anomalous"], "musc_edge_images_anomalous_total") == \
        sum(r["verdict"] == "anomalous" for r in lines()) == 8


# ----------------------------------------------------------------------------------------- security
TRAVERSALS = ["/image/../../../../etc/passwd", "/image/..%2f..%2fetc%2fpasswd", "/heatmap/%2e%2e/%2e%2e/etc/passwd",
              "/image/3/../../../etc/passwd", "/image/-1", "/image/3.0", "/image/0x3", "/image/%33",
              "/image/" + "9" * 40, "/image//etc/passwd", "/image/etc/passwd", "/static/../http.py",
              "/static/..%2fhttp.py", "/static/live.html/../../live.py", "//etc/passwd", "/image/3%00.png",
              "/heatmap/3;/etc/passwd", "/static/%2e%2e/%2e%2e/pyproject.toml"]


@pytest.mark.parametrize("target", TRAVERSALS)
def test_path_traversal_on_image_and_static_routes_is_4xx(served, target) -> None:
    server, _, _ = served
    code = raw_request(server, target)
    assert 400 <= code < 500, (target, code)
    assert get(server.url + "healthz")[0] == 200  # and the server is still there


MALFORMED = ["/api/results?after=abc", "/api/results?after=1e9", "/api/results?limit=0", "/api/results?limit=1001",
             "/api/results?limit=-5", "/api/results?after=1&after=2", "/api/results?after=" + "9" * 30,
             "/api/results?unknown=1", "/api/results?after", "/api/results?%zz=1", "/api/results?after=%ff%fe",
             "/api/status?x=1", "/image/3?thumb=2", "/image/3?thumb=yes",
             "/metrics?a=1&b=2&c=3&d=4&e=5&f=6&g=7&h=8&i=9",
             "/api/results?" + "a=1&" * 300, "/api/results?after=" + "1" * 2000]


@pytest.mark.parametrize("target", MALFORMED)
def test_malformed_or_oversized_queries_are_4xx(served, target) -> None:
    server, _, _ = served
    code = raw_request(server, target)
    assert 400 <= code < 500, (target[:60], code)
    assert get(server.url + "healthz")[0] == 200


def test_a_huge_request_line_and_other_methods_are_refused(served) -> None:
    server, _, _ = served
    assert raw_request(server, "/" + "a" * 70_000) == 414  # past http.server's own line limit
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        assert raw_request(server, "/api/results", method) == 405
    assert get(server.url + "nope")[0] == 404


def test_without_a_token_only_loopback_host_names_are_answered(served) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 in a browser on the line PC gets nothing."""
    server, _, _ = served
    port = server.address[1]
    for host in ("evil.example", f"evil.example:{port}", "192.168.1.9", "", f"127.0.0.1.evil.example:{port}"):
        assert raw_request(server, "/api/status", host_header=host) == 403, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}"):
        assert raw_request(server, "/api/status", host_header=host) == 200, host


def test_a_handler_error_is_one_500_and_the_server_goes_on(served, monkeypatch) -> None:
    server, _, _ = served
    monkeypatch.setattr(server, "status_json", lambda: 1 / 0)
    assert get(server.url + "api/status")[0] == 500
    monkeypatch.undo()
    assert get(server.url + "api/status")[0] == 200


def test_concurrent_clients_while_results_are_appended(served) -> None:
    server, _, root = served
    errors: list = []

    def client() -> None:
        for _ in range(25):
            for path in ("api/status", "api/results?after=-1&limit=1000", "metrics", "heatmap/2?thumb=1"):
                code = get(server.url + path)[0]
                if code != 200:
                    errors.append((path, code))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    add_results(root, range(12, 60))
    for t in threads:
        t.join()
    assert not errors
    assert json.loads(get(server.url + "api/status")[2])["counts"]["scored"] == 60


def test_a_non_loopback_bind_without_a_token_is_refused_before_binding(tmp_path, monkeypatch) -> None:
    def no_socket(*args, **kwargs):
        raise AssertionError("a socket was opened")

    monkeypatch.setattr(live_http, "_Server", no_socket)
    monkeypatch.setattr(live_http, "_Server6", no_socket)
    for host in ("0.0.0.0", "::", "192.168.10.7", "line-pc.local"):
        with pytest.raises(InputError, match=f"--http {host} is reachable from the network") as e:
            LiveServer(tmp_path / "results.jsonl", status(), host=host, port=8080)
        assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="at least 16"):
        LiveServer(tmp_path / "results.jsonl", status(), host="0.0.0.0", port=8080, token="short")


def test_the_token_is_checked_on_every_request(tmp_path) -> None:
    add_results(tmp_path, range(3))
    routes = ["", "static/live.js", "api/results", "api/status", "healthz", "readyz", "metrics", "image/1",
              "heatmap/1?thumb=1", "favicon.ico", "nope"]
    with LiveServer(tmp_path / "out" / "results.jsonl", status(), port=0, token=TOKEN) as server:
        for route in routes:
            code, headers, _ = get(server.url + route)
            assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer"), route
            assert get(server.url + route, {"Authorization": "Bearer wrong-token-0123456789"})[0] == 401, route
            assert get(server.url + route, {"Cookie": "musc_edge_token=" + TOKEN[:-1]})[0] == 401, route
        good = {"Authorization": "Bearer " + TOKEN}
        assert get(server.url + "api/status", good)[0] == 200
        assert get(server.url + "metrics", {"Cookie": "other=1; musc_edge_token=" + TOKEN})[0] == 200
        assert get(server.url + f"api/results?after=0&token={TOKEN}")[0] == 200
        # the page opened with ?token= sets a cookie and sends the browser to / without the token in the URL
        code, headers, _ = get(server.url + f"?token={TOKEN}")
        assert code == 303 and headers["Location"] == "/"
        assert headers["Set-Cookie"].startswith(f"musc_edge_token={TOKEN};") and "HttpOnly" in headers["Set-Cookie"]
        assert get(server.url, {"Cookie": headers["Set-Cookie"].split(";")[0]})[0] == 200
