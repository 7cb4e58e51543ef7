"""RsCIN (MUSC_SPEC 5) against a transcription of the spec, and its edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.core.rscin import rscin


def spec_rscin(s, e, k_list):
    s = np.asarray(s, np.float64)
    s = (s - s.min()) / (s.max() - s.min())
    w = e.astype(np.float64) @ e.T.astype(np.float64)
    outs = []
    for k in k_list:
        res = np.empty(len(s))
        for i in range(len(s)):
            keep = np.argsort(-w[i])[:k]
            res[i] = (w[i, keep] * s[keep]).sum() / w[i, keep].sum()
        outs.append(res)
    return np.mean(outs, axis=0)


def unit_rows(rng, n, d):
    e = rng.standard_normal((n, d)) + 2.0  # mostly positive similarities, like CLIP embeddings
    return e / np.linalg.norm(e, axis=1, keepdims=True)


@pytest.mark.parametrize("k_list", [(1, 2, 3), (1, 8, 9), (2,)])
def test_rscin_matches_spec(k_list):
    rng = np.random.default_rng(0)
    s, e = rng.random(12), unit_rows(rng, 12, 8)
    np.testing.assert_allclose(rscin(s, e, k_list), spec_rscin(s, e, k_list), rtol=1e-12)


def test_rscin_k1_is_normalised_score():
    rng = np.random.default_rng(1)
    s, e = rng.random(7) * 5 + 1, unit_rows(rng, 7, 4)
    np.testing.assert_allclose(rscin(s, e, (1,)), (s - s.min()) / (s.max() - s.min()))


def test_rscin_all_equal_scores_no_nan():
    rng = np.random.default_rng(2)
    out = rscin(np.full(5, 0.7), unit_rows(rng, 5, 4), (1, 2, 3))
    assert np.all(np.isfinite(out)) and np.all(out == 0.0)


def test_rscin_k_larger_than_n_is_clipped():
    rng = np.random.default_rng(3)
    s, e = rng.random(3), unit_rows(rng, 3, 4)
    np.testing.assert_allclose(rscin(s, e, (1, 8, 9)), spec_rscin(s, e, (1, 3, 3)), rtol=1e-12)


def test_rscin_rejects_mismatched_embeddings():
    with pytest.raises(InputError, match="embeddings must be"):
        rscin(np.zeros(4), np.zeros((3, 2)))


def test_rscin_rejects_bad_k():
    with pytest.raises(InputError, match="k_list"):
        rscin(np.arange(3.0), np.eye(3), (0,))
