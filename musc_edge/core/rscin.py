"""RsCIN: re-scoring with a constrained image-level neighbourhood (MUSC_SPEC 5).

An image's raw score is smoothed with the scores of the images whose embeddings are most similar
to it: for each k in ``k_list`` keep the k largest cosine similarities of its row (itself
included) and take the similarity-weighted mean of the min-max normalised scores; the final score
is the mean over the k values. This damps a single noisy image score using its look-alikes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .errors import InputError
from .params import DEFAULT_K


def normalise_scores(scores: Any) -> Any:
    """Min-max normalise to [0, 1]; all-equal scores give zeros, never NaN (MUSC_SPEC 5)."""
    xp = array_namespace(scores)
    s = xp.astype(scores, xp.float64)
    lo, hi = float(xp.min(s)), float(xp.max(s))
    if not hi > lo:
        return xp.zeros_like(s)
    return (s - lo) / (hi - lo)


def rscin(scores: Any, embeddings: Any, k_list: Sequence[int] = DEFAULT_K) -> Any:
    """RsCIN image scores (MUSC_SPEC 5).

    scores: (N,) raw image scores (max of each patch map).
    embeddings: (N, D) L2-normalised image embeddings (CLIP image embedding for ViTs).
    k_list: neighbourhood sizes; a k larger than N is clipped to N. [1, 2, 3] for MVTec-like sets,
    [1, 8, 9] for VisA-like sets.
    Arrays of any array API namespace (both of the same); returns (N,) float64 of it.
    """
    if isinstance(scores, (list, tuple)) or isinstance(embeddings, (list, tuple)):
        scores, embeddings = np.asarray(scores), np.asarray(embeddings)
    xp = array_namespace(scores, embeddings)
    s = xp.astype(scores, xp.float64)
    e = xp.astype(embeddings, xp.float64)
    if s.ndim != 1:
        raise InputError(f"RsCIN scores must be (N,), got shape {tuple(s.shape)}")
    n = s.shape[0]
    if e.ndim != 2 or e.shape[0] != n:
        raise InputError(f"embeddings must be (N, D) with N = {n} (one per image), got shape {tuple(e.shape)}")
    if n == 0:
        raise InputError("RsCIN needs at least one image score")
    ks = [int(k) for k in k_list]
    if not ks or min(ks) < 1:
        raise InputError(f"k_list must hold integers >= 1, got {list(k_list)}")

    s_norm = normalise_scores(s)
    w = e @ xp.matrix_transpose(e)
    order = xp.argsort(w, axis=1, descending=True, stable=True)  # largest similarities first
    finals = []
    for k in ks:
        kk = min(k, n)
        kept = order[:, :kk]  # (N, kk)
        wk = xp.take_along_axis(w, kept, axis=1)
        num = xp.sum(wk * xp.reshape(xp.take(s_norm, xp.reshape(kept, (-1,)), axis=0), kept.shape), axis=1)
        den = xp.sum(wk, axis=1)
        # den == 0 would need cancelling negative similarities; fall back to the image itself.
        safe = xp.abs(den) > 1e-12
        finals.append(xp.where(safe, num / xp.where(safe, den, xp.ones_like(den)), s_norm))
    return xp.mean(xp.stack(finals), axis=0)
