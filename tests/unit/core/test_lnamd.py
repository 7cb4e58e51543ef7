"""LNAMD (MUSC_SPEC 2) against a direct torch transcription of the spec."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.core.lnamd import lnamd, patch_grid


def torch_lnamd(tokens: np.ndarray, r: int) -> np.ndarray:
    """Spec 2 with torch ops: layer_norm over (C, G, G), avg_pool2d(count_include_pad), normalize."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(tokens[:, 1:, :].astype(np.float64))
    n, L, c = t.shape
    g = int(round(L**0.5))
    x = t.reshape(n, g, g, c).permute(0, 3, 1, 2)  # (N, C, G, G)
    x = F.layer_norm(x, x.shape[1:], eps=1e-5)
    if r > 1:
        x = F.avg_pool2d(x, r, stride=1, padding=r // 2, count_include_pad=True)
    x = x.permute(0, 2, 3, 1).reshape(n, L, c)
    return F.normalize(x, dim=-1).numpy()


@pytest.mark.parametrize("r", [1, 3, 5, 7])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_lnamd_matches_torch_transcription(r, dtype):
    rng = np.random.default_rng(r)
    tokens = (3.0 * rng.standard_normal((3, 1 + 6 * 6, 10)) + 1.5).astype(dtype)
    ours = lnamd(tokens, r)
    assert ours.shape == (3, 36, 10) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_lnamd(tokens, r), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(ours, axis=2), 1.0, rtol=1e-6)


def test_lnamd_drops_cls():
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((2, 1 + 16, 5)).astype(np.float32)
    changed = tokens.copy()
    changed[:, 0] = 1e6
    np.testing.assert_array_equal(lnamd(tokens, 3), lnamd(changed, 3))


@pytest.mark.parametrize("t, g", [(2, 1), (37, 6), (197, 14), (785, 28), (1370, 37)])
def test_patch_grid(t, g):
    assert patch_grid(t) == g


@pytest.mark.parametrize("t", [0, 1, 36, 196, 51])
def test_patch_grid_names_the_count(t):
    with pytest.raises(InputError, match=f"token count {t} is not 1 \\+ G\\*G"):
        patch_grid(t)


@pytest.mark.parametrize("r", [0, 2, -1])
def test_lnamd_rejects_bad_r(r):
    with pytest.raises(InputError, match="odd"):
        lnamd(np.zeros((2, 5, 3), np.float32), r)


def test_lnamd_rejects_non_square_tokens():
    with pytest.raises(InputError, match="token count 51"):
        lnamd(np.zeros((2, 51, 3), np.float32), 1)
