"""The TensorRT engine runner's own logic, on a simulated device (no GPU needed).

``TensorRTBackend`` is thin glue over TensorRT's name-based API and cuda-python's runtime API:
set the input shape, copy in, ``execute_async_v3``, copy out, chunk batches above the profile,
free everything. That glue is what these tests exercise. ``FakeTensorRT`` models the semantics
the runner relies on (profile bounds, shapes that follow ``set_input_shape``, tensors read from
and written to the addresses given by ``set_tensor_address``, FP16 outputs) and ``FakeCudart``
keeps "device" memory in host numpy buffers, so the copies really move bytes through
raw pointers. Numerical parity of a real engine is tests/gpu/test_tensorrt.py's job.

Where cuda-python is installed but there is no GPU (CI), the calls the runner made on the fake
are replayed against the real ``cuda.bindings.runtime`` to show that their argument types are
ones the real binding accepts, and the runner's CUDA failure path is run for real.
"""

from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from musc_edge.core.errors import DeviceError, ModelError
from musc_edge.core.meta import ModelMeta
from musc_edge.runtime.backends import tensorrt as runner
from musc_edge.runtime.testing import tiny_meta

TRT_VERSION = "10.16.1.11"
OK = types.SimpleNamespace(value=0, name="cudaSuccess")


# ------------------------------------------------------------------------------------ simulated CUDA
class FakeStream:
    """Stands in for cuda-python's ``cudaStream_t`` (an opaque handle that converts with int())."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        return self.handle


class FakeCudart:
    """cuda-python's runtime API over host memory: pointers are real addresses of numpy buffers."""

    cudaMemcpyKind = types.SimpleNamespace(cudaMemcpyHostToDevice="H2D", cudaMemcpyDeviceToHost="D2H")

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail  # name of a call that returns an error instead
        self.memory: dict[int, np.ndarray] = {}
        self.freed: list[int] = []
        self.streams: list[FakeStream] = []
        self.destroyed: list[FakeStream] = []
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _result(self, name: str, args: tuple[Any, ...], *values: Any) -> tuple[Any, ...]:
        self.calls.append((name, args))
        if name == self.fail:
            return (types.SimpleNamespace(value=2, name="cudaErrorMemoryAllocation"),) + (None,) * len(values)
        return (OK,) + values

    def cudaSetDevice(self, device: int):
        return self._result("cudaSetDevice", (device,))

    def cudaStreamCreate(self):
        stream = FakeStream(0x5000 + len(self.streams))
        self.streams.append(stream)
        return self._result("cudaStreamCreate", (), stream)

    def cudaMalloc(self, nbytes: int):
        buf = np.zeros(max(int(nbytes), 1), dtype=np.uint8)
        ptr = buf.ctypes.data
        if self.fail != "cudaMalloc":
            self.memory[ptr] = buf
        return self._result("cudaMalloc", (nbytes,), ptr)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: str, stream: FakeStream):
        device_ptr = dst if kind == "H2D" else src
        buf = self.memory[device_ptr]
        assert count <= buf.nbytes, "copy overruns the device buffer"
        assert isinstance(stream, FakeStream) and stream in self.streams
        ctypes.memmove(dst, src, count)
        return self._result("cudaMemcpyAsync", (dst, src, count, kind, stream))

    def cudaStreamSynchronize(self, stream: FakeStream):
        return self._result("cudaStreamSynchronize", (stream,))

    def cudaFree(self, ptr: int):
        self.freed.append(ptr)
        self.memory.pop(ptr)
        return self._result("cudaFree", (ptr,))

    def cudaStreamDestroy(self, stream: FakeStream):
        self.destroyed.append(stream)
        return self._result("cudaStreamDestroy", (stream,))


# ----------------------------------------------------------------------------- simulated TensorRT
def reference_outputs(x: np.ndarray, meta: ModelMeta) -> dict[str, np.ndarray]:
    """What the simulated engine computes: simple, but every value depends on its own image."""
    b, g = x.shape[0], meta.grid
    per_image = x.reshape(b, -1).mean(axis=1)  # (B,)
    out = {}
    for i, dim in enumerate(meta.token_dims):
        base = np.arange((1 + g * g) * dim, dtype=np.float32).reshape(1 + g * g, dim) / 1000.0
        out[f"tokens_{i}"] = (base[None] + per_image[:, None, None] * (i + 1)).astype(np.float32)
    out["embedding"] = np.repeat(per_image[:, None], meta.embed_dim, axis=1) + np.arange(meta.embed_dim)
    return out


class FakeEngine:
    def __init__(self, meta: ModelMeta, max_batch: int, *, fp16_outputs: tuple[str, ...] = (),
                 input_name: str | None = None, drop_output: str | None = None) -> None:
        self.meta, self.max_batch = meta, max_batch
        self.input = input_name or meta.input_name
        self.outputs = [n for n in meta.output_names if n != drop_output]
        self.fp16_outputs = fp16_outputs
        self.num_io_tensors = 1 + len(self.outputs)
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return ([self.input] + self.outputs)[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == self.input else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> str:
        return "float16" if name in self.fp16_outputs else "float32"

    def get_tensor_profile_shape(self, name: str, profile: int):
        s = self.meta.image_size
        assert name == self.input and profile == 0
        return [(1, 3, s, s), (self.max_batch, 3, s, s), (self.max_batch, 3, s, s)]

    def create_execution_context(self) -> "FakeContext":
        ctx = FakeContext(self)
        self.contexts.append(ctx)
        return ctx


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine = engine
        self.batch: int | None = None
        self.addresses: dict[str, int] = {}
        self.executed_batches: list[int] = []

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        s = self.engine.meta.image_size
        if name != self.engine.input or tuple(shape[1:]) != (3, s, s) or not 1 <= shape[0] <= self.engine.max_batch:
            return False
        self.batch = int(shape[0])
        return True

    def _shape(self, name: str) -> tuple[int, ...]:
        meta, b = self.engine.meta, self.batch
        assert b is not None, "shape asked before set_input_shape"
        if name == self.engine.input:
            return (b, 3, meta.image_size, meta.image_size)
        if name == "embedding":
            return (b, meta.embed_dim)
        i = int(name.split("_")[1])
        return (b, 1 + meta.grid * meta.grid, meta.token_dims[i])

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._shape(name)

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _view(self, name: str) -> np.ndarray:
        shape = self._shape(name)
        dtype = np.dtype(self.engine.get_tensor_dtype(name))
        size = int(np.prod(shape)) * dtype.itemsize
        raw = (ctypes.c_char * size).from_address(self.addresses[name])
        return np.frombuffer(raw, dtype=dtype).reshape(shape)

    def execute_async_v3(self, stream_handle: int) -> bool:
        assert isinstance(stream_handle, int), "TensorRT takes the stream as an int handle"
        self.executed_batches.append(int(self.batch))
        x = self._view(self.engine.input).copy()
        for name, value in reference_outputs(x, self.engine.meta).items():
            if name in self.engine.outputs:
                self._view(name)[...] = value
        return True


def fake_tensorrt(engine: FakeEngine | None) -> types.SimpleNamespace:
    class Runtime:
        def __init__(self, logger: Any) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes):
            return engine if plan == b"plan" else None

    return types.SimpleNamespace(
        __version__=TRT_VERSION, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None}),
        Runtime=Runtime, TensorIOMode=types.SimpleNamespace(INPUT="INPUT", OUTPUT="OUTPUT"),
        nptype=lambda dtype: {"float32": np.float32, "float16": np.float16}[dtype])


# -------------------------------------------------------------------------------------- fixtures
@pytest.fixture()
def meta() -> ModelMeta:
    return tiny_meta(image_size=32, patch_size=8, token_dims=(16, 24), embed_dim=12)


def make_engine_file(tmp_path: Path, meta: ModelMeta, plan: bytes = b"plan", version: str = TRT_VERSION) -> Path:
    engine = tmp_path / "m.engine"
    engine.write_bytes(plan)
    runner.write_sidecar(engine, meta, {runner.SIDECAR_VERSION_KEY: version})
    return engine


@pytest.fixture()
def device(monkeypatch):
    """Install a simulated TensorRT + CUDA; returns a function that sets the engine and the CUDA."""
    state: dict[str, Any] = {}

    def install(engine: FakeEngine | None, cudart: FakeCudart | None = None):
        state["cudart"] = cudart or FakeCudart()
        monkeypatch.setattr(runner, "import_tensorrt", lambda: fake_tensorrt(engine))
        monkeypatch.setattr(runner, "import_cudart", lambda: state["cudart"])
        return state["cudart"]

    return install


def batch_of(n: int, meta: ModelMeta, seed: int = 0) -> np.ndarray:
    s = meta.image_size
    return np.random.default_rng(seed).standard_normal((n, 3, s, s)).astype(np.float32)


# ----------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [1, 3, 8, 11, 17])
def test_batches_within_and_above_the_profile_give_every_image_its_own_outputs(tmp_path, meta, device, n):
    engine = FakeEngine(meta, max_batch=8, fp16_outputs=("tokens_1",))
    cudart = device(engine)
    x = batch_of(n, meta)
    with runner.TensorRTBackend(make_engine_file(tmp_path, meta), meta) as backend:
        assert backend.max_batch == 8 and backend.description.startswith(f"tensorrt {TRT_VERSION}")
        feats = backend(x)
    want = reference_outputs(x, meta)
    np.testing.assert_allclose(feats.tokens[0], want["tokens_0"], rtol=1e-6)
    np.testing.assert_allclose(feats.tokens[1], want["tokens_1"], rtol=1e-3)  # went through FP16
    np.testing.assert_allclose(feats.embedding, want["embedding"], rtol=1e-6)
    assert all(t.dtype == np.float32 for t in feats.tokens) and feats.embedding.dtype == np.float32
    # chunks of at most 8, in order, covering the batch exactly once
    assert engine.contexts[0].executed_batches == [min(8, n - i) for i in range(0, n, 8)]
    assert sorted(cudart.freed) == sorted({p for p in engine.contexts[0].addresses.values()})
    assert cudart.destroyed == cudart.streams and not cudart.memory  # everything handed back


def test_buffers_are_sized_for_the_largest_batch_of_the_profile(tmp_path, meta, device):
    cudart = device(FakeEngine(meta, max_batch=4, fp16_outputs=("embedding",)))
    backend = runner.TensorRTBackend(make_engine_file(tmp_path, meta), meta)
    sizes = {name: cudart.memory[ptr].nbytes for name, ptr in backend._buffers.items()}
    tokens = 1 + meta.grid ** 2
    assert sizes == {"image": 4 * 3 * 32 * 32 * 4, "tokens_0": 4 * tokens * 16 * 4, "tokens_1": 4 * tokens * 24 * 4,
                     "embedding": 4 * 12 * 2}
    backend.close()
    backend.close()  # twice is harmless
    assert not cudart.memory


def test_a_failed_allocation_frees_what_was_allocated_and_names_the_call(tmp_path, meta, device):
    class FailThirdMalloc(FakeCudart):
        def cudaMalloc(self, nbytes):
            if sum(1 for c, _ in self.calls if c == "cudaMalloc") == 2:
                self.fail = "cudaMalloc"
            return super().cudaMalloc(nbytes)

    cudart = device(FakeEngine(meta, max_batch=8), FailThirdMalloc())
    with pytest.raises(DeviceError, match=r"CUDA cudaMalloc\(\d+ bytes\) failed: cudaErrorMemoryAllocation"):
        runner.TensorRTBackend(make_engine_file(tmp_path, meta), meta)
    assert len(cudart.freed) == 2 and not cudart.memory and cudart.destroyed == cudart.streams


@pytest.mark.parametrize("engine_kwargs, plan, message", [
    ({}, b"garbage", "TensorRT could not load m.engine"),
    ({"input_name": "pixels"}, b"plan", "expected one input 'image', the engine has \\['pixels'\\]"),
    ({"drop_output": "tokens_1"}, b"plan", "the engine has no output tokens_1"),
])
def test_engines_that_do_not_fit_the_metadata_are_refused(tmp_path, meta, device, engine_kwargs, plan, message):
    cudart = device(FakeEngine(meta, max_batch=8, **engine_kwargs))
    with pytest.raises(ModelError, match=message):
        runner.TensorRTBackend(make_engine_file(tmp_path, meta, plan=plan), meta)
    assert not cudart.memory


def test_engine_from_another_tensorrt_is_refused_before_it_is_deserialized(tmp_path, meta, device):
    cudart = device(FakeEngine(meta, max_batch=8))
    with pytest.raises(ModelError, match=f"built with TensorRT 10.3.0, but TensorRT {TRT_VERSION} is installed"):
        runner.TensorRTBackend(make_engine_file(tmp_path, meta, version="10.3.0"), meta)
    assert cudart.calls == []  # refused before CUDA or TensorRT did anything


def test_load_model_picks_the_runner_for_engine_files(tmp_path, meta, device):
    from musc_edge.runtime.model import load_model

    device(FakeEngine(meta, max_batch=2))
    with load_model(make_engine_file(tmp_path, meta), "tensorrt") as backend:
        assert isinstance(backend.backend, runner.TensorRTBackend)
        assert backend(batch_of(3, meta)).embedding.shape == (3, meta.embed_dim)


# --------------------------------------------------------------------- against the real cuda-python
def _real_cudart_without_gpu():
    cudart = pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    err, count = cudart.cudaGetDeviceCount()
    if int(err.value) == 0 and count:
        pytest.skip("a CUDA device is present: tests/gpu runs the runner for real")
    return cudart


def test_the_runner_calls_cuda_python_with_argument_types_it_accepts(tmp_path, meta, device):
    """Replay every CUDA call of a run against the real binding (pointers nulled: no GPU here).

    A wrong argument type (a stream object where an int is needed, a numpy array for a pointer, a
    misspelt enum) raises TypeError/AttributeError in cuda-python before any driver call; a well
    formed call returns an error code, which is all a machine without a GPU can give.
    """
    real = _real_cudart_without_gpu()
    cudart = device(FakeEngine(meta, max_batch=4))
    with runner.TensorRTBackend(make_engine_file(tmp_path, meta), meta) as backend:
        backend(batch_of(5, meta))
    kinds = {"H2D": real.cudaMemcpyKind.cudaMemcpyHostToDevice, "D2H": real.cudaMemcpyKind.cudaMemcpyDeviceToHost}
    stream = real.cudaStream_t(0)
    replayed = set()
    for name, args in cudart.calls:
        real_args = [stream if isinstance(a, FakeStream) else kinds.get(a, a) if isinstance(a, str) else a
                     for a in args]
        if name in ("cudaMemcpyAsync", "cudaFree"):
            real_args = [0 if isinstance(a, int) and a > 1 << 16 else a for a in real_args]  # no real pointers
        result = getattr(real, name)(*real_args)
        err = result[0] if isinstance(result, tuple) else result
        assert isinstance(err, real.cudaError_t), (name, result)
        replayed.add(name)
    assert replayed == {"cudaSetDevice", "cudaStreamCreate", "cudaMalloc", "cudaMemcpyAsync",
                        "cudaStreamSynchronize", "cudaFree", "cudaStreamDestroy"}


def test_no_gpu_gives_one_line_device_errors_from_the_real_cuda_python(tmp_path, meta, monkeypatch):
    real = _real_cudart_without_gpu()
    with pytest.raises(DeviceError, match=r"^CUDA cudaGetDeviceProperties failed: cudaError\w+ \(\d+\); (check the|no) NVIDIA driver"):
        runner.cuda_info(real)
    monkeypatch.setattr(runner, "import_tensorrt", lambda: fake_tensorrt(FakeEngine(meta, max_batch=2)))
    monkeypatch.setattr(runner, "import_cudart", lambda: real)
    with pytest.raises(DeviceError, match=r"^CUDA cudaSetDevice failed: cudaError\w+ \(\d+\)") as info:
        runner.TensorRTBackend(make_engine_file(tmp_path, meta), meta)
    assert "\n" not in str(info.value)


# --------------------------------------------------------- the engine path end to end, through `score`
class OrtBackedEngine(FakeEngine):
    """A simulated engine that computes a real model's outputs (ONNX Runtime on the tiny model)."""

    def __init__(self, onnx_path: Path, meta: ModelMeta, max_batch: int) -> None:
        import onnxruntime as ort

        super().__init__(meta, max_batch)
        self.session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])

    def create_execution_context(self) -> "FakeContext":
        ctx = OrtBackedContext(self)
        self.contexts.append(ctx)
        return ctx


class OrtBackedContext(FakeContext):
    def execute_async_v3(self, stream_handle: int) -> bool:
        self.executed_batches.append(int(self.batch))
        x = self._view(self.engine.input).copy()
        names = self.engine.outputs
        for name, value in zip(names, self.engine.session.run(names, {self.engine.input: x})):
            self._view(name)[...] = value
        return True


def test_score_with_an_engine_gives_the_scores_of_its_onnx_model(tmp_path, device):
    """`musc-edge score --model X.engine`: loader, prefetching pipeline, chunking (batch 8 over a
    profile of 1..3), outputs, scorer and writers, against the same model run by ONNX Runtime."""
    import csv

    from musc_edge.cli import main
    from musc_edge.runtime.testing import make_tiny_model

    sample = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"
    meta = tiny_meta(image_size=32, patch_size=8, token_dims=(16, 24), embed_dim=12)
    onnx_path = make_tiny_model(tmp_path / "tiny.onnx", meta=meta)
    engine = OrtBackedEngine(onnx_path, meta, max_batch=3)
    device(engine)
    engine_file = make_engine_file(tmp_path, meta)
    for model, out in ((onnx_path, "onnx"), (engine_file, "engine")):
        args = ["score", str(sample), "--model", str(model), "--out", str(tmp_path / out), "--batch", "8"]
        assert main(args + (["--device", "cpu"] if out == "onnx" else [])) == 0

    def rows(out: str) -> dict[str, tuple[float, float]]:
        with open(tmp_path / out / "scores.csv", newline="") as f:
            return {r["path"]: (float(r["image_score"]), float(r["raw_score"])) for r in csv.DictReader(f)}

    want, got = rows("onnx"), rows("engine")
    assert len(want) == 40 and want.keys() == got.keys()
    for path in want:
        np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6, err_msg=path)
    assert max(engine.contexts[0].executed_batches) == 3 and sum(engine.contexts[0].executed_batches) == 40
    run = json.loads((tmp_path / "engine" / "run.json").read_text())
    assert "tensorrt" in json.dumps(run)  # run.json records what ran the model
