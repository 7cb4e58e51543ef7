#!/usr/bin/env python
"""Streaming scorer cost: one new image against a window of W, versus rescoring the window.

For W in --windows (default 16, 32, 64, 128) at ViT-B/16 sizes (G*G = 196 patches, C = 768,
4 tapped layers, r in {1, 3, 5}: 12 pair products per image pair), measures after feature
extraction (the tokens are given):

- ``incremental_s``: one steady-state step of :class:`musc_edge.core.window.RollingScorer` with a full
  window: ``prepare`` (LNAMD of the new image and its W - 1 pair products) plus ``push`` (evict the
  oldest, add, MSM selection for the whole pool, RsCIN). Best of --steps steps (timeit's rule on
  a shared machine; the median and the process CPU time are printed too). The windows are stepped
  round-robin, one step each in turn, so that their ratios see the same load.
- ``full_rescore_s``: :func:`musc_edge.core.scorer.score_tokens` over the same W images from scratch
  (what the released code must do for every new image).

Prints one JSON object with both, their ratio, the window's preallocated bytes, the process's
peak RSS, and the streaming floors (latency(128)/latency(64) <= 2.3; at W = 128 incremental at
least 20x cheaper than full rescoring), checked side by side in this one run.

Setup cost: the windows are filled from one set of prepared entries (each image's pair rows
against all earlier images, computed once by a window of the largest W); a window of size W
takes the last W of them (``RollingScorer.restore``, as after a restart), ignoring rows against
images it does not hold. Only the timed steps
and the full rescoring are measured.

    python benchmarks/bench_stream.py                # about 5-8 minutes on 2 busy cores
    python benchmarks/bench_stream.py --windows 16,32 --layers 2   # a quick look
    python benchmarks/bench_stream.py --device cuda --windows 64,128,256                 # ViT-B/16 on a GPU
    python benchmarks/bench_stream.py --device cuda --windows 64,128,256 --grid 37 --dim 1024 --full-max-w 0

On the GPU (``--device cuda``: CuPy, the pool's features and distance table in device memory) the
windows are filled with random pair rows instead of computed ones (``setup``: the timed steps do
not depend on the rows' values, and computing W^2 / 2 real pairs of the paper's grid would take
longer than every timed step together); the new image's rows are computed for real.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import resource
import statistics
import time

import numpy as np
from threadpoolctl import threadpool_limits

from musc_edge.core.device import resolve_device
from musc_edge.core.errors import MuscEdgeError
from musc_edge.core.scorer import score_tokens
from musc_edge.core.window import Entry, RollingScorer


def synthetic_images(n: int, n_tokens: int, dim: int, layers: int, embed_dim: int, seed: int = 0):
    """Tokens with a shared structure plus per-image noise (distances not all alike), float32."""
    rng = np.random.default_rng(seed)
    base = [rng.standard_normal((n_tokens, dim)).astype(np.float32) for _ in range(layers)]
    for _ in range(n):
        tokens = [b + 0.8 * rng.standard_normal((n_tokens, dim)).astype(np.float32) for b in base]
        emb = rng.standard_normal(embed_dim).astype(np.float32)
        yield tokens, emb / np.linalg.norm(emb)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", default="16,32,64,128")
    ap.add_argument("--grid", type=int, default=14)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steady-state steps per W")
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads (1: per-core cost, steadier on a busy box)")
    ap.add_argument("--full-max-w", type=int, default=128, help="largest W rescored from scratch")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the pool lives and scores")
    ap.add_argument("--precision", default="exact", choices=["exact", "fast"])
    args = ap.parse_args()
    with threadpool_limits(args.threads):
        try:
            run(args)
        except MuscEdgeError as e:  # no CuPy, no GPU: one line, as the CLI says it
            raise SystemExit(f"error: {e}") from None


def run(args: argparse.Namespace) -> None:
    windows = sorted(int(w) for w in args.windows.split(","))
    g, dim, layers, embed_dim = args.grid, args.dim, args.layers, 512
    n_tokens = 1 + g * g
    w_max = windows[-1]
    images = list(synthetic_images(w_max + args.steps, n_tokens, dim, layers, embed_dim))
    device = resolve_device(args.device, args.precision)
    kwargs = dict(delay=0, min_pool=2, device=device)

    t0 = time.perf_counter()
    if device.is_gpu:  # random rows (see the docstring); features computed for real
        rng = np.random.default_rng(1)
        q = layers * 3
        entries = [Entry(seq, tuple(images[seq][0]), images[seq][1], np.arange(seq, dtype=np.int64),
                         rng.random((seq, q, g * g), dtype=np.float32) + 0.5,
                         rng.random((seq, q, g * g), dtype=np.float32) + 0.5) for seq in range(w_max)]
    else:  # entries 0..w_max-1, each with pair rows against every earlier image (untimed)
        filler = RollingScorer(g, [dim] * layers, embed_dim, capacity=w_max, **kwargs)
        entries = []
        for seq in range(w_max):
            e = filler.prepare(seq, *images[seq])
            filler.push(e)
            entries.append(dataclasses.replace(e, tokens=()))  # the pool keeps z; tokens not needed
        del filler
    setup_s = time.perf_counter() - t0

    # One scorer per W, stepped round-robin so that every W sees the same load on a shared box.
    scorers = {}
    for w in windows:
        scorers[w] = RollingScorer(g, [dim] * layers, embed_dim, capacity=w, **kwargs)
        window = entries[w_max - w:]
        scorers[w].restore({"references": [], "stream": [e.seq for e in window], "pending": []},
                           {e.seq: e for e in window})
    del entries, window
    times: dict[int, list[float]] = {w: [] for w in windows}
    cpu: dict[int, list[float]] = {w: [] for w in windows}
    for k in range(args.steps):
        seq = w_max + k
        for w in windows:
            t, c = time.perf_counter(), time.process_time()
            reported = scorers[w].push(scorers[w].prepare(seq, *images[seq]))
            times[w].append(time.perf_counter() - t)
            cpu[w].append(time.process_time() - c)
            assert [r.seq for r in reported] == [seq] and len(scorers[w].pool) == w
    results = {}
    for w in windows:
        results[str(w)] = {"incremental_s": round(min(times[w]), 4),
                           "incremental_median_s": round(statistics.median(times[w]), 4),
                           "incremental_cpu_s": round(min(cpu[w]), 4),
                           "window_mib": round(scorers[w].pool.nbytes / 2**20, 1)}
    del scorers

    for w in windows:
        if w > args.full_max_w:
            continue
        row = results[str(w)]
        pool = images[w_max + args.steps - w:w_max + args.steps]  # the last window's W images
        tokens = [np.stack([img[0][layer] for img in pool]) for layer in range(layers)]
        emb = np.stack([img[1] for img in pool])
        t, c = time.perf_counter(), time.process_time()
        score_tokens(tokens, emb, device=device)
        row["full_rescore_s"] = round(time.perf_counter() - t, 3)
        row["full_rescore_cpu_s"] = round(time.process_time() - c, 3)
        row["full_over_incremental"] = round(row["full_rescore_s"] / row["incremental_s"], 1)
        row["full_over_incremental_cpu"] = round(row["full_rescore_cpu_s"] / row["incremental_cpu_s"], 1)
        del tokens, emb

    out = {"setting": {"patches": g * g, "channels": dim, "layers": layers, "r_list": [1, 3, 5],
                       "pair_products_per_image_pair": layers * 3, "steps": args.steps, "threads": args.threads,
                       "machine": platform.processor() or platform.machine(), "device": device.name,
                       "precision": device.precision, **device.info},
           "windows": results, "setup_s": round(setup_s, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}
    if "64" in results and "128" in results:
        ratio = results["128"]["incremental_s"] / results["64"]["incremental_s"]
        out["latency_128_over_64"] = round(ratio, 3)
        out["latency_128_over_64_cpu"] = round(results["128"]["incremental_cpu_s"] / results["64"]["incremental_cpu_s"], 3)
        out["floor_128_over_64_le_2.3"] = ratio <= 2.3
    if len(windows) >= 2:  # linear in W: latency per window image, first vs last W
        per = [results[str(w)]["incremental_s"] / w for w in (windows[0], windows[-1])]
        out["latency_per_window_image_ms"] = {str(w): round(1000 * results[str(w)]["incremental_s"] / w, 4)
                                              for w in windows}
        out["per_image_cost_ratio_last_over_first"] = round(per[1] / per[0], 3)
    if "full_rescore_s" in results.get("128", {}):
        out["floor_incremental_20x_cheaper_at_128"] = results["128"]["full_over_incremental"] >= 20
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
