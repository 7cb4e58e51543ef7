"""MSM building blocks (MUSC_SPEC 3) against brute force and against themselves under a budget."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core import msm as msm_mod
from musc_edge.core.errors import InputError
from musc_edge.core.msm import check_interval, msm
from musc_edge.core.pairs import block_minima, interval_bounds, interval_mean


def pair_min_distances(za: np.ndarray, zb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The pair kernel on one image pair: (a scored by b, b scored by a)."""
    rows, cols = block_minima(za[None], zb[None])
    return rows[0, :, 0], cols[0, :, 0]


def unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    z = rng.standard_normal(shape).astype(np.float32)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


def brute_msm(z: np.ndarray, interval=(0.0, 0.3)) -> np.ndarray:
    """MUSC_SPEC 3 word for word, float64, every pair both ways."""
    z = z.astype(np.float64)
    n = z.shape[0]
    lo, hi = interval_bounds(n - 1, interval)
    out = np.empty(z.shape[:2])
    for i in range(n):
        d = [np.sqrt(((z[i][:, None] - z[j][None]) ** 2).sum(-1)).min(axis=1) for j in range(n) if j != i]
        out[i] = np.sort(np.array(d), axis=0)[lo:hi].mean(axis=0)
    return out


@pytest.mark.parametrize(
    "n_others, interval, expected",
    [
        (11, (0.0, 0.3), (0, 3)),  # N = 12: int(0.3 * 11) = 3
        (19, (0.0, 0.3), (0, 5)),
        (10, (0.0, 0.3), (0, 3)),  # 0.3 * 10 = 3.0000000000000004 -> 3
        (1, (0.0, 0.3), (0, 1)),  # N = 2: k = max(1, 0)
        (3, (0.0, 0.3), (0, 1)),  # N = 4
        (4, (0.0, 0.3), (0, 1)),  # N = 5: the released code's first k >= 1
        (99, (0.0, 0.3), (0, 29)),
        (20, (0.1, 0.5), (2, 10)),
        (5, (0.0, 1.0), (0, 5)),
    ],
)
def test_interval_bounds(n_others, interval, expected):
    assert interval_bounds(n_others, interval) == expected


@pytest.mark.parametrize("bad", [(0.3, 0.1), (-0.1, 0.3), (0.0, 1.5), (0.2, 0.2)])
def test_check_interval_rejects_bad_interval(bad):
    with pytest.raises(InputError, match="interval"):
        check_interval(11, bad)


def test_check_interval_needs_another_image():
    with pytest.raises(InputError, match="at least 2 images"):
        check_interval(1, (0.0, 0.3))


@pytest.mark.parametrize("lo, hi", [(2, 10), (0, 1), (0, 20), (19, 20)])
def test_interval_mean_is_mean_of_sorted_slice(lo, hi):
    rng = np.random.default_rng(0)
    d = rng.random((7, 3, 20)).astype(np.float32)
    ref = np.sort(d.astype(np.float64), axis=-1)[..., lo:hi].mean(axis=-1)
    got = interval_mean(d, lo, hi)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    assert got.dtype == np.float64


def test_interval_mean_never_reaches_inf_entries():
    """Self pairs and empty slots are +inf in the table; hi <= number of others keeps them out."""
    rng = np.random.default_rng(1)
    d = rng.random((4, 5, 9)).astype(np.float32)
    d[..., 3] = np.inf
    lo, hi = interval_bounds(8, (0.0, 1.0))
    assert np.isfinite(interval_mean(d, lo, hi)).all()


@pytest.mark.parametrize("la, lb", [(9, 9), (25, 25)])
def test_pair_min_distances_vs_brute_force(la, lb):
    rng = np.random.default_rng(la)
    za, zb = unit(rng, la, 16), unit(rng, lb, 16)
    full = np.sqrt(((za[:, None].astype(np.float64) - zb[None]) ** 2).sum(-1))
    a_to_b, b_to_a = pair_min_distances(za, zb)
    assert a_to_b.shape == (la,) and b_to_a.shape == (lb,)
    np.testing.assert_allclose(a_to_b, full.min(axis=1), rtol=1e-6)
    np.testing.assert_allclose(b_to_a, full.min(axis=0), rtol=1e-6)


def test_pair_min_distances_exact_for_tiny_distances():
    """d = sqrt(2 - 2 a.b) in float32 would be off by ~1e-2 relative at d ~ 1e-3."""
    rng = np.random.default_rng(2)
    za = unit(rng, 8, 768)
    zb = za + 1e-3 * rng.standard_normal(za.shape).astype(np.float32) / np.sqrt(768)
    zb /= np.linalg.norm(zb, axis=1, keepdims=True)
    full = np.sqrt(((za[:, None].astype(np.float64) - zb[None]) ** 2).sum(-1))
    a_to_b, _ = pair_min_distances(za, zb)
    np.testing.assert_allclose(a_to_b, full.min(axis=1), rtol=1e-5)


@pytest.mark.parametrize("n, L, c", [(2, 4, 8), (3, 9, 8), (7, 16, 12), (13, 9, 24)])
def test_msm_vs_brute_force(n, L, c):
    rng = np.random.default_rng(n)
    z = unit(rng, n, L, c)
    np.testing.assert_allclose(msm(z), brute_msm(z), rtol=1e-5, atol=1e-7)


def test_msm_small_distances_are_exact():
    """Near-duplicate images (d ~ 0.01): the exact recompute keeps ~1e-6 relative error."""
    rng = np.random.default_rng(3)
    base = rng.standard_normal((1, 16, 256))
    z = base + 0.01 * rng.standard_normal((9, 16, 256))
    z = (z / np.linalg.norm(z, axis=2, keepdims=True)).astype(np.float32)
    ref = brute_msm(z)
    assert ref.max() < 0.05
    np.testing.assert_allclose(msm(z), ref, rtol=2e-6)


@pytest.mark.parametrize("budget", [1, 2_000, 4_000, 20_000])
def test_msm_chunked_under_tiny_budget_equals_unchunked(budget):
    """Owner blocks and 1-image groups (tiny budget) give the same numbers as one big block."""
    rng = np.random.default_rng(4)
    z = unit(rng, 11, 9, 16)
    full = msm(z)
    np.testing.assert_allclose(msm(z, mem_budget_bytes=budget), full, rtol=1e-6, atol=1e-7)


def test_tiny_budget_really_splits_owner_blocks(monkeypatch):
    """The tiny-budget test above must exercise the owner-block path, not one block."""
    calls = []
    real = msm_mod._score_owner_block
    monkeypatch.setattr(msm_mod, "_score_owner_block", lambda *a, **k: calls.append(a[2:4]) or real(*a, **k))
    rng = np.random.default_rng(5)
    msm(unit(rng, 11, 9, 16), mem_budget_bytes=2_000)
    assert len(calls) > 1
    calls.clear()
    msm(unit(rng, 11, 9, 16))
    assert calls == [(0, 11)]


@pytest.mark.parametrize("budget", [1 << 20, 8 << 20, 1 << 30])
def test_msm_group_sizes_follow_budget(budget):
    """Blocks fit the budget, except that a column group never has fewer images than its row group
    (then the row group's self pairs all lie in its first, diagonal, block)."""
    bi, bj = msm_mod.group_sizes(100, 196, budget)
    assert bj >= bi >= 1
    assert bi * bj * msm_mod.pair_block_bytes(196) <= max(budget, bi * bi * msm_mod.pair_block_bytes(196))


def test_msm_float16_input_is_renormalised():
    """float16 rounding moves unit vectors off the sphere by ~1e-3; msm puts them back."""
    rng = np.random.default_rng(6)
    z16 = unit(rng, 6, 9, 16).astype(np.float16)
    z32 = z16.astype(np.float32)
    z32 /= np.linalg.norm(z32, axis=2, keepdims=True)
    np.testing.assert_allclose(msm(z16), brute_msm(z32), rtol=1e-5)


def test_msm_rejects_non_unit_vectors():
    z = np.full((3, 4, 8), 0.5, np.float32)
    with pytest.raises(InputError, match="unit vectors"):
        msm(z)


def test_msm_rejects_single_image():
    with pytest.raises(InputError, match="at least 2 images"):
        msm(np.ones((1, 4, 3), np.float32) / np.sqrt(3))


@pytest.mark.parametrize("noise", [1.0, 0.01])
def test_pair_min_distances_equal_msm_of_a_pair(noise):
    """With N = 2, MSM is exactly the pair's two nearest-patch distance vectors."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((1, 25, 64))
    z = base + noise * rng.standard_normal((2, 25, 64))
    z = (z / np.linalg.norm(z, axis=2, keepdims=True)).astype(np.float32)
    a_to_b, b_to_a = pair_min_distances(z[0], z[1])
    out = msm(z)
    np.testing.assert_allclose(out[0], a_to_b, rtol=1e-6)
    np.testing.assert_allclose(out[1], b_to_a, rtol=1e-6)
