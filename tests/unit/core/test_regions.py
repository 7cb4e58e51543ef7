"""8-connected region labelling in numpy equals OpenCV's (and so skimage's, the authors')."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from musc_edge.core.regions import label_regions, positive_regions


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Two label images describe the same regions (numbering aside)."""
    if ((a == 0) != (b == 0)).any():
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == pairs.shape[1] == len(np.unique(pairs[1]))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("density", [0.05, 0.3, 0.55, 0.8])
def test_equals_opencv_on_random_masks(seed, density):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < density
    n_cv, lab_cv = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    n, lab = label_regions(mask)
    assert n == n_cv
    assert same_partition(lab, lab_cv)


@pytest.mark.parametrize("case, regions", [
    ([[1, 0], [0, 1]], 1),           # diagonal neighbours join (8-connectivity)
    ([[1, 0, 1]], 2),
    ([[1, 1, 1], [0, 0, 0], [1, 1, 1]], 2),
    ([[1, 0, 1], [1, 0, 1], [1, 1, 1]], 1),  # a U: joined at the bottom only
    ([[0, 0], [0, 0]], 0),
])
def test_small_cases(case, regions):
    k, ids = positive_regions(np.array(case, bool))
    assert k == regions and len(ids) == int(np.sum(case))


def test_spiral_needs_many_propagation_steps():
    """A long snake region: one component however the runs are ordered."""
    mask = np.zeros((41, 41), bool)
    mask[::4, 1:-1] = True
    mask[1::4, -2] = mask[2::4, -2] = mask[3::4, 1] = True
    mask[3::8, 1] = False
    mask[3::8, -2] = True
    n_cv, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    assert label_regions(mask)[0] == n_cv
