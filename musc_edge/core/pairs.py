"""The image-pair kernel of MSM (MUSC_SPEC 3), written once against the Python array API standard.

For two groups of images of unit patch vectors, ``block_minima`` gives every patch's distance to
its nearest patch in every image of the other group, in both directions, from ONE matrix product
per block: ``||a - b||^2 = 2 - 2 a.b`` for unit vectors, so the product's row maxima are the
nearest patches of the row images (i scored by j) and its column maxima those of the column images
(j scored by i). The batch MSM (:mod:`musc_edge.core.msm`), the rolling pool
(:mod:`musc_edge.core.window`) and the tests all use it, so there is one set of numerics.

Numerics. ``sqrt(2 - 2 a.b)`` in float32 loses digits for small distances (the cancellation is
amplified by the square root). So the product only *chooses* the nearest patch (its arg-max);
that patch's distance is then recomputed for every (patch, other image) as ``||a - b||`` with the
difference taken first, which keeps its relative precision at any distance. No threshold decides
where to recompute, so every shape is static: no ``nonzero``, no variable-size gather, no Python
loop over images. That is what lets the same code run on numpy, CuPy or torch
(``array_api_compat.array_namespace``), and ``array-api-strict`` in the tests proves it uses
nothing else.

``interval_mean`` is the other half of MSM: the mean over the [lo, hi) slice of each patch's
distances to the other images, sorted ascending, as one vectorised selection over a whole table.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from typing import Any

from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

from .errors import InputError

#: Bytes of one chunk of the exact recompute's gathered rows: a few MB keeps them in a CPU's
#: cache; on a GPU a chunk must instead be large enough to fill the device with one launch.
RECOMPUTE_CHUNK_BYTES = 4 << 20
GPU_RECOMPUTE_CHUNK_BYTES = 512 << 20

PRECISIONS = ("exact", "fast")


def recompute_chunk_bytes(xp: Any) -> int:
    """The recompute's chunk for this array library (CPU cache or GPU launch sized)."""
    return RECOMPUTE_CHUNK_BYTES if is_numpy_namespace(xp) else GPU_RECOMPUTE_CHUNK_BYTES


def product(xp: Any, x: Any, y: Any, precision: str = "exact") -> Any:
    """``x @ y.T`` (float32) that chooses the nearest patches.

    ``exact``: FP32 products. ``fast``: FP16 operands with FP32 accumulation and result, on CuPy
    through cuBLAS (:mod:`musc_edge.core.cuda_gemm`); elsewhere emulated by rounding the operands
    to FP16 (same choices up to accumulation order, for tests; it is not faster there).
    """
    if precision == "exact":
        return x @ xp.matrix_transpose(y)
    if precision != "fast":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if is_cupy_namespace(xp):
        import cupy

        from .cuda_gemm import matmul_nt_fp16

        return matmul_nt_fp16(cupy, x, y)
    if not hasattr(xp, "float16"):
        raise ValueError("precision 'fast' needs an array library with float16 (CuPy, numpy)")
    x16 = xp.astype(xp.astype(x, xp.float16), xp.float32)
    y16 = xp.astype(xp.astype(y, xp.float16), xp.float32)
    return x16 @ xp.matrix_transpose(y16)


def nearest_distances(x: Any, y: Any, idx: Any, *, chunk_bytes: int = RECOMPUTE_CHUNK_BYTES) -> Any:
    """``out[k, r] = ||x[r] - y[idx[k, r]]||`` in x's float dtype, the difference taken first.

    x: (R, C), y: (S, C), idx: (K, R) integer indices into y's rows. The sum of squares has only
    positive terms, so float32 accumulation is accurate to about 1e-7 relative at any distance.
    The kernel's indices for one k point into one image of y, so walking k in the outer loop keeps
    the gathered rows' source (one image, well under a MB) in cache; chunks hold about
    ``chunk_bytes`` of gathered vectors (sizes known from the shapes alone).
    """
    xp = array_namespace(x, y, idx)
    k, r = idx.shape
    c = x.shape[1]
    out = xp.empty((k, r), dtype=x.dtype, device=getattr(x, "device", None))
    if k == 0 or r == 0:
        return out
    r_step = max(1, min(r, int(chunk_bytes) // (4 * c)))
    k_step = max(1, int(chunk_bytes) // (4 * c * r_step))
    for k0 in range(0, k, k_step):
        k1 = min(k, k0 + k_step)
        for r0 in range(0, r, r_step):
            r1 = min(r, r0 + r_step)
            g = xp.reshape(xp.take(y, xp.reshape(idx[k0:k1, r0:r1], (-1,)), axis=0), (k1 - k0, r1 - r0, c))
            g -= x[None, r0:r1, :]  # in place: a fresh temporary per chunk costs more than the subtraction
            out[k0:k1, r0:r1] = xp.sqrt(xp.vecdot(g, g, axis=-1))
    return out


def _self_mask(xp: Any, n_images: int, n_other: int, L: int, device: Any) -> Any:
    """(n_other, n_images * L) bool: entry [k, r] pairs patch row r, of image r // L, with image k:
    the self pairs of a block on the diagonal of the pool."""
    owner = xp.arange(n_images * L, device=device) // L
    return xp.arange(n_other, device=device)[:, None] == owner[None, :]


def block_minima(zi: Any, zj: Any, *, want_cols: bool = True, diagonal: bool = False,
                 precision: str = "exact", chunk_bytes: int | None = None,
                 radius: int | None = None) -> tuple[Any, Any | None]:
    """Nearest-patch distances for every (image of zi, image of zj) pair, from one product.

    zi: (bI, L, C), zj: (bJ, L, C) unit vectors, float32, any array API namespace.
    Returns ``rows`` (bI, L, bJ): ``rows[a, m, b]`` = distance of patch m of image a to its
    nearest patch of image b; and, if ``want_cols``, ``cols`` (bJ, L, bI): ``cols[b, n, a]`` =
    distance of patch n of image b to its nearest patch of image a (else None).
    ``diagonal``: both groups start at the same image of the pool (a block on its diagonal), so
    image a of zi is image a of zj; those self pairs are +inf, since an image is not one of its
    "other images".
    ``precision``: how the product that chooses the nearest patch is computed (:func:`product`);
    the chosen distance is recomputed in FP32 either way.
    ``radius``: None for the global nearest patch (MUSC_SPEC 3); P >= 0 restricts patch (y, x)'s
    search to the cells (y + dy, x + dx), |dy|, |dx| <= P, of the other image's G x G grid
    (:func:`local_minima`; a radius that covers the grid is the global search).
    numpy arrays take a CPU path with the same numbers (:func:`_block_minima_numpy`: tiles on
    BLAS's thread count); every other namespace runs the code below.
    """
    xp = array_namespace(zi, zj)
    chunk_bytes = recompute_chunk_bytes(xp) if chunk_bytes is None else int(chunk_bytes)
    radius = check_radius(radius)
    band = None
    if radius is not None and not covers_grid(int(radius), zi.shape[1]):
        if prefers_offsets(int(radius), zi.shape[1]):
            rows = local_minima(zi, zj, int(radius), diagonal=diagonal, precision=precision, chunk_bytes=chunk_bytes)
            cols = (local_minima(zj, zi, int(radius), diagonal=diagonal, precision=precision,
                                 chunk_bytes=chunk_bytes) if want_cols else None)
            return rows, cols
        band = band_bias(xp, int(radius), zi.shape[1], getattr(zi, "device", None))
    if is_numpy_namespace(xp):
        return _block_minima_numpy(zi, zj, want_cols, diagonal, precision, chunk_bytes, band)
    bi, L, c = zi.shape
    bj = zj.shape[0]
    dev = getattr(zi, "device", None)
    zi_f = xp.reshape(zi, (bi * L, c))
    zj_f = xp.reshape(zj, (bj * L, c))
    p = product(xp, zi_f, zj_f, precision)  # (bI*L, bJ*L): p[a*L+m, b*L+n] = z_a,m . z_b,n
    if band is not None:  # positional matching on the global product: cells beyond the radius never win
        p4 = xp.reshape(p, (bi, L, bj, L))
        p4 += band[None, :, None, :]  # in place: no second product-sized array
        p = xp.reshape(p4, (bi * L, bj * L))
    d_rows = _rows(xp, p, zi_f, zj_f, bi, bj, L, dev, chunk_bytes)
    d_cols = _cols(xp, p, zi_f, zj_f, bi, bj, L, dev, chunk_bytes) if want_cols else None
    inf = xp.asarray(math.inf, dtype=zi.dtype, device=dev)
    if diagonal:  # d_rows[b, a*L+m], d_cols[a, b*L+n]: the self pairs are a == b
        d_rows = xp.where(_self_mask(xp, bi, bj, L, dev), inf, d_rows)
    rows = xp.permute_dims(xp.reshape(d_rows, (bj, bi, L)), (1, 2, 0))  # (bI, L, bJ)
    if d_cols is None:
        return rows, None
    if diagonal:
        d_cols = xp.where(_self_mask(xp, bj, bi, L, dev), inf, d_cols)
    return rows, xp.permute_dims(xp.reshape(d_cols, (bi, bj, L)), (1, 2, 0))  # (bJ, L, bI)


def check_radius(radius: Any) -> int | None:
    """None (global) or an integer radius >= 0; anything else is an InputError (a negative or
    fractional radius would otherwise match every patch to cell 0, or be truncated)."""
    if radius is None:
        return None
    if isinstance(radius, bool) or not hasattr(radius, "__index__") or radius.__index__() < 0:
        raise InputError(f"match_radius must be an integer >= 0 or None (global), got {radius!r}")
    return radius.__index__()


def grid_side(L: int) -> int:
    """G of a square G x G patch grid of ``L`` patches (LNAMD keeps the backbone's square grid)."""
    g = math.isqrt(int(L))
    if g * g != int(L):
        raise InputError(f"positional matching needs a square patch grid, got L = {L} patches")
    return g


def covers_grid(radius: int, L: int) -> bool:
    """Whether a ``radius`` neighbourhood reaches every cell of the G x G grid from every cell:
    then positional matching is the global search, and the global kernel runs."""
    return int(radius) >= grid_side(L) - 1


#: Positional matching runs offset by offset (:func:`local_minima`) while its (2P+1)^2 offsets
#: are at most this share of the L cells; beyond it the global product with the cells outside the
#: radius masked (:func:`band_bias`) is faster, since one large GEMM runs near the BLAS peak and
#: an offset's batched small products do not. Measured with benchmarks/bench_match_radius.py
#: (N = 100): 16 x 16 grid, C = 320: P = 1 (9 offsets) 1.33x faster than global, P = 2 (25)
#: 0.79x; 28 x 28, C = 112 (N = 40): P = 3 (49) 2.05x, P = 5 (121) 1.28x.
OFFSET_SHARE = 1 / 16


def prefers_offsets(radius: int, L: int) -> bool:
    """Whether positional matching of ``radius`` on L cells runs offset by offset (else masked)."""
    return (2 * int(radius) + 1) ** 2 <= OFFSET_SHARE * int(L)


def band_bias(xp: Any, radius: int, L: int, device: Any = None) -> Any:
    """(L, L) float32: 0 where cell n of the other image is within ``radius`` of cell m (both
    grid axes), -inf elsewhere; added to a product it leaves only those cells to the arg-max
    (every cell is within the radius of itself, so each row keeps one)."""
    g = grid_side(L)
    y = xp.reshape(xp.arange(L, device=device), (L, 1)) // g
    x = xp.reshape(xp.arange(L, device=device), (L, 1)) % g
    near = (xp.abs(y - xp.reshape(y, (1, L))) <= radius) & (xp.abs(x - xp.reshape(x, (1, L))) <= radius)
    zero = xp.zeros((L, L), dtype=xp.float32, device=device)
    return xp.where(near, zero, xp.asarray(-math.inf, dtype=xp.float32, device=device))


def local_offsets(radius: int) -> list[tuple[int, int]]:
    """The (dy, dx) of a (2P+1) x (2P+1) neighbourhood, row-major: for any cell this visits the
    other image's cells in increasing flat index, so a strict ``>`` keeps the first of equal
    products, as ``argmax`` does in the global search."""
    return [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)]


def local_minima(zi: Any, zj: Any, radius: int, *, diagonal: bool = False, precision: str = "exact",
                 chunk_bytes: int | None = None) -> Any:
    """rows (bI, L, bJ) of positional matching: ``rows[a, m, b]`` = distance of patch m = (y, x)
    of image a to its nearest patch among the cells (y + dy, x + dx), |dy|, |dx| <= radius, of
    image b (cells off the grid are not there: a corner has fewer neighbours).

    How: for each offset, one batched product over the grid positions, (positions, bI, C) x
    (positions, C, bJ), whose running maximum over offsets chooses each nearest patch; the chosen
    distance is then recomputed exactly (difference first), as in the global search. The work is
    (2P+1)^2 / L of the global product's. ``diagonal``: image a of zi is image a of zj (+inf).
    """
    xp = array_namespace(zi, zj)
    chunk_bytes = recompute_chunk_bytes(xp) if chunk_bytes is None else int(chunk_bytes)
    bi, L, c = zi.shape
    bj = zj.shape[0]
    g = grid_side(L)
    dev = getattr(zi, "device", None)
    numpy = is_numpy_namespace(xp)
    # position-major copies, (g, g, b, c): an offset's operands are then views, and each grid
    # position's (bI, C) x (C, bJ) product is one batched GEMM item
    pa = xp.permute_dims(xp.reshape(zi, (bi, g, g, c)), (1, 2, 0, 3))
    pb = xp.permute_dims(xp.reshape(zj, (bj, g, g, c)), (1, 2, 0, 3))
    if numpy:
        import numpy as np

        pa, pb = np.ascontiguousarray(pa), np.ascontiguousarray(pb)
    best = xp.full((g, g, bi, bj), -math.inf, dtype=xp.float32, device=dev)
    arg = xp.zeros((g, g, bi, bj), dtype=xp.int32, device=dev)  # flat patch index n into image b
    cell = xp.reshape(xp.arange(L, dtype=xp.int32, device=dev), (g, g))
    for dy, dx in local_offsets(int(radius)):
        y0, y1, x0, x1 = max(0, -dy), min(g, g - dy), max(0, -dx), min(g, g - dx)
        if y1 <= y0 or x1 <= x0:
            continue
        s = _batched_product(xp, pa[y0:y1, x0:x1, ...], pb[y0 + dy:y1 + dy, x0 + dx:x1 + dx, ...], precision)
        cur = best[y0:y1, x0:x1, ...]
        n = cell[y0 + dy:y1 + dy, x0 + dx:x1 + dx][:, :, None, None]
        if numpy:  # in place: one comparison and two masked copies, no temporaries
            better = np.greater(s, cur, out=_scratch("better", s.shape, np.bool_))
            np.copyto(cur, s, where=better)
            np.copyto(arg[y0:y1, x0:x1, ...], np.broadcast_to(n, s.shape), where=better)
            continue
        better = s > cur
        best[y0:y1, x0:x1, ...] = xp.where(better, s, cur)
        arg[y0:y1, x0:x1, ...] = xp.where(better, n, arg[y0:y1, x0:x1, ...])
    del best
    # (g, g, bI, bJ) -> (bJ, bI, L): j_idx[b, a*L + m] indexes zj's flat rows, as _rows builds it
    j_idx = xp.reshape(xp.permute_dims(xp.reshape(arg, (L, bi, bj)), (2, 1, 0)), (bj, bi * L))
    j_idx = xp.astype(j_idx, xp.int64) + (xp.arange(bj, dtype=xp.int64, device=dev) * L)[:, None]
    d = nearest_distances(xp.reshape(zi, (bi * L, c)), xp.reshape(zj, (bj * L, c)), j_idx, chunk_bytes=chunk_bytes)
    if diagonal:
        d = xp.where(_self_mask(xp, bi, bj, L, dev), xp.asarray(math.inf, dtype=d.dtype, device=dev), d)
    return xp.permute_dims(xp.reshape(d, (bj, bi, L)), (1, 2, 0))  # (bI, L, bJ)


def _batched_product(xp: Any, a: Any, b: Any, precision: str) -> Any:
    """(..., bI, C) x (..., bJ, C) -> (..., bI, bJ) products, as :func:`product` computes each.

    :func:`product`'s cuBLAS FP16 path takes 2-D operands only, so on CuPy a batched ``fast``
    product rounds the operands to FP16 and multiplies in FP32 (the same choices), as
    :func:`product` does on every other library.
    """
    if precision == "fast" and is_cupy_namespace(xp):
        a = xp.astype(xp.astype(a, xp.float16), xp.float32)
        b = xp.astype(xp.astype(b, xp.float16), xp.float32)
        precision = "exact"
    return product(xp, a, b, precision)


def _rows(xp: Any, p: Any, zi_f: Any, zj_f: Any, bi: int, bj: int, L: int, dev: Any, chunk_bytes: int) -> Any:
    """(bJ, bI*L): for patch row r of zi and image b, the arg-max patch n of b (a contiguous
    reduction of the product), then its exact distance."""
    n_best = xp.argmax(xp.reshape(p, (bi * L, bj, L)), axis=2)  # (bI*L, bJ)
    j_idx = xp.matrix_transpose(n_best) + (xp.arange(bj, device=dev) * L)[:, None]  # (bJ, bI*L)
    return nearest_distances(zi_f, zj_f, j_idx, chunk_bytes=chunk_bytes)


def _cols(xp: Any, p: Any, zi_f: Any, zj_f: Any, bi: int, bj: int, L: int, dev: Any, chunk_bytes: int) -> Any:
    """(bI, bJ*L): for patch row c of zj and image a, the arg-max patch m of a (a reduction
    across the product's rows), then its exact distance."""
    m_best = xp.argmax(xp.reshape(p, (bi, L, bj * L)), axis=1)  # (bI, bJ*L)
    i_idx = m_best + (xp.arange(bi, device=dev) * L)[:, None]
    return nearest_distances(zj_f, zi_f, i_idx, chunk_bytes=chunk_bytes)


def interval_bounds(n_others: int, interval: tuple[float, float]) -> tuple[int, int]:
    """Slice [lo, hi) of the ascending distances to the ``n_others`` other images (MUSC_SPEC 3).

    ``hi = max(lo + 1, floor(interval[1] * n_others))``: the released code has k = 0 (a division
    by zero) for pools under 5 images; we keep at least one image (our one deliberate difference).
    The float products are the released code's (``int(0.3 * (N - 1))``). Callers validate
    ``interval`` (:class:`musc_edge.core.params.MuscParams`) and ``n_others >= 1``.
    """
    a, b = float(interval[0]), float(interval[1])
    lo = min(int(math.floor(a * n_others)), n_others - 1)
    hi = min(max(lo + 1, int(math.floor(b * n_others))), n_others)
    return lo, hi


def interval_mean(table: Any, lo: int, hi: int) -> Any:
    """Mean over the [lo, hi) slice of the ascending sort along the last axis, float64.

    ``table[..., j]`` holds the distances to the images j; entries that are not another image
    (self, empty slots) must be +inf: since ``hi`` is at most the number of other images, the
    slice never reaches them, so no row needs masking or deleting. numpy selects with one
    ``partition``; other namespaces sort (the array API has no partition).
    """
    xp = array_namespace(table)
    if is_numpy_namespace(xp):
        import numpy as np

        kth = sorted({lo, hi - 1}) if lo > 0 else [hi - 1]
        part = np.partition(table, kth, axis=-1)[..., lo:hi]
        return part.mean(axis=-1, dtype=np.float64)
    part = xp.sort(table, axis=-1)[..., lo:hi]
    return xp.mean(xp.astype(part, xp.float64), axis=-1)


# ---------------------------------------------------------------------------------------------
# numpy fast path of block_minima: the same numbers (the same FP32 products, the same arg-maxes,
# the same exact recompute of every chosen distance, difference first), organised for a CPU.
#
# Lanes. With one block product and numpy after it, the arg-maxes and recomputes ran on one core
# while BLAS's idle threads kept spinning (OpenBLAS spins ~0.1 s after a call): a second numpy
# thread then did not help (measured). So a block is cut into tiles of image pairs, and each of T
# threads (T = BLAS's own thread count) takes the next tile and does all of it: its product, with
# BLAS held to one thread per caller (threadpoolctl), then both arg-maxes while the product is in
# cache, then the recomputes. Nothing spins or waits, and one thread's numpy work overlaps the
# other's product. A block on the pool's diagonal multiplies only its upper triangle (the rest is
# the same pairs the other way round), and where the two sides of a pair chose the same two
# patches (mutual nearest patches: about half of them even for random features) the distance is
# computed once. Without threadpoolctl the block is one tile, multiplied with BLAS threaded as
# usual.

_LOCAL = threading.local()
_LANE_LOCK = threading.Lock()
_LANES: dict = {"pid": None, "controller": None, "pool": None, "pool_size": 0, "depth": 0, "limiter": None,
                "threads": 1}

#: Product bytes per tile: a tile's arg-maxes and recomputes find its product and vectors still in
#: cache, while the product stays large enough for single-thread sgemm's full rate. Measured on
#: the 2-core AVX2 box at N = 100, L = 196 (CPU seconds per MSM call, side by side): 4 x 4-image
#: tiles (2.5 MB) 3.1-3.2 s; 2 x 8 images 3.3-3.4 s; whole 16 MB blocks 3.5 s.
TILE_BYTES = 5 << 19
#: Images of zi per tile (4 x 196 product rows).
TILE_ROW_IMAGES = 4


def _after_fork_in_child() -> None:
    """A forked child has none of the parent's helper threads, and its lock may have been held."""
    global _LANE_LOCK
    _LANE_LOCK = threading.Lock()
    _LANES.update(pid=None, controller=None, pool=None, pool_size=0, depth=0, limiter=None, threads=1)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _blas_controller() -> Any:
    """threadpoolctl's view of the loaded BLAS libraries, or None (not installed, none found)."""
    if _LANES["pid"] != os.getpid():  # first use, or inherited over a fork: threads are gone
        _LANES.update(pid=os.getpid(), controller=None, pool=None, pool_size=0, depth=0, limiter=None, threads=1)
        try:
            from threadpoolctl import ThreadpoolController

            ctl = ThreadpoolController().select(user_api="blas")
            _LANES["controller"] = ctl if ctl.lib_controllers else None
        except Exception:  # noqa: BLE001 - not installed, or a library it cannot query
            _LANES["controller"] = None
    return _LANES["controller"]


def lane_count() -> tuple[int, bool]:
    """(threads, controlled) for the numpy block kernel: BLAS's current thread count (so a user's
    limit, e.g. ``OMP_NUM_THREADS`` or threadpoolctl, holds) and whether threadpoolctl can hold
    BLAS to one thread per tile; (1, False) without threadpoolctl."""
    with _LANE_LOCK:
        ctl = _blas_controller()
        if ctl is None:
            return 1, False
        if _LANES["depth"] and _LANES["limiter"] is not None:  # another call holds BLAS at one thread
            return max(1, int(_LANES["threads"])), True
        try:
            return max(1, max(int(lib.num_threads) for lib in ctl.lib_controllers)), True
        except Exception:  # noqa: BLE001 - a library that cannot say: one thread, as if uncontrolled
            return 1, False


class _SerialBlas:
    """While any call is inside, BLAS runs one thread per call (restored when the last leaves)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def __enter__(self) -> "_SerialBlas":
        with _LANE_LOCK:
            if _LANES["depth"] == 0:
                _LANES["threads"] = self.threads
                _LANES["limiter"] = _LANES["controller"].limit(limits=1)
            _LANES["depth"] += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        with _LANE_LOCK:
            _LANES["depth"] -= 1
            if _LANES["depth"] == 0 and _LANES["limiter"] is not None:
                _LANES["limiter"].restore_original_limits()
                _LANES["limiter"] = None


def _executor(workers: int) -> Any:
    """This process's pool of helper threads (at least ``workers``)."""
    from concurrent.futures import ThreadPoolExecutor

    with _LANE_LOCK:
        if _LANES["pool"] is None or _LANES["pool_size"] < workers:  # grow to the largest asked for
            _LANES["pool"] = ThreadPoolExecutor(workers, thread_name_prefix="musc-pairs")
            _LANES["pool_size"] = workers
        return _LANES["pool"]


def _run_tasks(tasks: list, threads: int) -> None:
    """Run ``tasks`` (callables) on the calling thread and ``threads - 1`` helpers, each taking the
    next task as it frees up."""
    threads = min(threads, len(tasks))
    if threads <= 1:
        for t in tasks:
            t()
        return
    order = itertools.count()  # next() is atomic under the GIL

    def drain() -> None:
        for i in order:
            if i >= len(tasks):
                return
            tasks[i]()

    futures = [_executor(threads - 1).submit(drain) for _ in range(threads - 1)]
    try:
        drain()
    finally:
        for f in futures:
            if not f.cancel():  # started: wait for its task (a queued one has nothing left to do)
                f.result()


def _scratch(name: str, shape: tuple, dtype: Any) -> Any:
    """This thread's reused buffer ``name`` viewed as ``shape`` (grown when too small)."""
    import numpy as np

    size = math.prod(shape)
    buf = getattr(_LOCAL, name, None)
    if buf is None or buf.dtype != dtype or buf.size < size:
        buf = np.empty(size, dtype=dtype)
        setattr(_LOCAL, name, buf)
    return buf[:size].reshape(shape)


def _distances_np(x: Any, y: Any, idx: Any, out: Any, chunk_rows: int) -> None:
    """``out[k, r] = ||x[r] - y[idx[k, r]]||`` as :func:`nearest_distances` computes it
    (difference first, float32), into ``out`` (K, R), which may be a strided view; the gathered
    rows go into this thread's reused buffer."""
    import numpy as np

    k, r = idx.shape
    c = x.shape[1]
    r_step = max(1, min(r, chunk_rows))
    k_step = max(1, chunk_rows // r_step)
    for k0 in range(0, k, k_step):
        k1 = min(k, k0 + k_step)
        for r0 in range(0, r, r_step):
            r1 = min(r, r0 + r_step)
            g = _scratch("gather", ((k1 - k0) * (r1 - r0), c), np.float32)
            np.take(y, idx[k0:k1, r0:r1].reshape(-1), axis=0, out=g, mode="clip")  # in range; no copy
            g3 = g.reshape(k1 - k0, r1 - r0, c)
            g3 -= x[None, r0:r1, :]
            d = np.vecdot(g3, g3, axis=-1)
            np.sqrt(d, out=out[k0:k1, r0:r1])


def _pair_distances_np(x: Any, x_idx: Any, y: Any, y_idx: Any, chunk_rows: int) -> Any:
    """``out[t] = ||x[x_idx[t]] - y[y_idx[t]]||`` as :func:`nearest_distances` computes it (the
    difference ``y - x`` first, float32), both sides gathered into this thread's buffers."""
    import numpy as np

    t = int(x_idx.shape[0])
    c = x.shape[1]
    out = np.empty(t, dtype=np.float32)
    for s0 in range(0, t, max(1, chunk_rows)):
        s1 = min(t, s0 + max(1, chunk_rows))
        g = _scratch("gather", (s1 - s0, c), np.float32)
        h = _scratch("gather_x", (s1 - s0, c), np.float32)
        np.take(y, y_idx[s0:s1], axis=0, out=g, mode="clip")
        np.take(x, x_idx[s0:s1], axis=0, out=h, mode="clip")
        g -= h
        d = np.vecdot(g, g, axis=-1)
        np.sqrt(d, out=out[s0:s1])
    return out


def _argmax_rows_np(s: Any) -> Any:
    """``argmax(s, axis=-2)`` of a (..., L, K) float32 array, first index on ties, as numpy's.

    numpy's arg-max over a non-last axis copies the array transposed first; the maximum over that
    axis is a fast strided reduction, so instead: the maximum, where it is reached, and the
    smallest such row (as the largest ``L - m``), in cheap passes.
    """
    import numpy as np

    L, k = s.shape[-2:]
    if L >= 1 << 15:
        return np.argmax(s, axis=-2)
    mx = np.max(s, axis=-2, keepdims=True)
    at = np.equal(s, mx, out=_scratch("at", s.shape, np.bool_))
    rev = np.arange(L, 0, -1, dtype=np.int16)[:, None]  # L - m
    key = np.multiply(at, rev, out=_scratch("key", s.shape, np.int16), dtype=np.int16)
    return L - np.max(key, axis=-2).astype(np.intp)


def _cuts(lo: int, hi: int, parts: int) -> list[tuple[int, int]]:
    """[lo, hi) cut into ``parts`` nearly equal ranges."""
    edges = [lo + round((hi - lo) * t / parts) for t in range(parts + 1)]
    return [(a, b) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _tile_list(bi: int, bj: int, L: int, threads: int, upper: bool) -> list[tuple[int, int, int, int]]:
    """Tiles (i0, i1, j0, j1) of about ``TILE_BYTES`` of product each (at most
    ``TILE_ROW_IMAGES`` images of zi), at least ``threads`` of them, largest first (so that the
    threads, taking the next tile as they free up, end together). ``upper``: zi is the first bI
    images of zj, and image a needs only the images j > a (see :func:`run_tiles`)."""
    ni = max(1, min(bi, TILE_ROW_IMAGES))
    nj = max(1, min(bj, TILE_BYTES // (4 * L * L * ni)))
    tiles = []
    for i0, i1 in _cuts(0, bi, -(-bi // ni)):
        c0 = 0
        if upper:  # the row tile's own triangle image by image (no self pairs, no pair twice)
            tiles += [(a, a + 1, a + 1, i1) for a in range(i0, i1 - 1)]
            c0 = i1
        if c0 < bj:
            tiles += [(i0, i1, j0, j1) for j0, j1 in _cuts(c0, bj, -(-(bj - c0) // nj))]
    while tiles and len(tiles) < threads:  # small blocks: split the widest tile
        k = max(range(len(tiles)), key=lambda t: tiles[t][3] - tiles[t][2])
        i0, i1, j0, j1 = tiles[k]
        if j1 - j0 < 2:
            break
        tiles[k:k + 1] = [(i0, i1, a, b) for a, b in _cuts(j0, j1, 2)]
    tiles.sort(key=lambda t: -(t[1] - t[0]) * (t[3] - t[2]))
    return tiles


def run_tiles(tile: Any, bi: int, bj: int, L: int, upper: bool = False) -> bool:
    """Call ``tile(i0, i1, j0, j1)`` over tiles of the bI x bJ image pairs: on :func:`lane_count`
    threads with BLAS held to one thread each (threadpoolctl present), else as one tile.

    ``upper`` (a block on the pool's diagonal, both directions wanted): image a of zi is multiplied
    only with the images j > a of zj; each pair left out was multiplied the other way round, and
    no image with itself. Returns whether it did so: the caller then copies those distances into
    place (:func:`_fill_lower`) and sets the self pairs.
    """
    threads, controlled = lane_count()
    upper = upper and controlled
    tiles = _tile_list(bi, bj, L, threads, upper) if controlled else [(0, bi, 0, bj)]
    if threads > 1 and len(tiles) > 1:
        with _SerialBlas(threads):
            _run_tasks([lambda t=t: tile(*t) for t in tiles], threads)
    else:
        for t in tiles:
            tile(*t)
    return upper


def _fill_lower(d_rows: Any, d_cols: Any, bi: int, L: int) -> None:
    """The pairs :func:`run_tiles` left out with ``upper``: image a of zi against the images b < a
    of zj (and itself: +inf, set by the caller). zi's image b is zj's image b, so
    ``d_rows[b, a*L + m]`` (a scored by b) is ``d_cols[b, a*L + m]``, and ``d_cols[a, b*L + n]`` (b
    scored by a) is ``d_rows[a, b*L + n]``, both computed in a tile of image b's row."""
    for a in range(1, bi):
        d_rows[:a, a * L:(a + 1) * L] = d_cols[:a, a * L:(a + 1) * L]
        d_cols[a, :a * L] = d_rows[a, :a * L]


def _block_minima_numpy(zi: Any, zj: Any, want_cols: bool, diagonal: bool, precision: str,
                        chunk_bytes: int, band: Any = None) -> tuple[Any, Any | None]:
    """:func:`block_minima` for numpy arrays: the same numbers, computed tile by tile on
    :func:`lane_count` threads (see the section comment above)."""
    import numpy as np

    bi, L, c = zi.shape
    bj = zj.shape[0]
    zi_f = np.ascontiguousarray(zi, dtype=np.float32).reshape(bi * L, c)
    zj_f = np.ascontiguousarray(zj, dtype=np.float32).reshape(bj * L, c)
    d_rows = np.empty((bj, bi * L), dtype=np.float32)  # d_rows[b, a*L+m]
    d_cols = np.empty((bi, bj * L), dtype=np.float32) if want_cols else None  # d_cols[a, b*L+n]
    chunk_rows = max(1, int(chunk_bytes) // (4 * c))

    def tile(i0: int, i1: int, j0: int, j1: int) -> None:
        """Images [i0, i1) of zi against [j0, j1) of zj: their product, both arg-maxes, both
        recomputes."""
        ni, nj = i1 - i0, j1 - j0
        xi, xj = zi_f[i0 * L:i1 * L], zj_f[j0 * L:j1 * L]
        p = product(np, xi, xj, precision)  # (ni*L, nj*L)
        if band is not None:  # positional matching: cells beyond the radius never win an arg-max
            p.reshape(ni, L, nj, L)[...] += band[None, :, None, :]
        # Both arg-maxes while the product is in cache, then the recomputes.
        n_best = np.argmax(p.reshape(ni * L, nj, L), axis=2)  # (ni*L, nj): a contiguous reduction
        m_bests = [] if d_cols is None else [_argmax_rows_np(p[a * L:(a + 1) * L]) for a in range(ni)]
        del p
        idx = np.ascontiguousarray(n_best.T)  # (nj, ni*L), into xj's rows
        idx += (np.arange(nj) * L)[:, None]
        _distances_np(xi, xj, idx, d_rows[j0:j1, i0 * L:i1 * L], chunk_rows)
        if d_cols is None:
            return
        b_of = np.repeat(np.arange(nj), L)  # column k of p is patch n_of[k] of image b_of[k]
        n_of = np.tile(np.arange(L), nj)
        for a, m_best in enumerate(m_bests):  # (nj*L,): patch m of image i0 + a
            m_best += a * L  # into xi's rows
            out = d_cols[i0 + a, j0 * L:j1 * L]
            # Mutual nearest patches: the row side chose the same pair of patches, and its distance
            # is the same number (the same squares in the same order), so it is copied, not redone.
            np.copyto(out, d_rows[j0 + b_of, i0 * L + m_best])
            redo = np.flatnonzero(n_best[m_best, b_of] != n_of)
            if redo.size:
                out[redo] = _pair_distances_np(xj, redo, xi, m_best[redo], chunk_rows)

    if run_tiles(tile, bi, bj, L, upper=diagonal and d_cols is not None and bi <= bj):
        _fill_lower(d_rows, d_cols, bi, L)
    if diagonal:  # image a of zi is image a of zj: an image is not one of its other images
        for a in range(min(bi, bj)):
            d_rows[a, a * L:(a + 1) * L] = np.inf
            if d_cols is not None:
                d_cols[a, a * L:(a + 1) * L] = np.inf
    rows = d_rows.reshape(bj, bi, L).transpose(1, 2, 0)  # (bI, L, bJ)
    if d_cols is None:
        return rows, None
    return rows, d_cols.reshape(bi, bj, L).transpose(1, 2, 0)  # (bJ, L, bI)
