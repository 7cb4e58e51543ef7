"""Positional matching (``match_radius``) and MSM's exclude matrix against direct computations.

The references here are brute force: every patch's distance to every patch of every other image
(float64, difference first), masked to the neighbourhood, then the minimum and MUSC_SPEC 3's
interval mean written out with a Python sort.
"""

from __future__ import annotations

import math

import array_api_strict as xps
import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.core import pairs
from musc_edge.core.lnamd import lnamd
from musc_edge.core.msm import msm
from musc_edge.core.pairs import block_minima, covers_grid, interval_bounds, local_minima
from musc_edge.core.params import MuscParams
from musc_edge.core.scorer import score_tokens
from musc_edge.core.window import PoolWindow

G = 5
L = G * G
SHIPPED_SHARE = pairs.OFFSET_SHARE  # before the fixture below patches it


@pytest.fixture(autouse=True, params=["offsets", "masked"])
def kernel_path(request, monkeypatch):
    """Every test runs on both positional kernels: offset by offset, and the masked global product."""
    monkeypatch.setattr(pairs, "OFFSET_SHARE", 1.0 if request.param == "offsets" else 0.0)
    return request.param


def unit(rng: np.random.Generator, n: int, c: int = 12) -> np.ndarray:
    z = rng.standard_normal((n, L, c)).astype(np.float32)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def brute_rows(z: np.ndarray, radius: int | None) -> np.ndarray:
    """(N, L, N) float64: patch m of image i to its nearest allowed patch of image j; +inf on i == j."""
    zz = z.astype(np.float64)
    d = np.linalg.norm(zz[:, None, :, None, :] - zz[None, :, None, :, :], axis=-1)  # (i, j, m, n)
    if radius is not None:
        y, x = np.divmod(np.arange(L), G)
        near = (np.abs(y[:, None] - y[None]) <= radius) & (np.abs(x[:, None] - x[None]) <= radius)
        d = np.where(near[None, None], d, np.inf)
    rows = d.min(axis=-1).transpose(0, 2, 1).copy()  # (i, m, j)
    for i in range(len(z)):
        rows[i, :, i] = np.inf
    return rows


def brute_msm(rows: np.ndarray, interval=(0.0, 0.3), exclude: np.ndarray | None = None) -> np.ndarray:
    n = rows.shape[0]
    out = np.zeros(rows.shape[:2])
    for i in range(n):
        others = [j for j in range(n) if j != i and (exclude is None or not exclude[i, j])]
        lo, hi = interval_bounds(len(others), interval)
        for m in range(rows.shape[1]):
            out[i, m] = np.mean(sorted(rows[i, m, j] for j in others)[lo:hi])
    return out


def assert_same_distances(a: np.ndarray, b: np.ndarray, atol: float = 2e-6) -> None:
    assert (np.isinf(a) == np.isinf(b)).all()
    f = np.isfinite(a)
    np.testing.assert_allclose(a[f], b[f], rtol=0, atol=atol)


@pytest.mark.parametrize("radius", [0, 1, 2])
def test_local_rows_and_cols_are_the_masked_nearest_patch(radius: int) -> None:
    z = unit(np.random.default_rng(radius), 6)
    ref = brute_rows(z, radius)
    rows, cols = block_minima(z, z, diagonal=True, radius=radius)
    assert_same_distances(rows, ref)
    assert_same_distances(cols, ref)  # cols[b, n, a]: patch n of b scored by a, the same table
    rows2, cols2 = block_minima(z[:2], z[2:], radius=radius)  # an off-diagonal block
    assert_same_distances(rows2, ref[:2, :, 2:])
    assert_same_distances(cols2, ref[2:, :, :2])


def test_radius_zero_is_the_same_position_distance() -> None:
    z = unit(np.random.default_rng(7), 4)
    rows = local_minima(z, z, 0, diagonal=True)
    direct = np.linalg.norm(z.astype(np.float64)[:, :, None, :] - z.astype(np.float64).transpose(1, 0, 2)[None],
                            axis=-1)  # (i, m, j): patch m of i against patch m of j
    for i in range(4):
        direct[i, :, i] = np.inf
    assert_same_distances(rows, direct)


def test_a_radius_that_covers_the_grid_is_the_global_search() -> None:
    z = unit(np.random.default_rng(3), 6)
    assert covers_grid(G - 1, L) and not covers_grid(G - 2, L)
    g_rows, g_cols = block_minima(z, z, diagonal=True)
    c_rows, c_cols = block_minima(z, z, diagonal=True, radius=G - 1)  # routed to the global kernel
    np.testing.assert_array_equal(c_rows, g_rows)
    np.testing.assert_array_equal(c_cols, g_cols)
    # the positional kernel itself, forced to the whole grid, finds the same nearest patches
    assert_same_distances(local_minima(z, z, G - 1, diagonal=True), g_rows, atol=1e-6)
    np.testing.assert_array_equal(msm(z, radius=G - 1), msm(z))
    np.testing.assert_array_equal(msm(z, radius=100), msm(z))


@pytest.mark.parametrize("radius", [0, 1])
def test_msm_with_a_radius_is_the_interval_mean_of_the_masked_table(radius: int) -> None:
    z = unit(np.random.default_rng(10 + radius), 9)
    ref = brute_msm(brute_rows(z, radius))
    np.testing.assert_allclose(msm(z, radius=radius), ref, rtol=0, atol=2e-6)
    # owner blocks and small groups under a tiny budget: the same numbers
    np.testing.assert_allclose(msm(z, radius=radius, mem_budget_bytes=4 * 9 * L * 3), ref, rtol=0, atol=2e-6)


def test_the_positional_kernel_uses_only_the_array_api() -> None:
    z = unit(np.random.default_rng(5), 5)
    ref = block_minima(z, z, diagonal=True, radius=1)
    rows, cols = block_minima(xps.asarray(z), xps.asarray(z), diagonal=True, radius=1)
    assert_same_distances(np.asarray(rows), ref[0], atol=1e-7)
    assert_same_distances(np.asarray(cols), ref[1], atol=1e-7)
    np.testing.assert_allclose(np.asarray(msm(xps.asarray(z), radius=1)), msm(z, radius=1), rtol=0, atol=1e-9)


def test_a_positional_pool_equals_the_batch_scores() -> None:
    rng = np.random.default_rng(11)
    params = MuscParams(r_list=(1, 3), match_radius=1)
    dims = (8, 10)
    tokens = [rng.standard_normal((7, 1 + L, c)).astype(np.float32) for c in dims]
    emb = rng.standard_normal((7, 6)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    pool = PoolWindow(G, dims, 6, slots=7, params=params)
    for s in range(7):
        pool.add(pool.prepare(s, [t[s] for t in tokens], emb[s]))
    _, maps, raw, final = pool.score_all()
    ref = score_tokens(tokens, emb, params=params)
    np.testing.assert_allclose(maps, ref.patch_maps, rtol=0, atol=1e-5)
    np.testing.assert_allclose(final, ref.image_scores, rtol=0, atol=1e-5)
    glob = score_tokens(tokens, emb, params=MuscParams(r_list=(1, 3)))
    assert not np.allclose(ref.patch_maps, glob.patch_maps)  # the radius did change something


def test_aligned_defect_is_found_only_by_position() -> None:
    """Two kinds of part, each patch's texture fixed by its position; a patch showing the texture
    of another position is normal globally but anomalous at radius 0."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((L, 16)).astype(np.float32)
    tokens = np.repeat(base[None], 8, axis=0) + 0.05 * rng.standard_normal((8, L, 16)).astype(np.float32)
    tokens[0, 12] = tokens[0, 3]  # image 0: the centre shows the texture of another cell
    tok = [np.concatenate([np.zeros((8, 1, 16), np.float32), tokens], axis=1)]
    params = dict(r_list=(1,))
    glob = score_tokens(tok, params=MuscParams(**params)).patch_maps[0].reshape(-1)
    pos = score_tokens(tok, params=MuscParams(match_radius=0, **params)).patch_maps[0].reshape(-1)
    assert glob[12] < 2 * np.median(glob)       # globally it matches cell 3 of every image
    assert pos[12] == pos.max() and pos[12] > 5 * np.median(pos)


def test_exclude_takes_images_out_of_each_others_interval() -> None:
    z = unit(np.random.default_rng(4), 8)
    excl = np.zeros((8, 8), bool)
    excl[0, [1, 2]] = excl[1, 0] = excl[5, [0, 1, 2, 3]] = True
    ref = brute_msm(brute_rows(z, None), exclude=excl)
    np.testing.assert_allclose(msm(z, exclude=excl), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(msm(z, exclude=excl, mem_budget_bytes=4 * 8 * L * 3), ref, rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(msm(xps.asarray(z), exclude=excl)), ref, rtol=0, atol=2e-6)
    np.testing.assert_array_equal(msm(z, exclude=np.zeros((8, 8), bool)), msm(z))
    np.testing.assert_array_equal(msm(z, exclude=np.eye(8, dtype=bool)), msm(z))  # self is never an other


@pytest.mark.parametrize("exclude, match", [
    (np.zeros((3, 3), bool), r"\(N, N\) = \(8, 8\)"),
    (np.zeros((8, 8), int), "bool"),
    (~np.eye(8, dtype=bool), "image 0 with no other image"),
])
def test_bad_exclude_is_one_line(exclude, match) -> None:
    with pytest.raises(InputError, match=match):
        msm(unit(np.random.default_rng(0), 8), exclude=exclude)


@pytest.mark.parametrize("radius", [-1, 1.5, "two"])
def test_bad_radius_is_refused(radius) -> None:
    with pytest.raises(InputError, match="match_radius"):
        MuscParams(match_radius=radius)


def test_a_radius_needs_a_square_grid() -> None:
    z = np.ones((3, 6, 4), np.float32) / 2.0
    with pytest.raises(InputError, match="square patch grid"):
        msm(z, radius=1)
    assert MuscParams(match_radius=2).to_dict()["match_radius"] == 2
    assert math.isinf(brute_rows(unit(np.random.default_rng(0), 2), 0)[0, 0, 0])


def test_lnamd_then_positional_msm_keeps_shapes() -> None:
    tokens = np.random.default_rng(0).standard_normal((4, 1 + L, 6)).astype(np.float32)
    assert msm(lnamd(tokens, 3), radius=1).shape == (4, L)


def test_the_offset_rule_follows_the_measured_crossover(monkeypatch) -> None:
    monkeypatch.setattr(pairs, "OFFSET_SHARE", SHIPPED_SHARE)
    pairs_rule = pairs.prefers_offsets
    assert pairs_rule(1, 16 * 16) and not pairs_rule(2, 16 * 16)  # 9 of 256 cells, not 25
    assert pairs_rule(3, 28 * 28) and not pairs_rule(4, 28 * 28)  # 49 of 784, not 81


@pytest.mark.parametrize("radius", [-1, 0.7, True, "1"])
def test_msm_and_the_kernel_refuse_a_bad_radius(radius) -> None:
    z = unit(np.random.default_rng(0), 3)
    with pytest.raises(InputError, match="match_radius"):
        msm(z, radius=radius)
    with pytest.raises(InputError, match="match_radius"):
        block_minima(z, z, radius=radius)
