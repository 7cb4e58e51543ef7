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

Without ``--model`` a small synthetic ONNX model (``musc_edge.runtime.testing``, 64 px, 8x8 grid)
is built, so the run measures the daemon and the window, not a backbone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
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
    log = open(args.work / "daemon.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    ps = psutil.Process(proc.pid)

    stop, counter = threading.Event(), [0]
    writer = threading.Thread(target=write_images, args=(folder, args.images, args.rate, stop, counter), daemon=True)
    t0 = time.monotonic()
    writer.start()
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
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=60)
    elapsed = time.monotonic() - t0

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
    report["passed"] = bool(report["images_written"] == args.images and report["lines"] == expected
                            and report["duplicates"] == 0 and report["missing"] == 0 and report["seq_contiguous"]
                            and rc == 0 and report["rss_growth_after_warmup_pct"] < 10.0)
    print(json.dumps(report, indent=1))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
