"""Cost of positional matching (``--match-radius P``) against MuSc's global search, side by side.

    python benchmarks/bench_match_radius.py                       # N=100, 28x28 grid, C=112, P=0,1,2,3,5
    python benchmarks/bench_match_radius.py --n 60 --grid 14 --radii 0,1,3
    python benchmarks/bench_match_radius.py --device cuda         # the same on a GPU (CuPy)

One MSM call (one layer, one r) on random unit features, global and each radius interleaved
``--repeats`` times in one process (this machine is shared: compare the ratios, not the
seconds). The positional kernel's products are (2P+1)^2 / L of the global one's, run as batched
products over the grid positions; both recompute every chosen distance exactly. Prints one JSON
object: seconds per call (median) and the ratio global / radius for each P.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="images in the pool [100]")
    ap.add_argument("--grid", type=int, default=28, help="G of the G x G patch grid [28]")
    ap.add_argument("--C", type=int, default=112, help="channels [112]")
    ap.add_argument("--radii", default="0,1,2,3,5", help="comma-separated P [0,1,2,3,5]")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds [3]")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="numpy or CuPy [cpu]")
    a = ap.parse_args()

    from musc_edge.core.device import resolve_device
    from musc_edge.core.msm import msm

    dev = resolve_device(a.device, "exact")
    rng = np.random.default_rng(0)
    L = a.grid * a.grid
    z = rng.standard_normal((a.n, L, a.C)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    zd = dev.asarray(z)
    radii = [None] + [int(p) for p in a.radii.split(",") if p.strip()]
    times: dict[str, list[float]] = {("global" if p is None else str(p)): [] for p in radii}

    def sync() -> None:
        if dev.is_gpu:
            dev.xp.asarray(0)  # queue point
            import cupy

            cupy.cuda.get_current_stream().synchronize()

    msm(zd[:4, ...], radius=radii[-1])  # warm-up: thread pools, cuBLAS handles
    for _ in range(a.repeats):
        for p in radii:
            sync()
            t0 = time.perf_counter()
            msm(zd, radius=p)
            sync()
            times["global" if p is None else str(p)].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "match_radius", "device": a.device, "machine": platform.processor() or platform.machine(),
        "n": a.n, "grid": a.grid, "C": a.C, "repeats": a.repeats,
        "seconds_per_call": {k: round(v, 4) for k, v in med.items()},
        "global_over_radius": {k: round(med["global"] / v, 2) for k, v in med.items() if k != "global"},
        "product_work_fraction": {str(p): round(min(1.0, (2 * p + 1) ** 2 / L), 4) for p in radii if p is not None},
    }, indent=2))


if __name__ == "__main__":
    main()
