"""score_tokens edge cases (issue 2): validation messages, small pools, float16, memory shape."""

from __future__ import annotations

import numpy as np
import pytest

import musc_edge
from musc_edge import MuscParams
from musc_edge.core import msm as msm_mod
from musc_edge.core import scorer
from musc_edge.core.errors import InputError


def tokens(rng, n=6, g=4, c=8, dtype=np.float32):
    return rng.standard_normal((n, 1 + g * g, c)).astype(dtype)


def test_public_names_are_wired():
    assert musc_edge.score_tokens is scorer.score_tokens
    assert musc_edge.upsample_map is scorer.upsample_map
    # musc_edge.msm is the plain function of musc_edge.core.msm (no callable-module trick)
    assert musc_edge.msm is msm_mod.msm


def test_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((6, 5))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    s = musc_edge.score_tokens([tokens(rng), tokens(rng, c=12)], emb)
    assert s.patch_maps.shape == (6, 4, 4) and s.patch_maps.dtype == np.float64
    assert s.image_scores_raw.shape == (6,) and s.image_scores.shape == (6,)
    np.testing.assert_allclose(s.image_scores_raw, s.patch_maps.reshape(6, -1).max(axis=1))
    assert np.all((s.image_scores >= 0) & (s.image_scores <= 1))


def test_mean_over_layers_and_r():
    """The map is the plain mean of MSM over every (layer, r) (MUSC_SPEC 3)."""
    rng = np.random.default_rng(1)
    layers = [tokens(rng), tokens(rng, c=5)]
    from musc_edge.core.lnamd import lnamd

    parts = [msm_mod.msm(lnamd(t, r)) for t in layers for r in (1, 3)]
    s = musc_edge.score_tokens(layers, params=MuscParams(r_list=(1, 3)))
    np.testing.assert_allclose(s.patch_maps.reshape(6, -1), np.mean(parts, axis=0), rtol=1e-12)


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_images_is_an_error(n):
    rng = np.random.default_rng(2)
    with pytest.raises(InputError, match="at least 2 images"):
        musc_edge.score_tokens([tokens(rng, n=n)])


@pytest.mark.parametrize("n", [2, 3, 4])
def test_small_pools_use_one_image_and_are_finite(n):
    rng = np.random.default_rng(n)
    emb = np.abs(rng.standard_normal((n, 3)))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    layer = tokens(rng, n=n)
    s = musc_edge.score_tokens([layer], emb)
    assert np.all(np.isfinite(s.patch_maps)) and np.all(np.isfinite(s.image_scores))
    # k = max(1, floor(0.3 (N - 1))) = 1: each patch's score is its distance to the nearest image.
    from musc_edge.core.lnamd import lnamd

    total = 0
    for r in (1, 3, 5):
        z = lnamd(layer, r).astype(np.float64)
        d = np.sqrt(((z[:, None, :, None] - z[None, :, None, :]) ** 2).sum(-1)).min(-1)  # (N, N, L)
        d[np.arange(n), np.arange(n)] = np.inf
        total = total + d.min(axis=1)
    np.testing.assert_allclose(s.patch_maps.reshape(n, -1), total / 3, rtol=1e-5)


def test_all_equal_scores_no_nan():
    """Identical images give identical (zero-distance) maps: RsCIN must not divide by zero."""
    rng = np.random.default_rng(3)
    one = tokens(rng, n=1)
    emb = np.ones((4, 3)) / np.sqrt(3)
    s = musc_edge.score_tokens([np.repeat(one, 4, axis=0)], emb)
    assert np.all(np.isfinite(s.image_scores))
    np.testing.assert_allclose(s.image_scores, 0.0)
    np.testing.assert_allclose(s.patch_maps, 0.0, atol=1e-6)


def test_float16_matches_float32_of_same_values():
    rng = np.random.default_rng(4)
    t16 = tokens(rng, dtype=np.float16)
    a = musc_edge.score_tokens([t16]).patch_maps
    b = musc_edge.score_tokens([t16.astype(np.float32)]).patch_maps
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_non_square_token_count_names_the_shape():
    with pytest.raises(InputError, match=r"\(3, 51, 8\).*token count 51"):
        musc_edge.score_tokens([np.zeros((3, 51, 8), np.float32)])


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_is_an_error(bad):
    rng = np.random.default_rng(5)
    t = tokens(rng)
    t[2, 3, 1] = bad
    with pytest.raises(InputError, match="NaN or inf"):
        musc_edge.score_tokens([t])


def test_layers_disagreeing_on_n_or_grid():
    rng = np.random.default_rng(6)
    with pytest.raises(InputError, match="disagrees with layer 0"):
        musc_edge.score_tokens([tokens(rng, n=6), tokens(rng, n=5)])
    with pytest.raises(InputError, match="disagrees with layer 0"):
        musc_edge.score_tokens([tokens(rng, g=4), tokens(rng, g=5)])


def test_embeddings_shape_mismatch():
    rng = np.random.default_rng(7)
    with pytest.raises(InputError, match="embeddings must be"):
        musc_edge.score_tokens([tokens(rng)], np.zeros((5, 3)))
    with pytest.raises(InputError, match="embeddings must be"):
        musc_edge.score_tokens([tokens(rng)], np.zeros(6))


def test_bad_containers():
    rng = np.random.default_rng(8)
    with pytest.raises(InputError, match="sequence"):
        musc_edge.score_tokens(tokens(rng))
    with pytest.raises(InputError, match="empty"):
        musc_edge.score_tokens([])
    with pytest.raises(InputError, match=r"\(N, 1 \+ G\*G, C\)"):
        musc_edge.score_tokens([np.zeros((6, 17), np.float32)])
    with pytest.raises(InputError, match="dtype"):
        musc_edge.score_tokens([np.zeros((6, 17, 3), np.int32)])


def test_one_lnamd_array_at_a_time(monkeypatch):
    """Each (layer, r) LNAMD array is scored and dropped before the next one is built."""
    live = []
    real_lnamd, real_msm = scorer.lnamd, scorer.msm

    def fake_lnamd(t, r):
        z = real_lnamd(t, r)
        live.append(z)
        return z

    def fake_msm(z, *a, **k):
        out = real_msm(z, *a, **k)
        live.remove(z)
        return out

    seen = []
    monkeypatch.setattr(scorer, "lnamd", lambda t, r: (seen.append(len(live)), fake_lnamd(t, r))[1])
    monkeypatch.setattr(scorer, "msm", fake_msm)
    rng = np.random.default_rng(9)
    musc_edge.score_tokens([tokens(rng), tokens(rng)])
    assert seen == [0] * 6
