"""TensorRT engine runner: ``tensorrt`` and ``cuda-python`` only (no torch, no pycuda).

A serialized engine runs only on the TensorRT version that built it, so the JSON sidecar written
by ``musc_edge.export.tensorrt.build_engine`` records that version (and CUDA's) and this backend
refuses an engine from another version *before* deserializing it, with a message that says to
rebuild, rather than TensorRT's own log lines and a None engine.

The run loop follows TensorRT 10/11's name-based API: ``set_input_shape`` for the batch (the
engine has one optimization profile, batch 1..B), ``set_tensor_address`` for every I/O tensor,
``execute_async_v3`` on our own CUDA stream, then one synchronize. Device buffers are allocated
once for the profile's largest batch; a larger batch is run in chunks.

This module imports without TensorRT; constructing :class:`TensorRTBackend` without it raises a
:class:`~musc_edge.core.errors.DeviceError` that says what to install.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.core.errors import DeviceError, ModelError
from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.meta import ModelMeta

from .base import Backend

log = logging.getLogger(__name__)

SIDECAR_VERSION_KEY = "tensorrt_version"
CUDA_ERROR_INSUFFICIENT_DRIVER = 35  # cudaErrorInsufficientDriver
INSTALL_HINT = "pip install 'musc-edge[trt]' (tensorrt and cuda-python) on a machine with an NVIDIA GPU"


# ----------------------------------------------------------------------------------- sidecar, versions
def sidecar_file(engine: str | Path) -> Path:
    """The JSON sidecar of an engine: ``model.engine`` -> ``model.engine.json``."""
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def write_sidecar(engine: str | Path, meta: ModelMeta, build: Mapping[str, Any]) -> Path:
    """Write the model metadata plus the build facts (TensorRT/CUDA versions, precision, ...)."""
    data = meta.to_dict()
    clash = sorted(set(data) & set(build))
    if clash:
        raise ValueError(f"build facts overwrite metadata keys: {clash}")
    data.update(build)
    path = sidecar_file(engine)
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_sidecar(engine: str | Path) -> dict[str, Any]:
    """The sidecar of ``engine`` as a dict; ModelError when it is missing or not JSON."""
    path = sidecar_file(engine)
    if not path.is_file():
        raise ModelError(f"{Path(engine).name} has no sidecar {path.name} (model metadata and TensorRT version); "
                         "build the engine with `musc-edge export --format engine`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path} is not readable JSON ({e}); rebuild the engine") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} is not a JSON object; rebuild the engine")
    return data


def version_tuple(version: str) -> tuple[int, ...]:
    """'10.3.0.26' -> (10, 3, 0); non-numeric parts end the tuple ('11.0.0rc1' -> (11, 0))."""
    parts: list[int] = []
    for piece in str(version).split(".")[:3]:
        if not piece.isdigit():
            break
        parts.append(int(piece))
    return tuple(parts)


def check_engine_version(built: str | None, installed: str, engine: str | Path) -> None:
    """Refuse an engine built by another TensorRT release (major.minor.patch must match).

    TensorRT engines are tied to the exact version that built them (unless built
    version-compatible, which we do not do: it disables optimizations); loading another one
    fails deep in ``deserialize_cuda_engine`` with a log line most users never see.
    """
    name = Path(engine).name
    if not built:
        raise ModelError(f"{name}: its sidecar does not say which TensorRT built it; rebuild the engine with "
                         "`musc-edge export --format engine`")
    if version_tuple(built) != version_tuple(installed):
        raise ModelError(f"{name} was built with TensorRT {built}, but TensorRT {installed} is installed; engines "
                         f"only run on the version that built them: rebuild it here with `musc-edge export --format "
                         f"engine` (or install tensorrt=={built})")


# ------------------------------------------------------------------------------------- imports, CUDA
def import_tensorrt():
    """``tensorrt``, or DeviceError saying what to install."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DeviceError(f"TensorRT engines need the tensorrt package ({e.name or e} is not importable): "
                          f"{INSTALL_HINT}; or run the .onnx model with --device cuda/cpu") from None
    return trt


def import_cudart():
    """cuda-python's runtime API module (``cuda.bindings.runtime``, or ``cuda.cudart`` before 12.6)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # type: ignore[no-redef]
        except ImportError as e:
            raise DeviceError(f"TensorRT engines need cuda-python ({e.name or e} is not importable): "
                              f"{INSTALL_HINT}") from None
    return cudart


def cuda_call(result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; DeviceError naming the call when err != 0."""
    err, *values = result if isinstance(result, tuple) else (result,)
    code = int(getattr(err, "value", err))
    if code != 0:
        name = getattr(err, "name", str(err))
        hint = "check the NVIDIA driver and that a GPU is visible (nvidia-smi)"
        if code == CUDA_ERROR_INSUFFICIENT_DRIVER:
            hint = ("no NVIDIA driver, or one older than this cuda-python's CUDA: install cuda-python of the "
                    "driver's CUDA major (nvidia-smi shows it; e.g. 'cuda-python>=12.6,<13' for CUDA 12)")
        raise DeviceError(f"CUDA {what} failed: {name} ({code}); {hint}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def cuda_info(cudart: Any | None = None, device: int = 0) -> dict[str, Any]:
    """CUDA runtime and driver versions and the GPU's name, for the engine sidecar."""
    cudart = cudart or import_cudart()

    def fmt(v: int) -> str:
        return f"{v // 1000}.{(v % 1000) // 10}"

    runtime = cuda_call(cudart.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    driver = cuda_call(cudart.cudaDriverGetVersion(), "cudaDriverGetVersion")
    props = cuda_call(cudart.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\x00") if isinstance(props.name, bytes) else str(props.name)
    return {"cuda_version": fmt(int(runtime)), "cuda_driver_version": fmt(int(driver)), "gpu": name,
            "compute_capability": f"{props.major}.{props.minor}"}


# ------------------------------------------------------------------------------------------- runner
class TensorRTBackend(Backend):
    """A TensorRT engine on one GPU, behind the same interface as the ONNX Runtime backend."""

    def __init__(self, path: str | Path, meta: ModelMeta, *, device_id: int = 0, **_ignored: Any) -> None:
        super().__init__(meta)
        self.path = Path(path)
        self._buffers: dict[str, int] = {}
        self._stream = None
        trt = import_tensorrt()
        cudart = import_cudart()
        self._trt, self._cudart = trt, cudart
        check_engine_version(read_sidecar(self.path).get(SIDECAR_VERSION_KEY), trt.__version__, self.path)
        cuda_call(cudart.cudaSetDevice(device_id), "cudaSetDevice")
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise ModelError(f"TensorRT could not load {self.path.name} (corrupt, or built for another GPU or "
                             "TensorRT); rebuild it with `musc-edge export --format engine`")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [meta.input_name]:
            raise ModelError(f"{self.path.name}: expected one input {meta.input_name!r}, the engine has {inputs}")
        missing = [n for n in meta.output_names if n not in names]
        if missing:
            raise ModelError(f"{self.path.name}: the engine has no output {', '.join(missing)}; rebuild it")
        self.outputs = [n for n in names if n not in inputs]
        self.max_batch = int(self.engine.get_tensor_profile_shape(meta.input_name, 0)[2][0])
        self._dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in names}
        try:
            self._allocate(names)
        except BaseException:
            self.close()  # free what was allocated before the failure
            raise
        self.description = f"tensorrt {trt.__version__}: {self.path.name} (batch 1..{self.max_batch})"

    def _allocate(self, names: list[str]) -> None:
        """One stream, and a device buffer per I/O tensor sized for the profile's largest batch."""
        cudart, s = self._cudart, self.meta.image_size
        self._stream = cuda_call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        # set the largest batch once so the context reports every output's largest size
        if not self.context.set_input_shape(self.meta.input_name, (self.max_batch, 3, s, s)):
            raise ModelError(f"{self.path.name} does not accept its own largest batch {self.max_batch}; rebuild it")
        for n in names:
            shape = tuple(self.context.get_tensor_shape(n))
            nbytes = int(np.prod(shape)) * self._dtypes[n].itemsize
            self._buffers[n] = int(cuda_call(cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes} bytes)"))
            self.context.set_tensor_address(n, self._buffers[n])

    def run(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        parts = [self._run_chunk(batch[i:i + self.max_batch]) for i in range(0, len(batch), self.max_batch)]
        if len(parts) == 1:
            return parts[0]
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

    def _run_chunk(self, x: np.ndarray) -> dict[str, np.ndarray]:
        cudart, name = self._cudart, self.meta.input_name
        x = np.ascontiguousarray(x, dtype=self._dtypes[name])
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if not self.context.set_input_shape(name, x.shape):
            raise ModelError(f"{self.path.name} does not accept a batch of shape {x.shape}")
        cuda_call(cudart.cudaMemcpyAsync(self._buffers[name], x.ctypes.data, x.nbytes, h2d, self._stream),
                  "cudaMemcpyAsync (input)")
        if not self.context.execute_async_v3(int(self._stream)):
            raise DeviceError(f"TensorRT failed to run {self.path.name}; see the TensorRT log above")
        out: dict[str, np.ndarray] = {}
        for n in self.outputs:
            host = np.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtypes[n])
            cuda_call(cudart.cudaMemcpyAsync(host.ctypes.data, self._buffers[n], host.nbytes, d2h, self._stream),
                      f"cudaMemcpyAsync ({n})")
            out[n] = host
        cuda_call(cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return {n: v.astype(np.float32, copy=False) for n, v in out.items()}

    def close(self) -> None:
        cudart = getattr(self, "_cudart", None)
        if cudart is not None:
            for ptr in self._buffers.values():
                cudart.cudaFree(ptr)
            if self._stream is not None:
                cudart.cudaStreamDestroy(self._stream)
        self._buffers, self._stream = {}, None
        self.context = self.engine = None
        super().close()
