"""Load an exported backbone: read and check its metadata, pick a backend, return a FeatureExtractor.

``read_meta`` refuses any file that does not carry musc-edge metadata (ONNX ``metadata_props`` or
the JSON sidecar of a TensorRT engine) with one line. ``load_model`` checks the graph's input and
outputs against that metadata once, so a mismatched model fails at load time, not mid-run, and
warns (once per file and process) when the weights are random, since its scores mean nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.core.errors import DeviceError, ModelError
from musc_edge.core.meta import ModelMeta
from musc_edge.core.types import Features

from .backends.base import Backend

log = logging.getLogger(__name__)

ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
_warned_random: set[str] = set()


def read_meta(path: str | Path) -> ModelMeta:
    """The :class:`ModelMeta` of an ONNX model or TensorRT engine; ModelError if it has none."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; export one with `musc-edge export`")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        return _engine_meta(path)
    from .backends.onnxruntime import open_session

    session = open_session(path, optimize=False)
    return _session_meta(session, path)


def _engine_meta(path: Path) -> ModelMeta:
    # The sidecar is written and read in one place, beside the engine runner (importable without TensorRT).
    from .backends.tensorrt import read_sidecar

    return ModelMeta.from_dict(read_sidecar(path), source=str(path))


def _session_meta(session, path: Path) -> ModelMeta:
    props = dict(session.get_modelmeta().custom_metadata_map)
    return ModelMeta.from_props(props, source=str(path))


def check_session(session, meta: ModelMeta, path: str | Path) -> None:
    """Check an ORT session's input and outputs against the metadata (ModelError on mismatch)."""
    inputs = session.get_inputs()
    s = meta.image_size
    if len(inputs) != 1 or inputs[0].name != meta.input_name:
        names = ", ".join(i.name for i in inputs)
        raise ModelError(f"{path}: expected one input {meta.input_name!r}, the graph has [{names}]; "
                         "re-export the model")
    _check_shape(inputs[0].shape, (None, 3, s, s), f"{path}: input {meta.input_name!r}")
    if inputs[0].type != "tensor(float)":
        raise ModelError(f"{path}: input {meta.input_name!r} is {inputs[0].type}, expected tensor(float)")
    outputs = {o.name: o for o in session.get_outputs()}
    missing = [n for n in meta.output_names if n not in outputs]
    if missing:
        raise ModelError(f"{path}: the graph has no output {', '.join(missing)} that its metadata "
                         f"promises (it has {', '.join(outputs)}); re-export the model")
    n_tokens = 1 + meta.grid * meta.grid
    for i, dim in enumerate(meta.token_dims):
        _check_shape(outputs[f"tokens_{i}"].shape, (None, n_tokens, dim), f"{path}: output tokens_{i}")
    _check_shape(outputs["embedding"].shape, (None, meta.embed_dim), f"{path}: output embedding")


def _check_shape(actual, expected: tuple, what: str) -> None:
    """Static dims must match; symbolic (str/None) dims are accepted."""
    if actual is None:
        return
    if len(actual) != len(expected):
        raise ModelError(f"{what} has rank {len(actual)}, expected {len(expected)} ({expected})")
    for a, e in zip(actual, expected):
        if e is not None and isinstance(a, int) and a != e:
            raise ModelError(f"{what} has shape {list(actual)}, but the metadata says {list(expected)}")


class FeatureExtractor:
    """A loaded backbone: ``extractor(batch) -> Features``; use it as a context manager."""

    def __init__(self, backend: Backend, path: str | Path) -> None:
        self.backend = backend
        self.path = Path(path)

    @property
    def meta(self) -> ModelMeta:
        return self.backend.meta

    @property
    def description(self) -> str:
        """What runs the model (backend and providers)."""
        return self.backend.description

    def __call__(self, batch: np.ndarray) -> Features:
        return self.backend(batch)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "FeatureExtractor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_model(path: str | Path, device: str = "auto", **opts: Any) -> FeatureExtractor:
    """Load an ONNX model (ONNX Runtime) or a ``.engine`` (TensorRT) with its metadata checked.

    opts for ONNX Runtime: ``threads`` (intra-op threads, 0 = all cores), ``trt_cache_dir``,
    ``trt_fp16``, ``optimize`` (False: ORT graph optimisations off, e.g. to run a Q/DQ model as
    simulated quantization). Other opts go to the TensorRT backend for engines. An explicit ``cuda``/``tensorrt``
    whose provider ONNX Runtime could not start is a DeviceError, not a silent run on the CPU.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; export one with `musc-edge export`")
    if path.suffix.lower() in ENGINE_SUFFIXES:
        backend = _load_engine(path, device, **opts)
    else:
        backend = _load_onnx(path, device, **opts)
    warn_if_random(backend.meta, path)
    return FeatureExtractor(backend, path)


def _load_onnx(path: Path, device: str, *, threads: int | None = None, trt_cache_dir: str | Path | None = None,
               trt_fp16: bool = False, optimize: bool = True) -> Backend:
    from .backends.onnxruntime import OnnxRuntimeBackend, import_onnxruntime, open_session, resolve_providers

    ort = import_onnxruntime()

    providers = resolve_providers(device, ort.get_available_providers(), trt_cache_dir=trt_cache_dir,
                                  trt_fp16=trt_fp16)
    session = open_session(path, providers, threads=threads, optimize=optimize, device=device)
    meta = _session_meta(session, path)
    check_session(session, meta, path)
    return OnnxRuntimeBackend(path, meta, session)


def _load_engine(path: Path, device: str, **opts: Any) -> Backend:
    if (device or "auto").lower() not in ("auto", "tensorrt", "cuda", "gpu"):
        raise DeviceError(f"{path.name} is a TensorRT engine, which runs only on an NVIDIA GPU; use "
                          "--device auto or tensorrt, or score the .onnx model on the CPU")
    meta = _engine_meta(path)
    try:
        from .backends import tensorrt as trt_backend
    except ImportError as e:
        raise DeviceError(f"running {path.name} needs TensorRT ({e.name or e} is not importable): "
                          "pip install 'musc-edge[trt]', or score the .onnx model instead") from None
    return trt_backend.TensorRTBackend(path, meta, **opts)


def warn_if_random(meta: ModelMeta, path: str | Path) -> None:
    """Warn once per file that a random-weights model gives meaningless scores."""
    key = str(Path(path).resolve())
    if meta.is_random and key not in _warned_random:
        _warned_random.add(key)
        log.warning("%s has random weights (exported with --weights random): its scores mean nothing; "
                    "export with pretrained weights for real use", Path(path).name)
