"""Benchmark MSM (MUSC_SPEC 3) against a baseline written the way the released code does it.

Prints one JSON document. For each N: our seconds, the baseline's seconds, their ratio, the max
abs difference of the outputs, our peak RSS, and the GFLOP/s we reach next to this machine's
measured float32 GEMM rate on a matrix product of the same shape as our blocks (same numpy/BLAS,
same threads; a short burst before every MSM call and after the last, averaged, so that both see
the same load on a shared machine). Because that load still moves between bursts, the same ratios
are also given per CPU-second (process user + system time, all threads), which other processes
on the machine do not inflate.

Work per pool: ``len(layers) * len(r_list)`` MSM calls on (N, L, C) unit features. r only changes
LNAMD's input to MSM, not MSM's work, so each layer's random unit features are reused for every r
(the timing does not depend on content: random features need no exact recompute of small
distances, see ``musc_edge.core.msm.EXACT_BELOW_D2``; ``--near`` adds a run with near-duplicate
features where that recompute is taken).

FLOPs counted: one product per image pair, ``2 * L * L * C`` per pair, ``N (N - 1) / 2`` pairs, per
MSM call. The baseline multiplies every pair twice by construction.

    python benchmarks/bench_msm.py                    # N = 50, 100, 200
    python benchmarks/bench_msm.py --n 50,100 --baseline-max-n 100
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_msm.py

Each N runs in a fresh subprocess so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np


def baseline_msm(z: np.ndarray, interval_max: float = 0.3) -> np.ndarray:
    """MSM as the released code computes it (``compute_scores_fast``), in numpy float32.

    For each image: the full distance matrix to every patch of every other image (the
    ``torch.cdist`` matrix-product path: ``|a|^2 + |b|^2 - 2 a.b``, clamp, sqrt), the minimum per
    other image, an ascending sort and the mean of the lowest ``floor(0.3 (N - 1))`` values.
    """
    n, L, c = z.shape
    k = max(1, int(interval_max * (n - 1)))
    out = np.empty((n, L), dtype=np.float64)
    sq = np.einsum("nlc,nlc->nl", z, z)
    for i in range(n):
        ref = np.concatenate([z[:i], z[i + 1 :]]).reshape(-1, c)
        ref_sq = np.concatenate([sq[:i], sq[i + 1 :]]).reshape(-1)
        d2 = sq[i][:, None] + ref_sq[None, :] - 2.0 * (z[i] @ ref.T)
        d = np.sqrt(np.maximum(d2, 0.0, out=d2), out=d2)
        per_image = d.reshape(L, n - 1, L).min(axis=2)
        out[i] = np.sort(per_image, axis=1)[:, :k].mean(axis=1)
    return out


def random_unit(rng: np.random.Generator, n: int, L: int, c: int, near: bool = False) -> np.ndarray:
    """Random unit patch vectors, built one image at a time so that making them adds no RSS peak.

    ``near`` makes every image a small perturbation of one image (distances ~0.07: every
    distance then takes MSM's exact-recompute path).
    """
    z = np.empty((n, L, c), dtype=np.float32)
    base = rng.standard_normal((L, c), dtype=np.float32) if near else None
    for i in range(n):
        x = rng.standard_normal((L, c), dtype=np.float32)
        if near:
            x *= np.float32(0.05)
            x += base
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        z[i] = x
    return z


def cpu_seconds() -> float:
    """CPU time of this process, all threads (user + system)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def gemm_rate(rows: int, cols: int, c: int, seconds: float = 0.6) -> tuple[float, float]:
    """Measured float32 GEMM rate for (rows, C) @ (C, cols): (GFLOP/s wall, GFLOP per CPU-second).

    Same shape as our product blocks, same numpy/BLAS and threads. The per-CPU-second rate does
    not depend on how many cores other processes take from us at that moment.
    """
    rng = np.random.default_rng(1)
    a = rng.standard_normal((rows, c), dtype=np.float32)
    b = rng.standard_normal((cols, c), dtype=np.float32)
    a @ b.T
    count = 0
    c0 = cpu_seconds()
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b.T
        count += 1
    gflop = count * 2.0 * rows * cols * c / 1e9
    return gflop / (time.perf_counter() - t0), gflop / (cpu_seconds() - c0)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_one(n: int, L: int, c: int, layers: int, r_count: int, do_baseline: bool, near: bool) -> dict:
    """Time ``layers * r_count`` MSM calls at pool size n (ours, then the baseline)."""
    from musc_edge.core import msm as msm_mod

    rng = np.random.default_rng(0)
    feats = [random_unit(rng, n, L, c, near) for _ in range(layers)]
    calls = layers * r_count
    bi, bj = msm_mod.group_sizes(n, L, (1 << 30) // 4)
    rss_before = peak_rss_mb()

    # Peak RSS of our MSM alone: one untimed call before anything else allocates.
    msm_mod.msm(feats[0])
    ours_peak = peak_rss_mb()

    # Side by side: for every (layer, r) a GEMM-rate burst, our call, then the baseline's call, so
    # all three see the same (shared, noisy) machine load.
    gemm_samples = []
    ours_s = base_s = ours_cpu = base_cpu = 0.0
    diff = 0.0
    close = True
    for z in feats:
        for _ in range(r_count):
            gemm_samples.append(gemm_rate(bi * L, bj * L, c))
            c0, t0 = cpu_seconds(), time.perf_counter()
            ours = msm_mod.msm(z)
            ours_s += time.perf_counter() - t0
            ours_cpu += cpu_seconds() - c0
            if do_baseline:
                c0, t0 = cpu_seconds(), time.perf_counter()
                ref = baseline_msm(z)
                base_s += time.perf_counter() - t0
                base_cpu += cpu_seconds() - c0
                diff = max(diff, float(np.abs(ref - ours).max()))
                close = close and bool(np.allclose(ours, ref, rtol=1e-4, atol=1e-6))
    gemm_samples.append(gemm_rate(bi * L, bj * L, c))

    flops = calls * 2.0 * L * L * c * n * (n - 1) / 2.0
    gemm = float(np.mean([g[0] for g in gemm_samples]))
    gemm_cpu = float(np.mean([g[1] for g in gemm_samples]))
    res = {
        "n": n,
        "features": "near-duplicate" if near else "random",
        "msm_calls": calls,
        "ours_s": round(ours_s, 3),
        "ours_gflops": round(flops / ours_s / 1e9, 1),
        "gemm_gflops": round(gemm, 1),
        "gemm_gflops_min_max": [round(min(g[0] for g in gemm_samples), 1), round(max(g[0] for g in gemm_samples), 1)],
        "gemm_shape": [bi * L, c, bj * L],
        "fraction_of_gemm": round(flops / ours_s / 1e9 / gemm, 3),
        "ours_cpu_s": round(ours_cpu, 3),
        "gemm_gflop_per_cpu_s": round(gemm_cpu, 1),
        "fraction_of_gemm_per_cpu_s": round(flops / ours_cpu / 1e9 / gemm_cpu, 3),
        "peak_rss_mb": round(ours_peak, 1),
        "rss_before_msm_mb": round(rss_before, 1),
        "peak_rss_over_features_mb": round(ours_peak - rss_before, 1),
    }
    if do_baseline:
        res.update(
            {
                "baseline_s": round(base_s, 3),
                "speedup": round(base_s / ours_s, 2),
                "baseline_cpu_s": round(base_cpu, 3),
                "speedup_cpu_s": round(base_cpu / ours_cpu, 2),
                "max_abs_diff": diff,
                "outputs_allclose_rtol1e-4_atol1e-6": close,
            }
        )
    else:
        res["baseline_s"] = None
        res["baseline_skipped"] = "N above --baseline-max-n (the baseline is ~2x our time; kept runs short)"
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="50,100,200", help="pool sizes, comma separated")
    ap.add_argument("--L", type=int, default=196, help="patches per image (G*G)")
    ap.add_argument("--C", type=int, default=768, help="channels")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--r-count", type=int, default=3, help="number of r values (1, 3, 5)")
    ap.add_argument("--baseline-max-n", type=int, default=200, help="skip the baseline above this N")
    ap.add_argument("--near", action="store_true", help="also run near-duplicate features at the first N")
    ap.add_argument("--single", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--single-near", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.single is not None:
        res = run_one(
            args.single, args.L, args.C, args.layers, args.r_count,
            args.single <= args.baseline_max_n, args.single_near,
        )
        print(json.dumps(res))
        return

    from threadpoolctl import threadpool_info

    runs = []
    todo = [(int(x), False) for x in args.n.split(",") if x.strip()]
    if args.near:
        todo.append((todo[0][0], True))
    for n, near in todo:
        cmd = [
            sys.executable, __file__, "--single", str(n), "--L", str(args.L), "--C", str(args.C),
            "--layers", str(args.layers), "--r-count", str(args.r_count),
            "--baseline-max-n", str(args.baseline_max_n),
        ] + (["--single-near"] if near else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]), file=sys.stderr)

    report = {
        "benchmark": "msm",
        "shape": {"L": args.L, "C": args.C, "layers": args.layers, "r_count": args.r_count},
        "flops_counted": "2*L*L*C per image pair, N(N-1)/2 pairs, per (layer, r)",
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "numpy": np.__version__,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
            "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
            "threadpool_info": threadpool_info(),
        },
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
