"""Scoring time per image of feature shapes, side by side: what a backbone/taps/size choice costs MuSc.

    python benchmarks/bench_score_cost.py                                   # today's default vs stride-16 taps
    python benchmarks/bench_score_cost.py --n 200 --shapes 28:40+112,16:112,16:112+320

A shape is ``G:C1+C2+...``: a G x G grid and one tapped layer per channel count (EfficientNet-Lite0
at 224 px with taps 3,5 is ``28:40+112``; stage 5 alone at 256 px ``16:112``). Random tokens of
``--n`` images (MSM's cost depends only on the shapes), scored by ``score_tokens`` with the default
MuscParams, every shape once per round, ``--repeats`` rounds interleaved in one process (this
machine is shared: the ratios are what to read). Prints one JSON object: the median seconds per
image of each shape and its ratio to the first shape.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_shape(text: str) -> tuple[int, tuple[int, ...]]:
    grid, dims = text.split(":")
    return int(grid), tuple(int(c) for c in dims.split("+"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images in the pool [100]")
    ap.add_argument("--shapes", default="28:40+112,16:112,16:120,16:112+320",
                    help="comma-separated G:C1+C2 [28:40+112,16:112,16:120,16:112+320]")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds [3]")
    ap.add_argument("--score-device", default="cpu", choices=("cpu", "cuda"), help="MuSc device [cpu]")
    a = ap.parse_args()

    from musc_edge.core.scorer import score_tokens

    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    rng = np.random.default_rng(0)
    pools = {}
    for s in shapes:
        g, dims = parse_shape(s)
        pools[s] = [rng.standard_normal((a.n, 1 + g * g, c)).astype(np.float32) for c in dims]
    emb = rng.standard_normal((a.n, 16)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    times: dict[str, list[float]] = {s: [] for s in shapes}
    for _ in range(a.repeats):
        for s in shapes:
            t = time.perf_counter()
            score_tokens(pools[s], emb, device=a.score_device)
            times[s].append((time.perf_counter() - t) / a.n)
    med = {s: statistics.median(v) for s, v in times.items()}
    first = shapes[0]
    print(json.dumps({
        "benchmark": "score_cost", "n": a.n, "repeats": a.repeats, "score_device": a.score_device,
        "machine": platform.processor() or platform.machine(),
        "seconds_per_image": {s: round(v, 4) for s, v in med.items()},
        f"ratio_to_{first}": {s: round(v / med[first], 3) for s, v in med.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
