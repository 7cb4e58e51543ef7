#!/usr/bin/env python
"""Soak test of ``musc-edge watch``: thousands of images at a steady rate, RSS sampled throughout.

A writer thread drops images into a folder at ``--rate`` per second (write to ``.tmp``, then
rename, as a camera PC should); ``musc-edge watch`` runs as a child process on that folder.
When every image has been written and reported, the daemon gets SIGTERM. Prints one JSON object:
each image reported exactly once?, the daemon's RSS after warm-up, at the end and at its peak,
latency from arrival to report, and whether the checks passed (exit code 1 if not): every image
once, seq without gaps, exit code 0, RSS growth after warm-up (median of the last tenth of the
samples against the first tenth) under 10 %.

    python scripts/soak_watch.py --images 3000 --window 64 --rate 12 --work /tmp/soak

``--http`` also serves the live page (``watch --http 127.0.0.1:PORT``) and polls ``/api/status``
and ``/`` twice a second while scoring: page latency p50/p95/max (check: p95 under 200 ms, no
failed request). ``--mqtt`` starts a Mosquitto on a free loopback port (``mosquitto`` on PATH or
/usr/sbin), runs ``watch --mqtt`` against it and counts what a QoS 1 subscriber with a persistent
session receives (check: every reported seq delivered).

    python scripts/soak_watch.py --images 3000 --rate 6 --window 64 --http --mqtt

Without ``--model`` a small synthetic ONNX model (``musc_edge.runtime.testing``, 64 px, 8x8 grid)
is built, so the run measures the daemon and the window, not a backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import shutil as _shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import psutil

from musc_edge.watch.journal import read_jsonl


def write_images(folder: Path, n: int, rate: float, stop: threading.Event, counter: list[int]) -> None:
    """n textured parts at a steady rate; every 50th has a bright defect."""
    rng = np.random.default_rng(0)
    base = (rng.random((96, 128)) * 40 + 100).astype(np.uint8)
    start = time.monotonic()
    for i in range(n):
        if stop.is_set():
            return
        img = np.clip(base.astype(np.int16) + rng.integers(-12, 13, base.shape), 0, 255).astype(np.uint8)
        if i % 50 == 49:
            y, x = rng.integers(10, 70, 2)
            img[y:y + 12, x:x + 12] = 250
        ok, buf = cv2.imencode(".png", img)
        tmp = folder / f"part_{i:06d}.png.tmp"
        tmp.write_bytes(buf.tobytes())
        tmp.rename(folder / f"part_{i:06d}.png")
        counter[0] = i + 1
        delay = start + (i + 1) / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PagePoller:
    """Polls the live page's /api/status and / in turn, every ``interval_s``; records each request's time."""

    def __init__(self, base: str, stop: threading.Event, interval_s: float = 0.5) -> None:
        self.base, self.stop, self.interval_s = base, stop, interval_s
        self.latencies_s: list[float] = []
        self.errors: list[str] = []
        self.status: dict | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import urllib.request

        routes = ("/api/status", "/")
        i = 0
        while not self.stop.is_set():
            route = routes[i % len(routes)]
            i += 1
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(self.base + route, timeout=10) as r:
                    body = r.read()
                dt = time.perf_counter() - t0
                if route == "/api/status":
                    self.status = json.loads(body)
                self.latencies_s.append(dt)
            except OSError as e:  # not up yet, or gone: counted once it has answered
                if self.latencies_s:
                    self.errors.append(f"{route}: {e}")
            self.stop.wait(self.interval_s)


class MqttCounter:
    """Mosquitto on a free loopback port and a QoS 1 subscriber counting the seqs it receives."""

    TOPIC = "soak/musc-edge"

    def __init__(self, folder: Path) -> None:
        import paho.mqtt.client as mqtt

        binary = _shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto")
                                                else None)
        if binary is None:
            raise SystemExit("--mqtt needs the mosquitto broker: apt-get install -y mosquitto")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = folder / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"{user}listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                        f"log_dest file {folder}/mosquitto.log\n")
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise SystemExit(f"mosquitto did not start on port {self.port}")
                time.sleep(0.05)
        self.seqs: list[int] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="soak-consumer", clean_session=False)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(self.TOPIC, qos=1)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port, 30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit("the soak's MQTT subscriber got no SUBACK")

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ARG002
        with self._lock:
            self.seqs.append(json.loads(msg.payload)["seq"])

    def received(self) -> list[int]:
        with self._lock:
            return list(self.seqs)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.proc.terminate()
        self.proc.wait(10)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=12.0, help="images per second")
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--delay", type=int, default=0)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=Path("/tmp/musc_edge_soak"))
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of images counted as warm-up")
    ap.add_argument("--poll", action="store_true")
    ap.add_argument("--http", action="store_true", help="serve the live page and poll it while scoring")
    ap.add_argument("--mqtt", action="store_true", help="publish to a Mosquitto started on loopback and count")
    args = ap.parse_args()

    if args.work.exists():
        shutil.rmtree(args.work)
    folder, out_dir = args.work / "in", args.work / "out"
    folder.mkdir(parents=True)
    model = args.model
    if model is None:
        from musc_edge.runtime.testing import make_tiny_model, tiny_meta

        model = make_tiny_model(args.work / "soak_tiny.onnx", meta=tiny_meta(image_size=64, token_dims=(32, 48),
                                                                             embed_dim=16))
    cmd = [sys.executable, "-m", "musc_edge", "watch", str(folder), "--model", str(model), "--out", str(out_dir),
           "--window", str(args.window), "--delay", str(args.delay), "--device", "cpu", "--stable", "0.2"]
    if args.poll:
        cmd.append("--poll")
    poll_stop = threading.Event()
    poller = mqtt = None
    if args.http:
        port = free_port()
        cmd += ["--http", f"127.0.0.1:{port}"]
        poller = PagePoller(f"http://127.0.0.1:{port}", poll_stop)
    if args.mqtt:
        mqtt = MqttCounter(args.work / "broker")
        cmd += ["--mqtt", f"127.0.0.1:{mqtt.port}", "--mqtt-topic", MqttCounter.TOPIC, "--source", "soak"]
    log = open(args.work / "daemon.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)

    stop, counter = threading.Event(), [0]
    writer = threading.Thread(target=write_images, args=(folder, args.images, args.rate, stop, counter), daemon=True)
    t0 = time.monotonic()
    writer.start()
    if poller is not None:
        poller.thread.start()
    samples: list[tuple[float, int, int]] = []  # (seconds, images reported, rss bytes)
    expected = args.images - args.delay
    reported = 0
    deadline = t0 + args.images / args.rate + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            reported = sum(1 for _ in open(out_dir / "results.jsonl")) if (out_dir / "results.jsonl").exists() else 0
            samples.append((time.monotonic() - t0, reported, ps.memory_info().rss))
            if reported >= expected and not writer.is_alive():
                break
            time.sleep(1.0)
    finally:
        stop.set()
        poll_stop.set()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0
    received: list[int] = []
    if mqtt is not None:
        n_lines = sum(1 for _ in open(out_dir / "results.jsonl")) if (out_dir / "results.jsonl").exists() else 0
        end = time.monotonic() + 30  # what the daemon's drain handed to the broker is still on its way
        while time.monotonic() < end and len(set(mqtt.received())) < n_lines:
            time.sleep(0.2)
        received = mqtt.received()
        mqtt.close()

    lines = read_jsonl(out_dir / "results.jsonl")
    paths = [line["path"] for line in lines]
    written = {str(folder / f"part_{i:06d}.png") for i in range(counter[0])}
    # Growth = trend, not a transient: median RSS of the last tenth of the samples after warm-up
    # against the median of the first tenth; the peak is reported beside it.
    warm = [rss for _, n, rss in samples if n >= args.warmup * expected]
    tenth = max(1, len(warm) // 10)
    rss_warm = float(np.median(warm[:tenth])) if warm else float("nan")
    rss_end = float(np.median(warm[-tenth:])) if warm else float("nan")
    rss_peak_after = max(warm) if warm else float("nan")
    lat = [(datetime.fromisoformat(line["scoring_time"]) - datetime.fromisoformat(line["arrival_time"])).total_seconds()
           for line in lines]
    report = {
        "images_written": counter[0],
        "lines": len(lines),
        "unique_paths": len(set(paths)),
        "duplicates": len(paths) - len(set(paths)),
        "missing": len(written - set(paths)) - args.delay,
        "seq_contiguous": [line["seq"] for line in lines] == list(range(len(lines))),
        "window": args.window,
        "rate_per_s": args.rate,
        "elapsed_s": round(elapsed, 1),
        "daemon_exit_code": rc,
        "rss_mib_after_warmup": round(rss_warm / 2**20, 1),
        "rss_mib_at_end": round(rss_end / 2**20, 1),
        "rss_growth_after_warmup_pct": round(100 * (rss_end - rss_warm) / rss_warm, 2),
        "rss_mib_peak_after_warmup": round(rss_peak_after / 2**20, 1),
        "rss_peak_over_warmup_pct": round(100 * (rss_peak_after - rss_warm) / rss_warm, 2),
        "rss_mib_final": round(samples[-1][2] / 2**20, 1) if samples else None,
        "latency_s_p50": round(float(np.percentile(lat, 50)), 3) if lat else None,
        "latency_s_p95": round(float(np.percentile(lat, 95)), 3) if lat else None,
        "rss_trace_mib": [(round(t), n, round(r / 2**20, 1)) for t, n, r in samples[:: max(1, len(samples) // 20)]],
    }
    if poller is not None:
        poller.thread.join(timeout=15)
        page = sorted(poller.latencies_s)
        report["page_requests"] = len(page)
        report["page_errors"] = len(poller.errors)
        report["page_errors_first"] = poller.errors[:3]
        report["page_latency_ms_p50"] = round(1000 * float(np.percentile(page, 50)), 1) if page else None
        report["page_latency_ms_p95"] = round(1000 * float(np.percentile(page, 95)), 1) if page else None
        report["page_latency_ms_max"] = round(1000 * page[-1], 1) if page else None
        if poller.status is not None:
            report["page_last_status_counts"] = poller.status.get("counts")
    if mqtt is not None:
        seqs = {line["seq"] for line in lines}
        report["mqtt_messages"] = len(received)
        report["mqtt_unique_seqs"] = len(set(received))
        report["mqtt_missing"] = len(seqs - set(received))
        report["mqtt_repeats"] = len(received) - len(set(received))
    report["passed"] = bool(report["images_written"] == args.images and report["lines"] == expected
                            and report["duplicates"] == 0 and report["missing"] == 0 and report["seq_contiguous"]
                            and rc == 0 and report["rss_growth_after_warmup_pct"] < 10.0
                            and (poller is None or (report["page_errors"] == 0 and report["page_requests"] > 0
                                                    and report["page_latency_ms_p95"] < 200.0))
                            and (mqtt is None or report["mqtt_missing"] == 0))
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
