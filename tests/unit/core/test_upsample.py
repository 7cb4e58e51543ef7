"""Map upsampling (MUSC_SPEC 4): bilinear, align_corners=True, any size, against torch."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.core.scorer import upsample_map


def torch_upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(maps.astype(np.float64))[:, None]
    return F.interpolate(t, size=size, mode="bilinear", align_corners=True)[:, 0].numpy()


@pytest.mark.parametrize("g, size", [(6, (224, 224)), (14, (480, 640)), (28, (313, 97)), (5, (5, 5)), (7, (3, 2)), (4, (1, 9))])
def test_upsample_matches_torch(g, size):
    rng = np.random.default_rng(g)
    maps = rng.random((3, g, g))
    ours = upsample_map(maps, size)
    assert ours.shape == (3, *size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, torch_upsample(maps, size), rtol=1e-5, atol=1e-6)


def test_upsample_single_map_and_corners():
    m = np.arange(16, dtype=np.float64).reshape(4, 4)
    up = upsample_map(m, (10, 7))
    assert up.shape == (10, 7)
    # align_corners=True keeps the four corner values exactly.
    assert (up[0, 0], up[0, -1], up[-1, 0], up[-1, -1]) == (0, 3, 12, 15)
    assert up.max() == m.max()  # the raw image score is the same before or after upsampling


@pytest.mark.parametrize("bad", [(0, 5), (-1, 3), "big", (3,)])
def test_upsample_rejects_bad_size(bad):
    with pytest.raises(InputError, match="size"):
        upsample_map(np.zeros((4, 4)), bad)


def test_upsample_rejects_bad_shape():
    with pytest.raises(InputError, match="maps must be"):
        upsample_map(np.zeros(4), (8, 8))
