"""Parity with the authors' released code on every shared fixture (MUSC_SPEC 2-5).

Every array the fixture holds (per-(r, layer) MSM, patch maps, raw and RsCIN image scores) must
match with ``numpy.allclose(rtol=1e-4, atol=1e-6)``.
"""

from __future__ import annotations

import numpy as np
import pytest

import musc_edge
from musc_edge.core.lnamd import lnamd
from musc_edge.core.msm import msm

RTOL, ATOL = 1e-4, 1e-6
FIXTURE_NAMES = ["musc_parity_small.npz", "musc_parity_k123_n20.npz", "musc_parity_effnet_mtd.npz"]


def load_fixture(fixtures_dir, name: str) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / name) as data:
        return {k: data[k] for k in data.files}


def fixture_params(fx: dict) -> musc_edge.MuscParams:
    return musc_edge.MuscParams(tuple(int(r) for r in fx["r_list"]), (0.0, float(fx["interval_max"])),
                                tuple(int(k) for k in fx["k_list"]))


def layer_count(fx: dict) -> int:
    return sum(1 for k in fx if k.startswith("tokens_"))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_msm_per_r_and_layer(fixtures_dir, name):
    fx = load_fixture(fixtures_dir, name)
    interval = (0.0, float(fx["interval_max"]))
    checked = 0
    for r in fx["r_list"]:
        for layer in range(layer_count(fx)):
            ours = msm(lnamd(fx[f"tokens_{layer}"], int(r)), interval)
            ref = fx[f"msm_r{int(r)}_l{layer}"]
            np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL, err_msg=f"{name} r={r} layer={layer}")
            checked += 1
    assert checked == len(fx["r_list"]) * layer_count(fx)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_score_tokens_matches_fixture(fixtures_dir, name):
    fx = load_fixture(fixtures_dir, name)
    tokens = [fx[f"tokens_{i}"] for i in range(layer_count(fx))]
    scores = musc_edge.score_tokens(
        tokens,
        fx["cls"],
        params=fixture_params(fx),
    )
    assert isinstance(scores, musc_edge.Scores)
    for key in ("patch_maps", "image_scores_raw", "image_scores"):
        ours = getattr(scores, key)
        assert ours.shape == fx[key].shape and ours.dtype == np.float64, key
        np.testing.assert_allclose(ours, fx[key], rtol=RTOL, atol=ATOL, err_msg=f"{name} {key}")


def test_effnet_fixture_is_float16(fixtures_dir):
    """The float16 path is really exercised by the parity tests above."""
    fx = load_fixture(fixtures_dir, "musc_parity_effnet_mtd.npz")
    assert fx["tokens_0"].dtype == np.float16


def test_without_embeddings_image_scores_equal_raw(fixtures_dir):
    fx = load_fixture(fixtures_dir, "musc_parity_small.npz")
    scores = musc_edge.score_tokens([fx[f"tokens_{i}"] for i in range(layer_count(fx))])
    np.testing.assert_allclose(scores.image_scores_raw, fx["image_scores_raw"], rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(scores.image_scores, scores.image_scores_raw)
