"""Frozen data types passed between the core scorer, the runtime and the tools."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Scores:
    """Output of :func:`musc_edge.score_tokens` (MUSC_SPEC 3-5).

    patch_maps: (N, G, G) float64, mean MSM score over layers and r.
    image_scores_raw: (N,) float64, max of each patch map.
    image_scores: (N,) float64, after RsCIN (equal to the raw scores without embeddings).
    """

    patch_maps: np.ndarray
    image_scores_raw: np.ndarray
    image_scores: np.ndarray


@dataclass(frozen=True)
class Features:
    """What a backbone returns for a batch: one token array per tapped layer plus embeddings.

    tokens: tuple of (B, 1 + G*G, C_l) arrays (token 0 is CLS, zeros for CNNs).
    embedding: (B, D) L2-normalised image embeddings.
    """

    tokens: tuple[np.ndarray, ...]
    embedding: np.ndarray

    def __len__(self) -> int:
        return int(self.embedding.shape[0])
