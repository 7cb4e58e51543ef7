"""The core runs on any array API library: ``array-api-strict`` (the standard and nothing else)
gives the authors' numbers, so the same code can run on CuPy or torch (MUSC_SPEC 2-5)."""

from __future__ import annotations

import numpy as np
import pytest

xps = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed (the [dev] extra)")

from musc_edge.core.lnamd import lnamd  # noqa: E402
from musc_edge.core.msm import msm  # noqa: E402
from musc_edge.core.pairs import block_minima, interval_mean  # noqa: E402
from musc_edge.core.rscin import rscin  # noqa: E402

RTOL, ATOL = 1e-4, 1e-6


def load(fixtures_dir, name):
    with np.load(fixtures_dir / name) as data:
        return {k: data[k] for k in data.files}


def host(x) -> np.ndarray:
    return np.asarray(x._array if hasattr(x, "_array") else x)


@pytest.mark.parametrize("name", ["musc_parity_small.npz", "musc_parity_k123_n20.npz", "musc_parity_effnet_mtd.npz"])
def test_fixtures_through_array_api_strict(fixtures_dir, name):
    fx = load(fixtures_dir, name)
    layers = sorted(k for k in fx if k.startswith("tokens_"))
    interval = (0.0, float(fx["interval_max"]))
    total = None
    for li, key in enumerate(layers):
        tokens = xps.asarray(fx[key].astype(np.float32))  # the standard has no float16; the cast is exact
        for r in fx["r_list"]:
            out = msm(lnamd(tokens, int(r)), interval)
            assert type(out).__module__.startswith("array_api_strict")  # never fell back to numpy
            got = host(out)
            np.testing.assert_allclose(got, fx[f"msm_r{int(r)}_l{li}"], rtol=RTOL, atol=ATOL)
            total = got if total is None else total + got
    maps = total / (len(layers) * len(fx["r_list"]))
    np.testing.assert_allclose(maps.reshape(fx["patch_maps"].shape), fx["patch_maps"], rtol=RTOL, atol=ATOL)
    raw = xps.asarray(maps.max(axis=1))
    final = rscin(raw, xps.asarray(fx["cls"]), [int(k) for k in fx["k_list"]])
    np.testing.assert_allclose(host(final), fx["image_scores"], rtol=RTOL, atol=ATOL)


def unit(rng, *shape):
    z = rng.standard_normal(shape).astype(np.float32)
    return z / np.linalg.norm(z, axis=-1, keepdims=True)


@pytest.mark.parametrize("bi, bj", [(3, 3), (2, 5), (4, 1)])
@pytest.mark.parametrize("diagonal", [False, True])
def test_block_minima_strict_equals_numpy(bi, bj, diagonal):
    rng = np.random.default_rng(bi * 10 + bj)
    zj = unit(rng, bj, 9, 16)
    zi = zj[:bi].copy() if diagonal and bi <= bj else unit(rng, bi, 9, 16)
    if diagonal and bi > bj:
        zi = np.concatenate([zj, unit(rng, bi - bj, 9, 16)])
    r_np, c_np = block_minima(zi, zj, diagonal=diagonal)
    r_st, c_st = block_minima(xps.asarray(zi), xps.asarray(zj), diagonal=diagonal, chunk_bytes=600)  # tiny chunks
    np.testing.assert_allclose(host(r_st), r_np, rtol=1e-6)
    np.testing.assert_allclose(host(c_st), c_np, rtol=1e-6)
    if diagonal:
        for a in range(min(bi, bj)):
            assert np.isinf(r_np[a, :, a]).all() and np.isinf(c_np[a, :, a]).all()


def test_fast_precision_only_changes_the_choice_of_patch():
    """``fast`` chooses with FP16 operands; every distance is still an exact distance to some patch
    of the other image, and never below the true minimum."""
    rng = np.random.default_rng(5)
    z = unit(rng, 6, 25, 64)
    exact, _ = block_minima(z[:3], z[3:], precision="exact")
    fast, _ = block_minima(z[:3], z[3:], precision="fast")  # emulated (numpy has float16; the standard has not)
    full = np.sqrt(((z[:3, :, None, None, :].astype(np.float64) - z[None, None, 3:, :, :]) ** 2).sum(-1))  # a m b n
    assert np.all(fast >= full.min(axis=3) - 1e-6)
    np.testing.assert_allclose(fast, exact, rtol=2e-2)


def test_interval_mean_strict_equals_numpy_partition():
    rng = np.random.default_rng(2)
    d = rng.random((5, 7, 11)).astype(np.float32)
    d[..., 4] = np.inf
    np.testing.assert_allclose(host(interval_mean(xps.asarray(d), 1, 4)), interval_mean(d, 1, 4), rtol=1e-12)
