"""MSM: mutual scoring of the patches of a pool of unlabeled images (MUSC_SPEC 3).

For one LNAMD output Z (N, L, C) of unit vectors, image i's patch m is scored by every other image j
with ``d_ij(m) = min_n ||z_im - z_jn||``; its score is the mean of the [lo, hi) slice of those N - 1
distances sorted ascending (the interval [0, 0.3) of the other images by default).

How it is computed (and why it is fast):
- every image pair is multiplied once, not twice as in the released code: the pair kernel
  (:func:`musc_edge.core.pairs.block_minima`) gives both directions of a pair from one product;
- pairs are batched into large GEMMs: a row group of images (``bI * L`` rows) times a column group
  (``bJ * L`` columns), so BLAS runs near its peak; the product only chooses each nearest patch,
  whose distance is then recomputed exactly (difference first; see the kernel's docstring);
- the N x L x N table of distances (float32, +inf on the diagonal) goes through one vectorised
  interval mean (:func:`musc_edge.core.pairs.interval_mean`), no per-image loop;
- memory: the table plus one product block. When the table does not fit ``mem_budget_bytes`` the
  images are scored in owner blocks that do fit, and pairs across owner blocks are then multiplied
  twice (correct, slower); the block size also follows the budget (never below one image pair's
  L x L block).

Everything but the numpy input checks runs through the array namespace of the input, so a CuPy
array is scored on its GPU by this same code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from array_api_compat import array_namespace, is_numpy_namespace

from .errors import InputError
from .pairs import (block_minima, check_radius, covers_grid, interval_bounds, interval_mean, lane_count,
                    prefers_offsets)
from .params import DEFAULT_INTERVAL, MuscParams

#: Largest product block (bytes) we aim for: big enough for BLAS to run at peak, small enough to
#: stay near the cache and to leave the budget to the distance table.
TARGET_BLOCK_BYTES = 32 << 20

#: Images per row group: the diagonal group blocks multiply bI * bI pairs where bI*(bI-1)/2 are
#: needed, so the wasted work is about bI / N of the total; small keeps that low.
ROW_GROUP = 4

#: The same two sizes for numpy when the pair kernel tiles its blocks (threadpoolctl present:
#: :func:`musc_edge.core.pairs.run_tiles`). A block's products are then tiles of a few MB, one per
#: thread at a time, and a diagonal block multiplies only its upper triangle, so a block is mostly
#: bookkeeping: blocks as large as the budget allows mean few of them, each with tiles enough to
#: keep every thread busy to its end. (Still counted at ``pair_block_bytes`` per pair, as if the
#: whole block's product were held.)
TILED_TARGET_BLOCK_BYTES = 256 << 20
TILED_ROW_GROUP = 8

#: Positional matching's block on a CPU: its running maxima, arg-maxes and one offset's products
#: (:func:`local_pair_bytes` per pair) stay near the cache while the offsets go by, instead of
#: streaming ~100 MB arrays from memory for every offset (benchmarks/bench_match_radius.py).
LOCAL_TARGET_BLOCK_BYTES = 24 << 20

#: The same two sizes for a GPU: a block must fill the device (thousands of rows and columns per
#: product, one launch per step), and device memory is large, so both are larger.
GPU_TARGET_BLOCK_BYTES = 2 << 30
GPU_ROW_GROUP = 16


def check_interval(n: int, interval: tuple[float, float]) -> tuple[int, int]:
    """Validate a pool of ``n`` images and the interval; return the slice bounds (MUSC_SPEC 3)."""
    if int(n) < 2:
        raise InputError(f"MSM needs at least 2 images (1 other image per image), got {int(n)}")
    MuscParams(interval=tuple(interval))  # validates the interval, one message for every caller
    return interval_bounds(int(n) - 1, interval)


def as_unit_float32(z: Any) -> Any:
    """float32 unit vectors of the input's namespace.

    float16 input is re-normalised (its rounding moves unit vectors off the sphere by ~1e-3, and
    the kernel's product needs them on it to choose the right patch). Anything else that is not
    unit length is refused: MSM's distances are only right for LNAMD's output.
    """
    xp = array_namespace(z)
    low_precision = hasattr(xp, "float16") and z.dtype == xp.float16  # the array API has no float16
    z = xp.astype(z, xp.float32)
    sq = xp.vecdot(z, z, axis=-1)
    if low_precision:
        return z / xp.sqrt(xp.maximum(sq, xp.asarray(1e-30, dtype=xp.float32, device=getattr(z, "device", None))))[..., None]
    bad = float(xp.max(xp.abs(sq - 1.0))) if sq.size else 0.0
    if not bad < 1e-4:
        raise InputError(
            f"msm needs unit vectors (LNAMD output), but squared norms deviate from 1 by up to {bad:.3g}; "
            "pass musc_edge.core.lnamd.lnamd(tokens, r)"
        )
    return z


def pair_block_bytes(L: int) -> int:
    """Bytes one image pair adds to a product block: the L x L float32 product and the per-image
    transposed copy of the column arg-max."""
    return 2 * 4 * L * L


def local_pair_bytes(L: int) -> int:
    """Bytes one image pair adds to a positional-matching block (:func:`~musc_edge.core.pairs.local_minima`):
    per patch its running best product and arg-max, one offset's product and its comparison, then
    the recompute's int64 indices, their permuted copy and the distances (measured with
    tracemalloc: ~44 bytes per patch and pair)."""
    return 48 * L


def group_sizes(n: int, L: int, budget_for_block: int, *, gpu: bool = False,
                local: bool = False) -> tuple[int, int]:
    """Row and column group sizes (images) so that one product block fits the budget.

    The column group is never smaller than the row group: a row group's first column group then
    holds all of its own images, so its self pairs are exactly the diagonal block's.
    ``local`` (positional matching): a pair costs ``local_pair_bytes`` and the row and column
    groups are equal and square, so the batched products over grid positions are large GEMMs.
    """
    if local:
        target = min(GPU_TARGET_BLOCK_BYTES if gpu else LOCAL_TARGET_BLOCK_BYTES, budget_for_block)
        b = max(1, min(n, math.isqrt(max(1, target // local_pair_bytes(L)))))
        return b, b
    per_pair = pair_block_bytes(L)
    if gpu:
        block, row_group = GPU_TARGET_BLOCK_BYTES, GPU_ROW_GROUP
    elif lane_count()[1]:
        block, row_group = TILED_TARGET_BLOCK_BYTES, TILED_ROW_GROUP
    else:
        block, row_group = TARGET_BLOCK_BYTES, ROW_GROUP
    target = min(block, budget_for_block)
    bi = max(1, min(row_group, n, target // per_pair))
    bj = max(bi, min(n, target // (per_pair * bi)))
    return bi, bj


def plan(n: int, L: int, mem_budget_bytes: int, *, gpu: bool = False, local: bool = False) -> tuple[int, int, int]:
    """(owner block, row group, column group) sizes in images for ``n`` images of ``L`` patches."""
    table_row_bytes = 4 * n * L  # one image's distances to every other image
    block_budget = max(mem_budget_bytes // 4, local_pair_bytes(L) if local else pair_block_bytes(L))
    owner = max(1, min(n, (mem_budget_bytes - block_budget) // table_row_bytes))
    bi, bj = group_sizes(n, L, block_budget, gpu=gpu, local=local)
    return owner, bi, bj


def check_exclude(exclude: Any, n: int) -> Any:
    """Validate an (N, N) bool "j does not score i" matrix; every image keeps one other image."""
    e = np.asarray(exclude)
    if e.shape != (n, n) or e.dtype != np.bool_:
        raise InputError(f"exclude must be an (N, N) = ({n}, {n}) bool array, got {e.dtype} {e.shape}")
    e = e.copy()
    np.fill_diagonal(e, False)
    if n > 1 and (e.sum(axis=1) >= n - 1).any():
        i = int(np.flatnonzero(e.sum(axis=1) >= n - 1)[0])
        raise InputError(f"exclude leaves image {i} with no other image to score it")
    return e


def device_budget(xp: Any, mem_budget_bytes: int) -> int:
    """On a GPU the budget is also capped by half of the device's free memory (the rest is for the
    other arrays of the scoring and for cuBLAS's workspace)."""
    if is_numpy_namespace(xp) or not hasattr(xp, "cuda"):
        return mem_budget_bytes
    try:
        import cupy

        free, _ = cupy.cuda.runtime.memGetInfo()
    except Exception:  # noqa: BLE001 - no such query on this library: keep the caller's budget
        return mem_budget_bytes
    return max(1, min(int(mem_budget_bytes), int(free) // 2))


def msm(z: Any, interval: tuple[float, float] = DEFAULT_INTERVAL, *, mem_budget_bytes: int = 1 << 30,
        precision: str = "exact", radius: int | None = None, exclude: Any = None) -> Any:
    """MSM patch scores of one (layer, r) LNAMD output (MUSC_SPEC 3).

    z: (N, L, C) unit vectors (float32; float16 is re-normalised after the cast), a numpy array or
    any array API array (CuPy: computed on its device). Returns (N, L) float64 of z's namespace.
    ``mem_budget_bytes`` bounds the extra memory (distance table + product block), whatever N is
    (on a GPU also half its free memory). ``precision``: see :func:`musc_edge.core.pairs.product`.
    ``radius``: positional matching (:func:`musc_edge.core.pairs.block_minima`); None is global.
    ``exclude``: optional (N, N) bool numpy array, ``exclude[i, j]`` = image j does not score image
    i (tiles of one image, images that share a repeated defect): j leaves i's sorted distances and
    the interval is taken over i's remaining N - 1 - k other images.
    """
    xp = array_namespace(z)
    if is_numpy_namespace(xp):
        z = np.ascontiguousarray(z)
    if z.ndim != 3:
        raise InputError(f"msm needs (N, L, C) patch features, got shape {tuple(z.shape)}")
    n, L, _ = z.shape
    check_interval(n, interval)
    z = as_unit_float32(z)
    excl = None if exclude is None else check_exclude(exclude, n)
    radius = check_radius(radius)
    if radius is not None and covers_grid(radius, L):  # the neighbourhood is the whole grid
        radius = None
    gpu = not is_numpy_namespace(xp)
    offsets = radius is not None and prefers_offsets(radius, L)  # else the masked global product
    owner, bi, bj = plan(n, L, device_budget(xp, mem_budget_bytes) if gpu else mem_budget_bytes, gpu=gpu,
                         local=offsets)
    parts = [_score_owner_block(xp, z, o0, min(n, o0 + owner), bi, bj, interval, precision, radius, excl, offsets)
             for o0 in range(0, n, owner)]
    return parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)


def _masked_interval_mean(xp: Any, table: Any, o0: int, excl: Any, interval: tuple[float, float]) -> Any:
    """Interval means of the owner block's table with the excluded pairs taken out: they are set
    to +inf (above every slice, like the self pair) and each image's bounds follow its own count of
    other images; images with the same count share one selection."""
    n_own = table.shape[0]
    block = excl[o0:o0 + n_own]
    dev = getattr(table, "device", None)
    mask = xp.asarray(block, device=dev)[:, None, :]
    table = xp.where(mask, xp.asarray(math.inf, dtype=table.dtype, device=dev), table)
    others = table.shape[2] - 1 - block.sum(axis=1)
    counts = np.unique(others)
    if counts.size == 1:
        return interval_mean(table, *interval_bounds(int(counts[0]), interval))
    order = np.argsort(others, kind="stable")  # images grouped by count, then put back in place
    parts = []
    for k in counts:
        idx = xp.asarray(order[others[order] == k], device=dev)
        parts.append(interval_mean(xp.take(table, idx, axis=0), *interval_bounds(int(k), interval)))
    return xp.take(xp.concat(parts, axis=0), xp.asarray(np.argsort(order), device=dev), axis=0)


def _score_owner_block(xp: Any, z: Any, o0: int, o1: int, bi: int, bj: int, interval: tuple[float, float],
                       precision: str = "exact", radius: int | None = None, excl: Any = None,
                       offsets: bool = False) -> Any:
    """Scores (o1 - o0, L) of images [o0, o1) against all images; pairs inside the block are
    multiplied once, pairs with images outside it in the row direction only."""
    n, L, _ = z.shape
    dev = getattr(z, "device", None)
    table = xp.full((o1 - o0, L, n), math.inf, dtype=xp.float32, device=dev)  # table[i - o0, m, j] = d_ij(m)
    if offsets:
        _fill_local(xp, z, table, o0, o1, bi, precision, radius)
    else:
        _fill_global(xp, z, table, o0, o1, bi, bj, precision, radius)
    if excl is None:
        lo, hi = interval_bounds(n - 1, interval)
        return interval_mean(table, lo, hi)
    return _masked_interval_mean(xp, table, o0, excl, interval)


def _fill_local(xp: Any, z: Any, table: Any, o0: int, o1: int, b: int, precision: str, radius: int) -> None:
    """The owner block's table under positional matching: every pair in the row direction (the
    kernel's column direction is the same computation with the images swapped, so nothing is
    saved by asking for it)."""
    n = z.shape[0]
    for i0 in range(o0, o1, b):
        i1 = min(o1, i0 + b)
        for j0 in range(0, n, b):
            j1 = min(n, j0 + b)
            rows, _ = block_minima(z[i0:i1, ...], z[j0:j1, ...], want_cols=False, diagonal=False,
                                   precision=precision, radius=radius)
            table[i0 - o0:i1 - o0, :, j0:j1] = rows
    for i in range(o0, o1):  # an image is not one of its own other images
        table[i - o0, :, i] = math.inf


def _fill_global(xp: Any, z: Any, table: Any, o0: int, o1: int, bi: int, bj: int, precision: str,
                 radius: int | None = None) -> None:
    """The owner block's table under MuSc's global nearest patch (MUSC_SPEC 3), or under
    positional matching on the masked global product (``radius``; the mask is symmetric, so both
    directions of a pair still come from one product)."""
    n = z.shape[0]
    for i0 in range(o0, o1, bi):
        i1 = min(o1, i0 + bi)
        for j0 in range(i0, o1, bj):  # inside: row group I, column groups J >= I, both directions
            j1 = min(o1, j0 + bj)
            rows, cols = block_minima(z[i0:i1, ...], z[j0:j1, ...], want_cols=True, diagonal=j0 == i0,
                                      precision=precision, radius=radius)
            table[i0 - o0:i1 - o0, :, j0:j1] = rows
            # the other direction; on the diagonal only for the images past I (I x I is in rows)
            k0 = i1 - j0 if j0 == i0 else 0
            if k0 < j1 - j0:
                table[j0 + k0 - o0:j1 - o0, :, i0:i1] = cols[k0:, ...]
        for a, b in ((0, o0), (o1, n)):  # outside the owner block: no room to keep their side
            for j0 in range(a, b, bj):
                j1 = min(b, j0 + bj)
                rows, _ = block_minima(z[i0:i1, ...], z[j0:j1, ...], want_cols=False, precision=precision,
                                       radius=radius)
                table[i0 - o0:i1 - o0, :, j0:j1] = rows
