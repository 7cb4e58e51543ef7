"""Benchmark MSM (MUSC_SPEC 3) against baselines that compute it the way the released code does.

Prints one JSON document. Work per pool: ``layers * len(r)`` MSM calls on (N, L, C) unit features.
r only changes LNAMD's input to MSM, not MSM's work, so each layer's random unit features are
reused for every r. Every distance is recomputed exactly whatever the features are; on the CPU
a pair of mutual nearest patches is recomputed once for both directions, so the time depends on
the features only through how many are mutual (about half for random features, more for similar
images: ``--near`` adds a run on near-duplicate features, a little faster).

FLOPs counted: one product per image pair, ``2 * L * L * C`` per pair, ``N (N - 1) / 2`` pairs, per
MSM call. The baselines multiply every pair twice by construction.

Configurations (``--config``; ``--L``, ``--C``, ``--layers``, ``--r-count``, ``--n`` override them):
  vitb16  CLIP ViT-B/16 at 224 px: L = 14 * 14 = 196, C = 768, 4 layers, r = 1, 3, 5; N = 100
  paper   CLIP ViT-L/14-336 at 518 px (the released default): L = 37 * 37 = 1369, C = 1024,
          4 layers, r = 1, 3, 5; N = 200 (~900 TFLOP per pool for us: a GPU run; on a CPU one MSM
          call takes many minutes, so ``--device cpu --config paper`` is only for a GPU box's CPU)

Baselines (``--baseline``, a comma list):
  spec     (CPU) MSM in numpy float32 as ``compute_scores_fast`` does it: per image the full
           ``torch.cdist``-style distance matrix to every patch of every other image
           (``|a|^2 + |b|^2 - 2 a.b``, clamp, sqrt), min per image, sort, mean of the lowest 30%
  authors  the authors' released MSM (MuSc, ``models/modules/_MSM.py``: ``MSM`` over
           ``compute_scores_fast``) transcribed in torch, float32, on the same device as ours;
           skipped with a note when torch (or, on ``cuda``, torch's CUDA) is missing (below
           N = 5 their k is 0 and their scores NaN: compare at N >= 5)
  none
Default: ``spec`` on the CPU, ``authors`` on a GPU.

CPU (``--device cpu``, default). For each N: our seconds, the baselines' seconds, the ratios, the
max abs difference of the outputs, our peak RSS, and the GFLOP/s we reach next to this machine's
measured float32 GEMM rate (same numpy/BLAS, all its threads; a short burst before every MSM call
and after the last, averaged, so that both see the same load on a shared machine) on the block
shape of the untiled kernel, 784 x 768 @ 768 x 5292 at N = 100, where BLAS runs at its peak (our
kernel runs smaller one-thread products, one per thread: see ``reference_blocks``). Because that
load still moves between bursts, the same ratios are also given per CPU-second (process user +
system time, all threads). Each N runs in a fresh subprocess so its peak RSS is its own.

GPU (``--device cuda``, CuPy, imported only then; torch only for the authors' baseline). Our
``msm`` runs on CuPy arrays (``musc_edge.core.device.resolve_device("cuda", precision)``: FP32
products pinned for ``exact``; FP16 tensor-core products that only choose the nearest patch for
``fast``); ``--precision exact,fast`` runs both on the same features, next to one run of the
authors' code. Timing: a warm-up call first, then device synchronisation around every call and
``time.perf_counter``. Reported per precision: ms per image (seconds per pool of N, all layers x
r, / N), the TFLOP/s reached, its share of this GPU's FP32 GEMM rate and (``fast``) of its FP16
tensor-core rate, both measured in the same run with CuPy products of our block shape, the peak of
CuPy's memory pool (used and reserved bytes, high-water over every allocation), the speedup over
the authors' code (whose peak is ``torch.cuda.max_memory_allocated``) and the max abs / relative
difference of the outputs (``exact`` must agree within 1e-4 relative). Every GPU step records its
own ``"error"`` in the JSON instead of stopping the run; without CuPy or a GPU the script prints
one JSON line saying so and exits with status 2.

    python benchmarks/bench_msm.py --n 100                                     # CPU floor, N = 100
    python benchmarks/bench_msm.py --n 50,100,200 --baseline-max-n 100 --near
    python benchmarks/bench_msm.py --n 20 --layers 1 --r-count 1 --baseline spec,authors  # smoke
    python benchmarks/bench_msm.py --device cuda --config vitb16 --n 100 --precision exact,fast --baseline authors
    python benchmarks/bench_msm.py --device cuda --config paper --n 200 --precision exact,fast --baseline authors
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

CONFIGS = {
    "vitb16": {"L": 196, "C": 768, "layers": 4, "r_count": 3, "n": "100",
               "what": "CLIP ViT-B/16 at 224 px: 14 x 14 patches, C = 768, r = 1, 3, 5"},
    "paper": {"L": 1369, "C": 1024, "layers": 4, "r_count": 3, "n": "200",
              "what": "CLIP ViT-L/14-336 at 518 px: 37 x 37 patches, C = 1024, r = 1, 3, 5"},
}
INTERVAL_MAX = 0.3
RTOL, ATOL = 1e-4, 1e-6
#: Untimed pause after each GEMM-rate burst: OpenBLAS's idle threads spin for ~0.1 s after a call
#: and would take a core from the timed call that follows (an effect of the burst, which the
#: measurement adds and real use does not have).
SETTLE_S = 0.2


# --------------------------------------------------------------------------------- baselines


def baseline_msm(z: np.ndarray, interval_max: float = INTERVAL_MAX) -> np.ndarray:
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


def authors_compute_scores_fast(torch, Z, i, topmin_min=0, topmin_max=INTERVAL_MAX):
    """The authors' ``compute_scores_fast`` (MuSc, models/modules/_MSM.py), step for step: image
    i against every patch of the other images with one ``torch.cdist``, the minimum per other
    image, the [topmin_min, topmin_max) interval by two ``topk`` calls, the mean."""
    image_num, patch_num, c = Z.shape
    Z_ref = torch.cat((Z[:i], Z[i + 1:]), dim=0)
    patch2image = torch.cdist(Z[i:i + 1], Z_ref.reshape(-1, c)).reshape(patch_num, image_num - 1, patch_num)
    patch2image = torch.min(patch2image, -1)[0]
    k_max, k_min = topmin_max, topmin_min
    if k_max < 1:
        k_max = int(patch2image.shape[1] * k_max)
    if k_min < 1:
        k_min = int(patch2image.shape[1] * k_min)
    if k_max < k_min:
        k_max, k_min = k_min, k_max
    vals, _ = torch.topk(patch2image.float(), k_max, largest=False, sorted=True)
    vals, _ = torch.topk(vals.float(), k_max - k_min, largest=True, sorted=True)
    patch2image = vals.clone()
    return torch.mean(patch2image, dim=1)


def authors_msm(torch, Z, topmin_min=0, topmin_max=INTERVAL_MAX, images=None):
    """The authors' ``MSM``: ``compute_scores_fast`` for every image, stacked as float64 (N, L)
    (their progress bar left out). ``images`` limits it to the first few (warm-up only)."""
    anomaly_scores_matrix = torch.tensor([]).double().to(Z.device)
    for i in range(Z.shape[0] if images is None else images):
        anomaly_scores_i = authors_compute_scores_fast(torch, Z, i, topmin_min, topmin_max).unsqueeze(0)
        anomaly_scores_matrix = torch.cat((anomaly_scores_matrix, anomaly_scores_i.double()), dim=0)
    return anomaly_scores_matrix


def import_torch():
    """torch, or None with the reason (the authors' baseline is optional)."""
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - not installed, or a broken install
        return None, f"torch is not installed ({type(e).__name__}: {e}); the authors' baseline needs it"
    try:
        torch.backends.cuda.matmul.allow_tf32 = False  # their numbers: plain FP32 products (torch's default)
    except Exception:  # noqa: BLE001 - a build without the flag
        pass
    return torch, None


# --------------------------------------------------------------------------------- helpers


def random_unit(rng: np.random.Generator, n: int, L: int, c: int, near: bool = False) -> np.ndarray:
    """Random unit patch vectors, built one image at a time so that making them adds no RSS peak.

    ``near`` makes every image a small perturbation of one image (distances ~0.07).
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


def pool_flops(n: int, L: int, c: int, calls: int) -> float:
    """FLOPs counted per pool: one product per image pair."""
    return calls * 2.0 * L * L * c * n * (n - 1) / 2.0


def reference_blocks(n: int, L: int) -> tuple[int, int]:
    """Row and column images of the GEMM whose rate we compare with: the block shape of the untiled
    numpy kernel (``msm.ROW_GROUP`` x ``msm.TARGET_BLOCK_BYTES``: 784 x 768 @ 768 x 5292 at N = 100,
    L = 196), a shape at which numpy's BLAS, all threads, runs at its peak. The tiled kernel runs
    smaller single-threaded products (one per thread), whose multi-threaded rate would be lower:
    comparing with those would flatter us."""
    from musc_edge.core import msm as msm_mod

    per_pair = msm_mod.pair_block_bytes(L)
    bi = max(1, min(msm_mod.ROW_GROUP, n, msm_mod.TARGET_BLOCK_BYTES // per_pair))
    bj = max(bi, min(n, msm_mod.TARGET_BLOCK_BYTES // (per_pair * bi)))
    return bi, bj


def no_recompute_block_minima():
    """For ``--no-recompute-variant`` only (the cost of the always-exact recompute): the numpy
    pair kernel's tiles, threads and arg-maxes, but each distance read off the product as
    ``sqrt(max(2 - 2 p, 0))`` instead of recomputed as ``||a - b||``. Never used for scores."""
    from musc_edge.core import pairs

    def block_minima(zi, zj, *, want_cols=True, diagonal=False, precision="exact", chunk_bytes=None):
        bi, L, c = zi.shape
        bj = zj.shape[0]
        zi_f, zj_f = zi.reshape(bi * L, c), zj.reshape(bj * L, c)
        d_rows = np.empty((bj, bi * L), dtype=np.float32)
        d_cols = np.empty((bi, bj * L), dtype=np.float32) if want_cols else None

        def dist(v):
            return np.sqrt(np.maximum(2.0 - 2.0 * v, 0.0)).astype(np.float32, copy=False)

        def tile(i0, i1, j0, j1):
            ni, nj = i1 - i0, j1 - j0
            p = pairs.product(np, zi_f[i0 * L:i1 * L], zj_f[j0 * L:j1 * L], precision)
            p3 = p.reshape(ni * L, nj, L)
            n_best = np.argmax(p3, axis=2)
            d_rows[j0:j1, i0 * L:i1 * L] = dist(np.take_along_axis(p3, n_best[:, :, None], axis=2)[:, :, 0]).T
            if d_cols is not None:
                for a in range(ni):
                    s = p[a * L:(a + 1) * L]
                    m_best = pairs._argmax_rows_np(s)
                    d_cols[i0 + a, j0 * L:j1 * L] = dist(np.take_along_axis(s, m_best[None, :], axis=0)[0])

        if pairs.run_tiles(tile, bi, bj, L, upper=diagonal and d_cols is not None and bi <= bj):
            pairs._fill_lower(d_rows, d_cols, bi, L)
        if diagonal:
            for a in range(min(bi, bj)):
                d_rows[a, a * L:(a + 1) * L] = np.inf
                if d_cols is not None:
                    d_cols[a, a * L:(a + 1) * L] = np.inf
        rows = d_rows.reshape(bj, bi, L).transpose(1, 2, 0)
        return rows, (None if d_cols is None else d_cols.reshape(bi, bj, L).transpose(1, 2, 0))

    return block_minima


# --------------------------------------------------------------------------------- CPU


def run_one(n: int, L: int, c: int, layers: int, r_count: int, do_baseline: bool, near: bool,
            baselines: tuple[str, ...] = ("spec",), no_recompute: bool = False) -> dict:
    """Time ``layers * r_count`` MSM calls at pool size n (ours, then each baseline)."""
    from musc_edge.core import msm as msm_mod

    rng = np.random.default_rng(0)
    feats = [random_unit(rng, n, L, c, near) for _ in range(layers)]
    calls = layers * r_count
    bi, bj = reference_blocks(n, L)
    rss_before = peak_rss_mb()
    do_spec = do_baseline and "spec" in baselines
    exact_kernel = msm_mod.block_minima
    plain_kernel = no_recompute_block_minima() if no_recompute else None

    # Peak RSS of our MSM alone: one untimed call before anything else allocates (or imports torch).
    msm_mod.msm(feats[0])
    ours_peak = peak_rss_mb()
    torch = None
    authors_note = None
    if do_baseline and "authors" in baselines:
        torch, authors_note = import_torch()
    elif "authors" in baselines:
        authors_note = "N above --baseline-max-n"

    # Side by side: for every (layer, r) a GEMM-rate burst, our call, then the baselines' calls, so
    # all of them see the same (shared, noisy) machine load.
    gemm_samples = []
    ours_s = base_s = ours_cpu = base_cpu = auth_s = auth_cpu = plain_s = plain_cpu = 0.0
    diff = auth_diff = 0.0
    close = auth_close = True
    for z in feats:
        zt = torch.from_numpy(z) if torch is not None else None
        for _ in range(r_count):
            gemm_samples.append(gemm_rate(bi * L, bj * L, c))
            time.sleep(SETTLE_S)
            c0, t0 = cpu_seconds(), time.perf_counter()
            ours = msm_mod.msm(z)
            ours_s += time.perf_counter() - t0
            ours_cpu += cpu_seconds() - c0
            if plain_kernel is not None:
                msm_mod.block_minima = plain_kernel
                try:
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    msm_mod.msm(z)
                    plain_s += time.perf_counter() - t0
                    plain_cpu += cpu_seconds() - c0
                finally:
                    msm_mod.block_minima = exact_kernel
            if do_spec:
                c0, t0 = cpu_seconds(), time.perf_counter()
                ref = baseline_msm(z)
                base_s += time.perf_counter() - t0
                base_cpu += cpu_seconds() - c0
                diff = max(diff, float(np.abs(ref - ours).max()))
                close = close and bool(np.allclose(ours, ref, rtol=RTOL, atol=ATOL))
            if torch is not None:
                c0, t0 = cpu_seconds(), time.perf_counter()
                with torch.no_grad():
                    ref = authors_msm(torch, zt).numpy()
                auth_s += time.perf_counter() - t0
                auth_cpu += cpu_seconds() - c0
                auth_diff = max(auth_diff, float(np.abs(ref - ours).max()))
                auth_close = auth_close and bool(np.allclose(ours, ref, rtol=RTOL, atol=ATOL))
    gemm_samples.append(gemm_rate(bi * L, bj * L, c))

    flops = pool_flops(n, L, c, calls)
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
    if do_spec:
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
    elif "spec" in baselines:
        res["baseline_s"] = None
        res["baseline_skipped"] = "N above --baseline-max-n (the baseline is ~2x our time; kept runs short)"
    if torch is not None:
        res.update(
            {
                "authors_s": round(auth_s, 3),
                "speedup_vs_authors": round(auth_s / ours_s, 2),
                "authors_cpu_s": round(auth_cpu, 3),
                "speedup_vs_authors_cpu_s": round(auth_cpu / ours_cpu, 2),
                "authors_max_abs_diff": auth_diff,
                "authors_allclose_rtol1e-4_atol1e-6": auth_close,
                "authors_torch_threads": torch.get_num_threads(),
            }
        )
    elif authors_note:
        res["authors_skipped"] = authors_note
    if plain_kernel is not None:
        res.update(
            {
                "no_recompute_s": round(plain_s, 3),
                "no_recompute_cpu_s": round(plain_cpu, 3),
                "exact_recompute_s": round(ours_s - plain_s, 3),
                "exact_recompute_share_of_ours": round((ours_s - plain_s) / ours_s, 3),
                "no_recompute_fraction_of_gemm": round(flops / plain_s / 1e9 / gemm, 3),
            }
        )
    return res


# --------------------------------------------------------------------------------- GPU


def _err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:600]


def cuda_preflight() -> str | None:
    """None when CuPy sees a GPU, else one line saying what is missing."""
    try:
        from musc_edge.core.device import resolve_device

        resolve_device("cuda", "exact")
    except Exception as e:  # noqa: BLE001 - DeviceError (no CuPy, no GPU) or anything else
        return f"--device cuda: {e}"
    return None


class PoolPeak:
    """High-water of CuPy's default memory pool (bytes used by arrays, bytes reserved) over every
    allocation, through an allocator that wraps the pool's own."""

    def __init__(self, cupy) -> None:
        self.cupy = cupy
        self.pool = cupy.get_default_memory_pool()
        self.used = self.total = 0
        cupy.cuda.set_allocator(self._malloc)

    def _malloc(self, size):
        mem = self.pool.malloc(size)
        self.used = max(self.used, self.pool.used_bytes())
        self.total = max(self.total, self.pool.total_bytes())
        return mem

    def reset(self) -> None:
        self.used, self.total = self.pool.used_bytes(), self.pool.total_bytes()

    def close(self) -> None:
        self.cupy.cuda.set_allocator(self.pool.malloc)


def cuda_gemm_rates(cupy, rows: int, cols: int, c: int, seconds: float = 1.0) -> dict:
    """This GPU's measured FP32 GEMM rate and FP16 tensor-core rate (FP16 x FP16 -> FP32, the
    product ``fast`` uses) on (rows, C) @ (C, cols), our block shape, in TFLOP/s."""
    from musc_edge.core.cuda_gemm import matmul_nt_fp16

    out: dict = {"shape": [rows, c, cols]}
    cupy.random.seed(1)
    a = cupy.random.standard_normal((rows, c), dtype=cupy.float32)
    b = cupy.random.standard_normal((cols, c), dtype=cupy.float32)
    a16, b16 = a.astype(cupy.float16), b.astype(cupy.float16)
    rates = (("fp32_tflops", lambda: cupy.matmul(a, b.T)),
             ("fp16_tensor_core_tflops", lambda: matmul_nt_fp16(cupy, a16, b16)))
    for key, fn in rates:
        try:
            for _ in range(3):
                fn()
            cupy.cuda.Device().synchronize()
            count, t0 = 0, time.perf_counter()
            while True:
                for _ in range(5):
                    fn()
                count += 5
                cupy.cuda.Device().synchronize()
                if time.perf_counter() - t0 >= seconds:
                    break
            out[key] = round(count * 2.0 * rows * cols * c / (time.perf_counter() - t0) / 1e12, 2)
        except Exception as e:  # noqa: BLE001
            out[key] = None
            out[f"{key}_error"] = _err(e)
    del a, b, a16, b16
    cupy.get_default_memory_pool().free_all_blocks()
    return out


def run_one_cuda(n: int, L: int, c: int, layers: int, r_count: int, precisions: tuple[str, ...],
                 baselines: tuple[str, ...], mem_budget: int) -> dict:
    """``layers * r_count`` MSM calls at pool size n on the GPU, per precision, and the authors'
    code once on the same features. Each step's failure is recorded, not raised."""
    res: dict = {"n": n, "features": "random", "msm_calls": layers * r_count, "mem_budget_bytes": mem_budget}
    calls = layers * r_count
    flops = pool_flops(n, L, c, calls)
    res["flops_counted_tflop"] = round(flops / 1e12, 2)
    try:
        import cupy

        from musc_edge.core import msm as msm_mod
        from musc_edge.core.device import resolve_device

        dev = resolve_device("cuda", "exact")  # pins FP32 products (no TF32) for the rates and exact
        res["gpu"] = dev.info
        free, total = cupy.cuda.runtime.memGetInfo()
        res["gpu_memory_free_total_gib"] = [round(free / 2**30, 1), round(total / 2**30, 1)]
        owner, bi, bj = msm_mod.plan(n, L, msm_mod.device_budget(cupy, mem_budget), gpu=True)
        res["plan_owner_row_col_images"] = [owner, bi, bj]
    except Exception as e:  # noqa: BLE001
        res["error"] = f"setup: {_err(e)}"
        return res

    try:
        res["gemm_rates"] = cuda_gemm_rates(cupy, bi * L, bj * L, c)
    except Exception as e:  # noqa: BLE001
        res["gemm_rates"] = {"error": _err(e)}
    fp32 = res["gemm_rates"].get("fp32_tflops")
    fp16 = res["gemm_rates"].get("fp16_tensor_core_tflops")

    peak = None
    try:
        peak = PoolPeak(cupy)
        cupy.random.seed(0)
        feats = []
        for _ in range(layers):
            z = cupy.random.standard_normal((n, L, c), dtype=cupy.float32)
            z /= cupy.linalg.norm(z, axis=-1, keepdims=True)
            feats.append(z)
        cupy.cuda.Device().synchronize()
        res["features_gib"] = round(layers * n * L * c * 4 / 2**30, 2)
    except Exception as e:  # noqa: BLE001
        res["error"] = f"features: {_err(e)}"
        if peak is not None:
            peak.close()
        return res

    ours_out: dict = {}
    for prec in precisions:
        entry: dict = {}
        res[f"ours_{prec}"] = entry
        try:
            resolve_device("cuda", prec)
            msm_mod.msm(feats[0], precision=prec, mem_budget_bytes=mem_budget)  # warm-up: kernels, cuBLAS, pool
            cupy.cuda.Device().synchronize()
            peak.reset()
            base_used = peak.pool.used_bytes()
            per_call, outs = [], []
            for z in feats:
                for r in range(r_count):
                    cupy.cuda.Device().synchronize()
                    t0 = time.perf_counter()
                    out = msm_mod.msm(z, precision=prec, mem_budget_bytes=mem_budget)
                    cupy.cuda.Device().synchronize()
                    per_call.append(time.perf_counter() - t0)
                    if r == 0:
                        outs.append(cupy.asnumpy(out))
                    del out
            total_s = float(sum(per_call))
            tflops = flops / total_s / 1e12
            entry.update({
                "s": round(total_s, 4),
                "ms_per_image": round(1e3 * total_s / n, 3),
                "s_per_call_min_max": [round(min(per_call), 4), round(max(per_call), 4)],
                "tflops": round(tflops, 3),
                "share_of_fp32_gemm": round(tflops / fp32, 3) if fp32 else None,
                "pool_peak_used_gib": round(peak.used / 2**30, 3),
                "pool_peak_used_over_features_gib": round((peak.used - base_used) / 2**30, 3),
                "pool_peak_reserved_gib": round(peak.total / 2**30, 3),
            })
            if prec == "fast":
                entry["share_of_fp16_tensor_core_gemm"] = round(tflops / fp16, 3) if fp16 else None
            ours_out[prec] = outs
        except Exception as e:  # noqa: BLE001
            entry["error"] = _err(e)
        try:
            cupy.get_default_memory_pool().free_all_blocks()
        except Exception:  # noqa: BLE001
            pass

    if "authors" in baselines:
        res["authors"] = auth = {}
        torch, note = import_torch()
        if torch is None:
            auth["skipped"] = note
        elif not torch.cuda.is_available():
            auth["skipped"] = f"torch {torch.__version__} has no usable CUDA (torch.version.cuda={torch.version.cuda})"
        else:
            try:
                auth["torch"] = torch.__version__
                auth["tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
                zs = []
                for z in feats:
                    try:
                        zs.append(torch.from_dlpack(z))  # zero-copy, same device
                    except Exception:  # noqa: BLE001 - an older pair: through the host
                        zs.append(torch.as_tensor(cupy.asnumpy(z), device=f"cuda:{cupy.cuda.Device().id}"))
                with torch.no_grad():
                    authors_msm(torch, zs[0], images=2)  # warm-up: cdist, topk, the allocator
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base_alloc = torch.cuda.memory_allocated()
                    per_call, outs = [], []
                    for zt in zs:
                        for r in range(r_count):
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                            out = authors_msm(torch, zt)
                            torch.cuda.synchronize()
                            per_call.append(time.perf_counter() - t0)
                            if r == 0:
                                outs.append(out.cpu().numpy())
                            del out
                total_s = float(sum(per_call))
                auth.update({
                    "s": round(total_s, 4),
                    "ms_per_image": round(1e3 * total_s / n, 3),
                    "s_per_call_min_max": [round(min(per_call), 4), round(max(per_call), 4)],
                    "tflops_executed": round(2 * flops / total_s / 1e12, 3),  # every pair twice
                    "torch_peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    "torch_peak_over_features_gib": round((torch.cuda.max_memory_allocated() - base_alloc) / 2**30, 3),
                })
                for prec, ours_layers in ours_out.items():
                    a, b = np.stack(ours_layers), np.stack(outs)
                    rel = np.abs(a - b) / np.maximum(np.abs(b), 1e-30)
                    res[f"ours_{prec}"].update({
                        "speedup_vs_authors": round(total_s / res[f"ours_{prec}"]["s"], 2),
                        "max_abs_diff_vs_authors": float(np.abs(a - b).max()),
                        "max_rel_diff_vs_authors": float(rel.max()),
                        "allclose_rtol1e-4_atol1e-6": bool(np.allclose(a, b, rtol=RTOL, atol=ATOL)),
                    })
                del zs
                torch.cuda.empty_cache()
            except Exception as e:  # noqa: BLE001
                auth["error"] = _err(e)
    if "spec" in baselines:
        res["spec_skipped"] = "the spec baseline is numpy (CPU); on the GPU the authors' code is the baseline"
    peak.close()
    return res


# --------------------------------------------------------------------------------- main


def parse_list(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    items = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in items if x not in allowed]
    if bad or not items:
        raise SystemExit(f"bench_msm: {what} must be a comma list of {', '.join(allowed)}, got {text!r}")
    return items


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="numpy on the CPU, or CuPy on a GPU")
    ap.add_argument("--precision", default="exact",
                    help="exact | fast | exact,fast (fast: FP16 tensor-core products choose the patch; GPU only)")
    ap.add_argument("--config", default="vitb16", choices=sorted(CONFIGS), help="shape preset (see above)")
    ap.add_argument("--baseline", default=None,
                    help="comma list of spec, authors, none (default: spec on the CPU, authors on a GPU)")
    ap.add_argument("--n", default=None, help="pool sizes, comma separated (default: the config's)")
    ap.add_argument("--L", type=int, default=None, help="patches per image (G*G; default: the config's)")
    ap.add_argument("--C", type=int, default=None, help="channels (default: the config's)")
    ap.add_argument("--layers", type=int, default=None, help="tapped layers (default: the config's, 4)")
    ap.add_argument("--r-count", type=int, default=None, help="number of r values (default: the config's, 3: 1, 3, 5)")
    ap.add_argument("--baseline-max-n", type=int, default=200, help="skip the CPU baselines above this N")
    ap.add_argument("--mem-budget-mb", type=int, default=1024, help="msm's mem_budget_bytes in MiB (its default: 1024)")
    ap.add_argument("--near", action="store_true", help="CPU: also run near-duplicate features at the first N")
    ap.add_argument("--single", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--single-near", action="store_true", help=argparse.SUPPRESS)
    # the cost of the always-exact recompute, measured next to ours (CPU); not a library option
    ap.add_argument("--no-recompute-variant", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()

    cfg = CONFIGS[args.config]
    L = args.L or cfg["L"]
    C = args.C or cfg["C"]
    layers = args.layers or cfg["layers"]
    r_count = args.r_count or cfg["r_count"]
    precisions = parse_list(args.precision, ("exact", "fast"), "--precision")
    baselines = parse_list(args.baseline or ("spec" if args.device == "cpu" else "authors"),
                           ("spec", "authors", "none"), "--baseline")
    baselines = tuple(b for b in baselines if b != "none")
    mem_budget = int(args.mem_budget_mb) << 20

    if args.device == "cpu" and "fast" in precisions:
        print(json.dumps({"benchmark": "msm", "device": "cpu", "error":
                          "--precision fast needs --device cuda (FP16 tensor-core products); the CPU scores exactly"}))
        sys.exit(2)

    if args.single is not None:
        if args.device == "cuda":
            res = run_one_cuda(args.single, L, C, layers, r_count, precisions, baselines, mem_budget)
        else:
            res = run_one(args.single, L, C, layers, r_count, args.single <= args.baseline_max_n,
                          args.single_near, baselines, args.no_recompute_variant)
        print(json.dumps(res))
        return

    if args.device == "cuda":
        problem = cuda_preflight()
        if problem:
            print(json.dumps({"benchmark": "msm", "device": "cuda", "error": problem}))
            sys.exit(2)

    runs = []
    ns = [int(x) for x in (args.n or cfg["n"]).split(",") if x.strip()]
    todo = [(n, False) for n in ns]
    if args.near and args.device == "cpu":
        todo.append((todo[0][0], True))
    for n, near in todo:
        cmd = [
            sys.executable, os.path.abspath(__file__), "--single", str(n), "--device", args.device,
            "--config", args.config, "--L", str(L), "--C", str(C), "--layers", str(layers),
            "--r-count", str(r_count), "--baseline-max-n", str(args.baseline_max_n),
            "--precision", ",".join(precisions), "--baseline", ",".join(baselines) or "none",
            "--mem-budget-mb", str(args.mem_budget_mb),
        ] + (["--single-near"] if near else []) + (["--no-recompute-variant"] if args.no_recompute_variant else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [x for x in proc.stdout.strip().splitlines() if x.startswith("{")]
        try:
            runs.append(json.loads(lines[-1]))
        except (IndexError, ValueError):
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            runs.append({"n": n, "error": f"the run exited with status {proc.returncode}: " + " | ".join(tail)[-800:]})
        print(json.dumps(runs[-1]), file=sys.stderr)

    report = {
        "benchmark": "msm",
        "device": args.device,
        "config": args.config,
        "config_what": cfg["what"],
        "precision": list(precisions),
        "baselines": list(baselines),
        "shape": {"L": L, "C": C, "layers": layers, "r_count": r_count},
        "flops_counted": "2*L*L*C per image pair, N(N-1)/2 pairs, per (layer, r)",
        "machine": machine_info(args.device),
        "runs": runs,
    }
    print(json.dumps(report, indent=2))


def machine_info(device: str) -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "numpy": np.__version__,
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OPENBLAS_L2_SIZE": os.environ.get("OPENBLAS_L2_SIZE"),
    }
    try:
        from threadpoolctl import threadpool_info

        info["threadpool_info"] = threadpool_info()
    except Exception as e:  # noqa: BLE001 - a GPU box may lack it
        info["threadpool_info"] = f"unavailable ({type(e).__name__})"
    if device == "cuda":
        try:
            import cupy

            info["cupy"] = cupy.__version__
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        except Exception as e:  # noqa: BLE001
            info["cupy"] = f"error: {_err(e)}"
        try:
            import torch

            info["torch"] = torch.__version__
        except Exception:  # noqa: BLE001
            info["torch"] = None
    return info


if __name__ == "__main__":
    main()
