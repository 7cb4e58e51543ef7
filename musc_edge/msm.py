"""MSM: mutual scoring of the patches of a pool of unlabeled images (MUSC_SPEC 3).

For one LNAMD output Z (N, L, C) of unit vectors, image i's patch m is scored by every other image j
with ``d_ij(m) = min_n ||z_im - z_jn||``; its score is the mean of the [lo, hi) slice of those N - 1
distances sorted ascending (the interval [0, 0.3) of the other images by default).

How it is computed (and why it is fast):
- ``||a - b||^2 = 2 - 2 a.b`` for unit vectors, so an image pair's whole distance block is one
  matrix product, and its row maxima (i scored by j) and column maxima (j scored by i) come from
  the same product: every pair is multiplied once, not twice as in the released code.
- Pairs are batched into large GEMMs: a row group of images (``bI * L`` rows) times a column group
  (``bJ * L`` columns), so BLAS runs near its peak on every core; the per-pair minima are cheap
  reshape + max reductions of that block.
- ``sqrt(2 - 2 a.b)`` in float32 loses digits for small distances (the cancellation is amplified
  by the square root). Where the float32 estimate of d^2 is under ``EXACT_BELOW_D2`` we take the
  arg-max patch from the float32 product and recompute that one distance directly as ``||a - b||``
  (difference first, so no cancellation). Real pools rarely get there (MTD/EfficientNet at r = 5:
  at most 0.2% of nearest-patch distances); near-duplicate images take it for most entries.
- Memory: the N x N x L table of distances (float32) plus one product block. When the table does
  not fit ``mem_budget_bytes`` the images are scored in owner blocks that do fit, and pairs across
  owner blocks are then multiplied twice (correct, slower); the block size also follows the budget
  (never below one image pair's L x L block).
"""

from __future__ import annotations

import math
import sys
import types

import numpy as np

from .errors import InputError

#: Below this float32 estimate of d^2 the distance is recomputed exactly. The float32 product's
#: error on a.b is up to ~3e-7 at C = 768 (measured), i.e. a relative error of ~3e-7 / d^2 on d:
#: 1.5e-5 at d^2 = 0.02, well inside the rtol 1e-4 parity tolerance; below it we recompute.
EXACT_BELOW_D2 = 0.02

#: Rows per chunk of the exact recompute (its gathered rows stay in cache: a few MB).
_EXACT_CHUNK = 1024

#: Largest product block (bytes) we aim for: big enough for BLAS to run at peak, small enough to
#: stay near the cache and to leave the budget to the distance table.
_TARGET_BLOCK_BYTES = 32 << 20

#: Images per row group: the diagonal group blocks multiply bI * bI pairs where bI*(bI-1)/2 are
#: needed, so the wasted work is about bI / N of the total; small keeps that low.
_ROW_GROUP = 4


def interval_bounds(n_others: int, interval: tuple[float, float] = (0.0, 0.3)) -> tuple[int, int]:
    """Slice [lo, hi) of the ascending distances to the ``n_others`` other images (MUSC_SPEC 3).

    ``hi = max(lo + 1, floor(interval[1] * n_others))``: the released code has k = 0 (a division
    by zero) for pools under 5 images; we keep at least one image (our one deliberate difference).
    The float products are the released code's (``int(0.3 * (N - 1))``).
    """
    n_others = int(n_others)
    if n_others < 1:
        raise InputError(f"MSM needs at least 2 images (1 other image per image), got {n_others + 1}")
    a, b = float(interval[0]), float(interval[1])
    if not (0.0 <= a < b <= 1.0):
        raise InputError(f"interval must satisfy 0 <= start < end <= 1, got {tuple(interval)}")
    lo = min(int(math.floor(a * n_others)), n_others - 1)
    hi = min(max(lo + 1, int(math.floor(b * n_others))), n_others)
    return lo, hi


def _exact_distances(xa: np.ndarray, ia: np.ndarray, xb: np.ndarray, ib: np.ndarray) -> np.ndarray:
    """``||xa[ia[k]] - xb[ib[k]]||`` for every k, float32, gathered and computed in small chunks.

    The difference is taken first, so it keeps its relative precision whatever the distance (the
    cancellation of ``2 - 2 a.b`` never happens); the sum of squares has only positive terms, so
    float32 accumulation is accurate to about 1e-6 relative. Chunks keep the gathered rows in cache.
    """
    k = ia.shape[0]
    out = np.empty(k, dtype=np.float32)
    for s in range(0, k, _EXACT_CHUNK):
        diff = np.take(xa, ia[s : s + _EXACT_CHUNK], axis=0)
        diff -= np.take(xb, ib[s : s + _EXACT_CHUNK], axis=0)
        out[s : s + _EXACT_CHUNK] = np.einsum("kc,kc->k", diff, diff)
    return np.sqrt(out, out=out)


def _d_from_sim(sim: np.ndarray) -> np.ndarray:
    """float32 estimate of the distance from the cosine similarity of unit vectors."""
    d2 = np.float32(2.0) - np.float32(2.0) * sim
    np.maximum(d2, np.float32(0.0), out=d2)
    return np.sqrt(d2, out=d2)


def pair_min_distances(za: np.ndarray, zb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-patch distances between two images of unit patch vectors, from ONE product.

    za, zb: (L, C) unit vectors (LNAMD output of one image each; L may differ).
    Returns (a_to_b, b_to_a): for each patch of a the min distance to b's patches (La,), and for
    each patch of b the min distance to a's patches (Lb,), both float64. Small distances are
    recomputed exactly as in :func:`msm`, so both give the same numbers.
    """
    za = np.ascontiguousarray(za, dtype=np.float32)
    zb = np.ascontiguousarray(zb, dtype=np.float32)
    if za.ndim != 2 or zb.ndim != 2 or za.shape[1] != zb.shape[1]:
        raise InputError(f"pair_min_distances needs (L, C) arrays with equal C, got {za.shape} and {zb.shape}")
    p = za @ zb.T
    limit = np.float32(math.sqrt(EXACT_BELOW_D2))
    a_to_b = _d_from_sim(p.max(axis=1))
    (ia,) = np.nonzero(a_to_b < limit)
    if ia.size:
        a_to_b[ia] = _exact_distances(za, ia, zb, p[ia].argmax(axis=1))
    b_to_a = _d_from_sim(p.max(axis=0))
    (ib,) = np.nonzero(b_to_a < limit)
    if ib.size:
        b_to_a[ib] = _exact_distances(zb, ib, za, p[:, ib].argmax(axis=0))
    return a_to_b.astype(np.float64), b_to_a.astype(np.float64)


def interval_mean(dists: np.ndarray, interval: tuple[float, float] = (0.0, 0.3)) -> np.ndarray:
    """Mean over the [lo, hi) slice of the ascending sort along axis 0 (MUSC_SPEC 3).

    dists: (M, L) distances of the L patches of one image to M other images.
    Returns (L,) float64.
    """
    dists = np.asarray(dists)
    if dists.ndim != 2:
        raise InputError(f"interval_mean needs (M, L) distances, got shape {dists.shape}")
    lo, hi = interval_bounds(dists.shape[0], interval)
    kth = sorted({lo, hi - 1})
    part = np.partition(dists, kth, axis=0)[lo:hi]
    return part.astype(np.float64).mean(axis=0)


def _block_minima(
    zi: np.ndarray, zj: np.ndarray, want_cols: bool, same_start: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Min distances for every (image in row group, image in column group) pair, one product.

    zi: (bI, L, C), zj: (bJ, L, C) float32 unit vectors.
    Returns rows (bI, bJ, L): patch m of row image a to column image b; and, if ``want_cols``,
    cols (bJ, bI, L): patch n of column image b to row image a. float32.
    ``same_start``: both groups start at the same image (a diagonal block); its self pairs are set
    to +inf (they are not "other images") before anything is recomputed for them.
    """
    bi, L, c = zi.shape
    bj = zj.shape[0]
    p = zi.reshape(bi * L, c) @ zj.reshape(bj * L, c).T  # (bI*L, bJ*L)

    limit = np.float32(math.sqrt(EXACT_BELOW_D2))
    zi_flat, zj_flat = zi.reshape(bi * L, c), zj.reshape(bj * L, c)

    pr = p.reshape(bi * L, bj, L)
    rows = _d_from_sim(pr.max(axis=2))  # (bI*L, bJ)
    n_self = min(bi, bj) if same_start else 0
    for a in range(n_self):
        rows[a * L : (a + 1) * L, a] = np.inf
    r_idx, b_idx = np.nonzero(rows < limit)
    if r_idx.size:
        if r_idx.size * 8 > rows.size:  # many: one SIMD arg-max pass beats a gather per entry
            n_idx = pr.argmax(axis=2)[r_idx, b_idx]
        else:
            n_idx = pr[r_idx, b_idx, :].argmax(axis=1)
        rows[r_idx, b_idx] = _exact_distances(zi_flat, r_idx, zj_flat, b_idx * L + n_idx)
    rows = rows.reshape(bi, L, bj).transpose(0, 2, 1)

    cols = None
    if want_cols:
        pc = p.reshape(bi, L, bj * L)
        cols = _d_from_sim(pc.max(axis=1))  # (bI, bJ*L)
        for a in range(n_self):
            cols[a, a * L : (a + 1) * L] = np.inf
        a_idx, col_idx = np.nonzero(cols < limit)
        if a_idx.size:
            if a_idx.size * 8 > cols.size:  # many: transpose once, then a contiguous arg-max
                m_idx = np.ascontiguousarray(pc.transpose(0, 2, 1)).argmax(axis=2)[a_idx, col_idx]
            else:
                m_idx = pc[a_idx, :, col_idx].argmax(axis=1)
            cols[a_idx, col_idx] = _exact_distances(zj_flat, col_idx, zi_flat, a_idx * L + m_idx)
        cols = cols.reshape(bi, bj, L).transpose(1, 0, 2)
    return rows, cols


def _as_unit_float32(z: np.ndarray) -> np.ndarray:
    """float32 C-contiguous unit vectors; float16 input is re-normalised (its rounding moves unit
    vectors off the sphere by ~1e-3, and ``2 - 2 a.b`` needs them on it). Anything else that is
    not unit length is refused: MSM's distances are only right for LNAMD's output."""
    low_precision = z.dtype == np.float16
    z = np.ascontiguousarray(z, dtype=np.float32)
    sq = np.einsum("nlc,nlc->nl", z, z)
    if low_precision:
        return z / np.sqrt(np.maximum(sq, 1e-30))[..., None]
    if not np.all(np.abs(sq - 1.0) < 1e-4):
        bad = float(np.abs(sq - 1.0).max())
        raise InputError(
            f"msm needs unit vectors (LNAMD output), but squared norms deviate from 1 by up to {bad:.3g}; "
            "pass musc_edge.lnamd.lnamd(tokens, r)"
        )
    return z


def _pair_block_bytes(L: int) -> int:
    """Bytes one image pair adds to a product block: the L x L float32 product and its transposed
    copy (taken on the exact-recompute path)."""
    return 2 * 4 * L * L


def _group_sizes(n: int, L: int, budget_for_block: int) -> tuple[int, int]:
    """Row and column group sizes (images) so that one product block fits the budget."""
    per_pair = _pair_block_bytes(L)
    target = min(_TARGET_BLOCK_BYTES, budget_for_block)
    bi = max(1, min(_ROW_GROUP, n, target // per_pair))
    bj = max(1, min(n, target // (per_pair * bi)))
    return bi, bj


def msm(
    z: np.ndarray,
    interval: tuple[float, float] = (0.0, 0.3),
    *,
    mem_budget_bytes: int = 1 << 30,
) -> np.ndarray:
    """MSM patch scores of one (layer, r) LNAMD output (MUSC_SPEC 3).

    z: (N, L, C) unit vectors (float32; float16 is re-normalised after the cast). Returns (N, L)
    float64.
    ``mem_budget_bytes`` bounds the extra memory (distance table + product block), whatever N is.
    """
    z = np.asarray(z)
    if z.ndim != 3:
        raise InputError(f"msm needs (N, L, C) patch features, got shape {z.shape}")
    n, L, c = z.shape
    interval_bounds(n - 1, interval)  # validates N >= 2 and the interval
    z = _as_unit_float32(z)

    table_row_bytes = 4 * n * L  # one image's distances to every other image
    block_budget = max(mem_budget_bytes // 4, _pair_block_bytes(L))
    owner = max(1, min(n, (mem_budget_bytes - block_budget) // table_row_bytes))
    bi, bj = _group_sizes(n, L, block_budget)

    out = np.empty((n, L), dtype=np.float64)
    for o0 in range(0, n, owner):
        o1 = min(n, o0 + owner)
        _score_owner_block(z, o0, o1, bi, bj, interval, out)
    return out


def _score_owner_block(z, o0, o1, bi, bj, interval, out) -> None:
    """Score images [o0, o1) against all images; pairs inside the block are multiplied once."""
    n, L, _ = z.shape
    m = o1 - o0
    table = np.full((m, n, L), np.inf, dtype=np.float32)  # table[i - o0, j] = d_ij(.)
    # Pairs inside the owner block: row group I, column groups J >= I (both directions at once).
    for i0 in range(o0, o1, bi):
        i1 = min(o1, i0 + bi)
        for j0 in range(i0, o1, bj):
            j1 = min(o1, j0 + bj)
            rows, cols = _block_minima(z[i0:i1], z[j0:j1], want_cols=True, same_start=j0 == i0)
            table[i0 - o0 : i1 - o0, j0:j1] = rows
            table[j0 - o0 : j1 - o0, i0:i1] = cols
    # Pairs with images outside the block: row direction only (the budget has no room for them).
    outside = [(0, o0), (o1, n)]
    for i0 in range(o0, o1, bi):
        i1 = min(o1, i0 + bi)
        for a, b in outside:
            for j0 in range(a, b, bj):
                j1 = min(b, j0 + bj)
                rows, _ = _block_minima(z[i0:i1], z[j0:j1], want_cols=False, same_start=j0 == i0)
                table[i0 - o0 : i1 - o0, j0:j1] = rows
    for i in range(o0, o1):
        others = np.delete(table[i - o0], i, axis=0)  # the self "distance" is not another image
        out[i] = interval_mean(others, interval)


class _CallableModule(types.ModuleType):
    """``musc_edge.msm`` is both this module and, as the issue asks, the public MSM function.

    Importing a submodule sets the package attribute to the module, which would shadow the lazily
    exported function; making the module callable keeps ``musc_edge.msm(z)`` and
    ``musc_edge.msm.interval_bounds`` both working.
    """

    def __call__(self, *args, **kwargs):
        return msm(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
