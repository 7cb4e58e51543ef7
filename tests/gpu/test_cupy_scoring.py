"""Mutual scoring on the GPU (CuPy): the same numbers as the CPU, every fixture, every path.

Skipped cleanly (not failed) without CuPy or without a CUDA device; run with
``python -m pytest -q -m gpu tests/gpu``. Speed lives in ``benchmarks/bench_msm.py --device cuda``
and ``benchmarks/bench_stream.py --device cuda``.
"""

from __future__ import annotations

import numpy as np
import pytest

import musc_edge
from musc_edge.core.params import MuscParams

pytestmark = pytest.mark.gpu
RTOL, ATOL = 1e-4, 1e-6
FIXTURES = ["musc_parity_small.npz", "musc_parity_k123_n20.npz", "musc_parity_effnet_mtd.npz"]


@pytest.fixture(scope="module")
def cuda():
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed (pip install 'musc-edge[cuda]')")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy sees no CUDA device")
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError without a driver
        pytest.skip(f"no usable CUDA device: {e}")
    from musc_edge.core.device import resolve_device

    return resolve_device("cuda", "exact")


def load(fixtures_dir, name):
    with np.load(fixtures_dir / name) as data:
        return {k: data[k] for k in data.files}


def params_of(fx):
    return MuscParams(tuple(int(r) for r in fx["r_list"]), (0.0, float(fx["interval_max"])),
                      tuple(int(k) for k in fx["k_list"]))


def test_fp32_products_are_not_tf32(cuda):
    """exact pins FP32: a product's error against float64 is FP32's (~1e-7), not TF32's (~1e-4)."""
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((512, 768)), rng.standard_normal((768, 512))
    ref = a @ b
    got = cuda.to_host(cuda.asarray(a, dtype=cuda.xp.float32) @ cuda.asarray(b, dtype=cuda.xp.float32))
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-5, f"relative error {rel:.2e}: TF32 products?"


@pytest.mark.parametrize("name", FIXTURES)
def test_fixtures_on_the_gpu(cuda, fixtures_dir, name):
    """score_tokens(device='cuda') gives the authors' numbers (maps, raw and RsCIN scores)."""
    fx = load(fixtures_dir, name)
    tokens = [fx[k] for k in sorted(k for k in fx if k.startswith("tokens_"))]
    s = musc_edge.score_tokens(tokens, fx["cls"], params=params_of(fx), device=cuda)
    assert isinstance(s.patch_maps, np.ndarray)  # only the results come back, as numpy
    for key in ("patch_maps", "image_scores_raw", "image_scores"):
        np.testing.assert_allclose(getattr(s, key), fx[key], rtol=RTOL, atol=ATOL, err_msg=f"{name} {key}")


@pytest.mark.parametrize("name", FIXTURES)
def test_msm_per_r_and_layer_on_the_gpu(cuda, fixtures_dir, name):
    from musc_edge.core.lnamd import lnamd
    from musc_edge.core.msm import msm

    fx = load(fixtures_dir, name)
    for r in fx["r_list"]:
        for layer in range(sum(k.startswith("tokens_") for k in fx)):
            out = msm(lnamd(cuda.asarray(fx[f"tokens_{layer}"]), int(r)), (0.0, float(fx["interval_max"])))
            np.testing.assert_allclose(cuda.to_host(out), fx[f"msm_r{int(r)}_l{layer}"], rtol=RTOL, atol=ATOL)


def test_owner_blocks_under_a_tiny_budget_on_the_gpu(cuda, fixtures_dir):
    """The batch MSM chunked into owner blocks (a budget far under the table) gives the same."""
    from musc_edge.core.lnamd import lnamd
    from musc_edge.core.msm import msm

    fx = load(fixtures_dir, "musc_parity_k123_n20.npz")
    z = lnamd(cuda.asarray(fx["tokens_0"]), 3)
    full = cuda.to_host(msm(z))
    np.testing.assert_allclose(cuda.to_host(msm(z, mem_budget_bytes=20_000)), full, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(full, fx["msm_r3_l0"], rtol=RTOL, atol=ATOL)


def test_block_minima_gpu_equals_cpu(cuda):
    from musc_edge.core.pairs import block_minima

    rng = np.random.default_rng(1)
    z = rng.standard_normal((9, 49, 64)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    z[5, 3] = z[1, 7]  # an exact match: distance 0, taken exactly
    for diagonal, (zi, zj) in ((True, (z[:4], z[:9])), (False, (z[:4], z[4:]))):
        r_cpu, c_cpu = block_minima(zi, zj, diagonal=diagonal)
        r_gpu, c_gpu = block_minima(cuda.asarray(zi), cuda.asarray(zj), diagonal=diagonal)
        np.testing.assert_allclose(cuda.to_host(r_gpu), r_cpu, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(cuda.to_host(c_gpu), c_cpu, rtol=1e-6, atol=1e-7)


def test_rolling_pool_on_the_gpu_equals_batch(cuda):
    """The window's features and distance table on the device: adds, evictions, the same maps."""
    from musc_edge.core.window import PoolWindow

    rng = np.random.default_rng(2)
    g, dims, emb_dim = 4, (8, 12), 6
    params = MuscParams(r_list=(1, 3))

    def image():
        t = [(np.sin(np.arange(17 * c).reshape(17, c)) + 0.7 * rng.standard_normal((17, c))).astype(np.float32)
             for c in dims]
        e = rng.standard_normal(emb_dim)
        return t, (e / np.linalg.norm(e)).astype(np.float32)

    pool = PoolWindow(g, dims, emb_dim, slots=6, params=params, device=cuda)
    assert "cupy" in type(pool._d).__module__
    images, seq = {}, 0
    for step in range(25):
        if len(pool) == pool.slots or (len(pool) > 2 and step % 3 == 0):
            victim = pool.seqs[step % len(pool)]
            pool.evict(victim)
            del images[victim]
        images[seq] = image()
        pool.add(pool.prepare(seq, *images[seq]))
        seq += 1
        if len(pool) >= 2:
            seqs, maps, raw, final = pool.score_all()
            ref = musc_edge.score_tokens([np.stack([images[s][0][layer] for s in seqs]) for layer in range(2)],
                                         np.stack([images[s][1] for s in seqs]), params=params)
            np.testing.assert_allclose(maps, ref.patch_maps, rtol=0, atol=1e-5)
            np.testing.assert_allclose(final, ref.image_scores, rtol=0, atol=1e-5)
    entry = pool.prepare(seq, *image()).to_host()
    assert isinstance(entry.d_out, np.ndarray) and entry.z is None  # what the journal stores


def test_fast_precision_keeps_the_ranking(fixtures_dir):
    """fast: FP16 tensor-core products choose the patch, FP32 distances; maps within 1%."""
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    from musc_edge.core.device import resolve_device

    try:
        fast = resolve_device("cuda", "fast")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no usable CUDA device: {e}")
    fx = load(fixtures_dir, "musc_parity_effnet_mtd.npz")
    tokens = [fx[k] for k in sorted(k for k in fx if k.startswith("tokens_"))]
    s = musc_edge.score_tokens(tokens, fx["cls"], params=params_of(fx), device=fast)
    np.testing.assert_allclose(s.patch_maps, fx["patch_maps"], rtol=1e-2, atol=1e-4)
    assert np.all(s.patch_maps >= fx["patch_maps"] - 1e-4)  # a chosen patch is never nearer than the nearest
    assert cupy is not None


@pytest.mark.parametrize("radius", [0, 2])
def test_positional_matching_on_the_gpu_equals_cpu(cuda, radius):
    """--match-radius: the positional kernel (batched products over grid positions) on CuPy."""
    from musc_edge.core.msm import msm

    rng = np.random.default_rng(radius)
    z = rng.standard_normal((12, 49, 32)).astype(np.float32)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    got = cuda.to_host(msm(cuda.asarray(z), radius=radius))
    np.testing.assert_allclose(got, msm(z, radius=radius), rtol=RTOL, atol=ATOL)


def test_exclude_and_valid_on_the_gpu_equal_cpu(cuda, fixtures_dir):
    """score_tokens' exclude (repeated defects, tiles of one image) and valid (padding) on CuPy."""
    fx = load(fixtures_dir, "musc_parity_small.npz")
    tokens = [fx[k] for k in sorted(k for k in fx if k.startswith("tokens_"))] or [fx["tokens"]]
    n, g2 = tokens[0].shape[0], tokens[0].shape[1] - 1
    exclude = np.zeros((n, n), bool)
    exclude[0, 1] = exclude[1, 0] = exclude[2, 3] = True
    valid = np.ones((n, g2), bool)
    valid[:, :3] = False
    kw = dict(params=params_of(fx), exclude=exclude, valid=valid)
    cpu = musc_edge.score_tokens(tokens, fx["cls"], **kw)
    gpu = musc_edge.score_tokens(tokens, fx["cls"], device=cuda, **kw)
    np.testing.assert_allclose(gpu.patch_maps, cpu.patch_maps, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(gpu.image_scores, cpu.image_scores, rtol=RTOL, atol=ATOL)
