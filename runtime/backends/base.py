"""The one interface every inference backend implements, and the checks they all share.

A backend (ONNX Runtime, TensorRT, ...) is a context manager with ``meta``, ``__call__(batch) ->
Features`` and ``close()``. Following Polygraphy's runners, the input is checked once here against
the model's metadata (dtype, rank, channels, size) and the outputs are turned into
:class:`~musc_edge.core.types.Features` and checked here too, so a backend file only has to implement
:meth:`Backend.run`: feed ``batch`` to the model, return its outputs by name.

Contract for a new backend module ``musc_edge.runtime.backends.<name>``: a subclass of
:class:`Backend` whose constructor takes ``(path, meta, **opts)`` (see ``runtime/model.py``, which
picks the class) and whose ``run`` returns at least ``meta.output_names``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

import numpy as np

from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import ModelMeta
from musc_edge.core.types import Features


class Backend(ABC):
    """A loaded model that maps an image batch (B, 3, S, S) float32 to :class:`Features`."""

    #: What runs the model, for logs and run.json (e.g. "onnxruntime: CPUExecutionProvider").
    description: str = ""

    def __init__(self, meta: ModelMeta) -> None:
        self.meta = meta
        self._closed = False

    @abstractmethod
    def run(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        """Run the model on a checked, C-contiguous float32 batch; return outputs by name."""

    def close(self) -> None:
        """Release the model's resources; calling it twice is harmless."""
        self._closed = True

    def __call__(self, batch: np.ndarray) -> Features:
        if self._closed:
            raise ModelError("the model was closed; load it again with load_model")
        batch = check_batch(batch, self.meta)
        return features_from_outputs(self.run(batch), self.meta, batch.shape[0])

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def check_batch(batch: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """Refuse a batch the model cannot take, with a message that says what was expected."""
    s = meta.image_size
    if not isinstance(batch, np.ndarray):
        raise InputError(f"expected a numpy array (B, 3, {s}, {s}) float32, but got {type(batch).__name__}")
    if batch.dtype != np.float32:
        raise InputError(f"expected a float32 batch, but got {batch.dtype}; preprocess images with "
                         "musc_edge.runtime.preprocess.preprocess")
    if batch.ndim != 4 or batch.shape[1:] != (3, s, s) or batch.shape[0] < 1:
        raise InputError(f"expected a batch of shape (B, 3, {s}, {s}) with B >= 1 for this model, "
                         f"but got {batch.shape}")
    return np.ascontiguousarray(batch)


def features_from_outputs(outputs: Mapping[str, np.ndarray], meta: ModelMeta, batch_size: int) -> Features:
    """Pick ``tokens_*`` and ``embedding`` from the outputs and check their shapes against ``meta``."""
    missing = [n for n in meta.output_names if n not in outputs]
    if missing:
        raise ModelError(f"the model returned no {', '.join(missing)}; re-export it with `musc-edge export`")
    n_tokens = 1 + meta.grid * meta.grid
    tokens = []
    for i, dim in enumerate(meta.token_dims):
        t = np.asarray(outputs[f"tokens_{i}"])
        if t.shape != (batch_size, n_tokens, dim):
            raise ModelError(f"output tokens_{i} has shape {t.shape}, but the metadata says "
                             f"({batch_size}, {n_tokens}, {dim}); the model and its metadata disagree")
        tokens.append(t)
    emb = np.asarray(outputs["embedding"])
    if emb.shape != (batch_size, meta.embed_dim):
        raise ModelError(f"output embedding has shape {emb.shape}, but the metadata says "
                         f"({batch_size}, {meta.embed_dim}); the model and its metadata disagree")
    return Features(tokens=tuple(tokens), embedding=emb)
