"""8-connected regions of a binary mask, in numpy (AUPRO's ground-truth regions, MUSC_SPEC 6).

The authors label regions with ``skimage.measure.label`` (full connectivity, i.e. 8-connected in
2-D); OpenCV's ``connectedComponents(connectivity=8)`` gives the same regions. The core stays free
of both, so the labelling is done on runs: every row's runs of defect pixels are found with one
vectorised diff, runs of neighbouring rows that touch (8-connectivity: their column spans overlap
or meet diagonally) are joined, and the joins are resolved by label propagation with pointer
jumping. The work is in the number of runs, not of pixels.
"""

from __future__ import annotations

import numpy as np


def _runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, first column, last column) of every run of True pixels, in row-major order."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past its end
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    return rows, starts, ends - 1


def _joins(rows: np.ndarray, starts: np.ndarray, lasts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (a, b) of runs in rows y and y + 1 that touch with 8-connectivity."""
    us, vs = [], []
    bounds = np.searchsorted(rows, np.arange(rows.max() + 2)) if rows.size else np.zeros(1, np.int64)
    for y in range(len(bounds) - 2):
        a0, a1, b0, b1 = bounds[y], bounds[y + 1], bounds[y + 1], bounds[y + 2]
        if a0 == a1 or b0 == b1:
            continue
        # run b (row y+1) touches run a (row y) iff start_b <= last_a + 1 and last_b >= start_a - 1;
        # runs of a row are disjoint and sorted, so the b's of one a form one contiguous range
        lo = b0 + np.searchsorted(lasts[b0:b1], starts[a0:a1] - 1, side="left")
        hi = b0 + np.searchsorted(starts[b0:b1], lasts[a0:a1] + 1, side="right")
        count = np.maximum(hi - lo, 0)
        if not count.any():
            continue
        a_idx = np.repeat(np.arange(a0, a1), count)
        offsets = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
        us.append(a_idx)
        vs.append(np.repeat(lo, count) + offsets)
    if not us:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(us), np.concatenate(vs)


def _resolve(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Smallest run index of each run's component (label propagation with pointer jumping)."""
    label = np.arange(n)
    if u.size == 0:
        return label
    while True:
        m = np.minimum(label[u], label[v])
        before = label.copy()
        np.minimum.at(label, u, m)
        np.minimum.at(label, v, m)
        label = label[label]  # pointer jumping: follow each label to its own label
        label = label[label]
        if np.array_equal(label, before):
            return label


def positive_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(number of regions, region id 0..K-1 of every True pixel in row-major order ``mask[mask]``)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"positive_regions needs a 2-D mask, got shape {mask.shape}")
    rows, starts, lasts = _runs(mask)
    if rows.size == 0:
        return 0, np.empty(0, np.int64)
    root = _resolve(rows.size, *_joins(rows, starts, lasts))
    roots, run_region = np.unique(root, return_inverse=True)
    return int(roots.size), np.repeat(run_region, lasts - starts + 1)


def label_regions(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """(count including background, int32 label image: 0 background, 1..K regions), like OpenCV's
    ``connectedComponents(connectivity=8)`` up to the numbering of the regions."""
    mask = np.asarray(mask, dtype=bool)
    k, ids = positive_regions(mask)
    out = np.zeros(mask.shape, np.int32)
    out[mask] = ids + 1
    return k + 1, out
