"""RsCIN: re-scoring with a constrained image-level neighbourhood (MUSC_SPEC 5).

An image's raw score is smoothed with the scores of the images whose embeddings are most similar
to it: for each k in ``k_list`` keep the k largest cosine similarities of its row (itself
included) and take the similarity-weighted mean of the min-max normalised scores; the final score
is the mean over the k values. This damps a single noisy image score using its look-alikes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .errors import InputError
from .params import DEFAULT_K


def normalise_scores(scores: np.ndarray) -> np.ndarray:
    """Min-max normalise to [0, 1]; all-equal scores give zeros, never NaN (MUSC_SPEC 5)."""
    s = np.asarray(scores, dtype=np.float64)
    lo, hi = float(s.min()), float(s.max())
    if not hi > lo:
        return np.zeros_like(s)
    return (s - lo) / (hi - lo)


def rscin(scores: np.ndarray, embeddings: np.ndarray, k_list: Sequence[int] = DEFAULT_K) -> np.ndarray:
    """RsCIN image scores (MUSC_SPEC 5).

    scores: (N,) raw image scores (max of each patch map).
    embeddings: (N, D) L2-normalised image embeddings (CLIP image embedding for ViTs).
    k_list: neighbourhood sizes; a k larger than N is clipped to N. [1, 2, 3] for MVTec-like sets,
    [1, 8, 9] for VisA-like sets.
    Returns (N,) float64.
    """
    s = np.asarray(scores, dtype=np.float64)
    e = np.asarray(embeddings, dtype=np.float64)
    if s.ndim != 1:
        raise InputError(f"RsCIN scores must be (N,), got shape {s.shape}")
    n = s.shape[0]
    if e.ndim != 2 or e.shape[0] != n:
        raise InputError(f"embeddings must be (N, D) with N = {n} (one per image), got shape {e.shape}")
    if n == 0:
        raise InputError("RsCIN needs at least one image score")
    ks = [int(k) for k in k_list]
    if not ks or min(ks) < 1:
        raise InputError(f"k_list must hold integers >= 1, got {list(k_list)}")

    s_norm = normalise_scores(s)
    w = e @ e.T
    order = np.argsort(-w, axis=1, kind="stable")  # largest similarities first
    rows = np.arange(n)[:, None]
    finals = []
    for k in ks:
        kk = min(k, n)
        kept = order[:, :kk]
        wk = w[rows, kept]  # (N, kk)
        num = (wk * s_norm[kept]).sum(axis=1)
        den = wk.sum(axis=1)
        # den == 0 would need cancelling negative similarities; fall back to the image itself.
        safe = np.abs(den) > 1e-12
        finals.append(np.where(safe, num / np.where(safe, den, 1.0), s_norm))
    return np.mean(finals, axis=0)
