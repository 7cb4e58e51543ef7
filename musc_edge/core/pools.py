"""Pool scorers: what of a pool's features is kept while a backbone produces them, and how the
pool is scored at the end. The one place that decides the memory of offline scoring.

- :class:`BatchPool` (default): keeps every image's tokens (float16, MUSC_SPEC 8: the pool's
  tokens are the memory bound) and scores the whole pool in one call of a *score step*
  (default: batch MuSc, :func:`musc_edge.core.scorer.score_tokens`, MUSC_SPEC 2-5). Memory O(N).
- :class:`StreamPool` (``--window W``): pushes each image into a
  :class:`musc_edge.core.window.CentredStream` as it arrives and keeps only its G x G map and
  scores; at most W images' tokens (plus reference images) are ever held. Memory O(W).

``musc-edge score`` and the calibration report both score through these, so FP32 and INT8 are
compared on exactly the scoring the user runs.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np

from .device import CPU, ScoreDevice
from .meta import ModelMeta
from .params import DEFAULT_PARAMS, MuscParams
from .scorer import score_tokens
from .types import Scores
from .window import CentredStream

#: A score step: (tokens per layer (N, 1 + G*G, C), embeddings (N, D), params, device) -> Scores.
#: One that also takes a ``progress`` keyword is given the pool's progress callback.
ScoreStep = Callable[[Sequence[np.ndarray], np.ndarray, MuscParams, ScoreDevice], Scores]

#: ``progress(done, total)``: how far a pool scorer is (see each scorer for its unit).
Progress = Callable[[int, int], None]


def batch_score_step(tokens: Sequence[np.ndarray], embedding: np.ndarray, params: MuscParams,
                     device: ScoreDevice = CPU, progress: Progress | None = None) -> Scores:
    """Batch MuSc over the whole pool (MUSC_SPEC 2-5): every image scored against all others.

    ``progress`` counts (layer, r) MSM calls (:func:`musc_edge.core.scorer.score_tokens`).
    """
    return score_tokens(list(tokens), embedding, params=params, device=device, progress=progress)


def _takes_progress(step: Callable[..., object]) -> bool:
    """Whether a score step accepts ``progress=``: steps written before it existed keep working."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in parameters)


class PoolScorer(ABC):
    """Takes the pool's features batch by batch as the backbone produces them; scores at the end."""

    #: what ``run.json`` calls this scorer, and where it scores
    name: str = "pool"
    device_name: str = "cpu"

    @abstractmethod
    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """A batch of images: tokens (b, 1 + G*G, C_l) per tapped layer, embeddings (b, D)."""

    @abstractmethod
    def finish(self) -> Scores:
        """Scores of every image added, in the order added."""


class BatchPool(PoolScorer):
    """Batch MuSc: keep every image's tokens (float16) and score the whole pool in one step.

    ``progress`` (optional) is handed to the score step; batch MuSc calls it per (layer, r).
    """

    def __init__(self, meta: ModelMeta, capacity: int, params: MuscParams = DEFAULT_PARAMS,
                 score_step: ScoreStep = batch_score_step, device: ScoreDevice = CPU,
                 progress: Progress | None = None) -> None:
        n_tokens = 1 + meta.grid * meta.grid
        self._tokens = [np.empty((capacity, n_tokens, c), np.float16) for c in meta.token_dims]
        self._embedding = np.empty((capacity, meta.embed_dim), np.float32)
        self._n = 0
        self.params, self.score_step, self.device = params, score_step, device
        self.progress = progress  #: given to the score step in :meth:`finish` if it takes one
        self.device_name = device.name
        self.name = getattr(score_step, "__name__", type(score_step).__name__)

    @property
    def tokens(self) -> list[np.ndarray]:
        """The tokens added so far, (n, 1 + G*G, C_l) float16 per tapped layer."""
        return [t[:self._n] for t in self._tokens]

    @property
    def embedding(self) -> np.ndarray:
        return self._embedding[:self._n]

    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        i, b = self._n, len(embedding)
        for layer, t in enumerate(tokens):
            self._tokens[layer][i:i + b] = t
        self._embedding[i:i + b] = embedding
        self._n += b

    def finish(self) -> Scores:
        extra = {"progress": self.progress} if self.progress is not None and _takes_progress(self.score_step) else {}
        scores = self.score_step(self.tokens, self.embedding, self.params, self.device, **extra)
        self._tokens, self._embedding = [], np.empty((0, self._embedding.shape[1]), np.float32)  # freed
        return scores


class StreamPool(PoolScorer):
    """``--window W``: each image goes into a :class:`musc_edge.core.window.CentredStream` as it comes.

    Tokens are cast to float16 first, as :class:`BatchPool` keeps them, so a folder of at most W
    images gets exactly the scores of batch mode.
    """

    def __init__(self, meta: ModelMeta, window: int, params: MuscParams = DEFAULT_PARAMS, *,
                 mem_budget_bytes: int | None = None, n_references: int = 0, device: ScoreDevice = CPU,
                 progress: Progress | None = None) -> None:
        self.stream = CentredStream(meta.grid, meta.token_dims, meta.embed_dim, window=window, params=params,
                                    mem_budget_bytes=mem_budget_bytes, n_references=n_references, device=device)
        self.name = f"rolling_window_{window}"
        self.device_name = self.stream.device.name
        self.progress = progress  #: ``progress(reported, pushed)`` after every image and at the end

    @property
    def _reported(self) -> int:
        """Images scored so far. :class:`CentredStream` buffers up to one window (scored as one pool
        at the end), then reports image i once ``window // 2`` newer images have arrived."""
        pushed, window = len(self.stream), self.stream.window
        return pushed - window // 2 if pushed > window else 0

    def add_references(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """A batch of known-good images that seed every window (before the first :meth:`add`)."""
        for i in range(len(embedding)):
            self.stream.add_reference([np.asarray(t[i], np.float16) for t in tokens], embedding[i])

    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        half = [np.asarray(t, np.float16) for t in tokens]
        for i in range(len(embedding)):
            self.stream.push([t[i] for t in half], embedding[i])
            if self.progress is not None:
                self.progress(self._reported, len(self.stream))

    def finish(self) -> Scores:
        scores = self.stream.finish()
        if self.progress is not None:
            self.progress(len(scores.image_scores), len(scores.image_scores))
        return scores
