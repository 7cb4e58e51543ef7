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

import math
from typing import Any

from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

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
                 precision: str = "exact", chunk_bytes: int | None = None) -> tuple[Any, Any | None]:
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
    """
    xp = array_namespace(zi, zj)
    chunk_bytes = recompute_chunk_bytes(xp) if chunk_bytes is None else int(chunk_bytes)
    bi, L, c = zi.shape
    bj = zj.shape[0]
    dev = getattr(zi, "device", None)
    zi_f = xp.reshape(zi, (bi * L, c))
    zj_f = xp.reshape(zj, (bj * L, c))
    p = product(xp, zi_f, zj_f, precision)  # (bI*L, bJ*L): p[a*L+m, b*L+n] = z_a,m . z_b,n
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


def _rows(xp: Any, p: Any, zi_f: Any, zj_f: Any, bi: int, bj: int, L: int, dev: Any, chunk_bytes: int) -> Any:
    """(bJ, bI*L): for patch row r of zi and image b, the arg-max patch n of b (a contiguous
    reduction of the product), then its exact distance."""
    n_best = xp.argmax(xp.reshape(p, (bi * L, bj, L)), axis=2)  # (bI*L, bJ)
    j_idx = xp.matrix_transpose(n_best) + (xp.arange(bj, device=dev) * L)[:, None]  # (bJ, bI*L)
    return nearest_distances(zi_f, zj_f, j_idx, chunk_bytes=chunk_bytes)


def _cols(xp: Any, p: Any, zi_f: Any, zj_f: Any, bi: int, bj: int, L: int, dev: Any, chunk_bytes: int) -> Any:
    """(bI, bJ*L): for patch row c of zj and image a, the arg-max patch m of a (a reduction
    across the product's rows), then its exact distance."""
    m_best = _argmax_axis1(xp, xp.reshape(p, (bi, L, bj * L)))  # (bI, bJ*L)
    i_idx = m_best + (xp.arange(bi, device=dev) * L)[:, None]
    return nearest_distances(zj_f, zi_f, i_idx, chunk_bytes=chunk_bytes)


def _argmax_axis1(xp: Any, x: Any) -> Any:
    """``argmax(x, axis=1)`` of a (B, L, K) array. numpy's arg-max copies a non-last axis to the
    end first; doing that copy per image keeps it in cache instead of one block-sized pass."""
    if not is_numpy_namespace(xp):
        return xp.argmax(x, axis=1)
    import numpy as np

    return np.stack([np.ascontiguousarray(x[a].T).argmax(axis=1) for a in range(x.shape[0])])


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
