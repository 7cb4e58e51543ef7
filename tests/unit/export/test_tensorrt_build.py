"""``build_engine``'s own logic against a simulated TensorRT builder (no GPU needed).

What TensorRT does with the network is TensorRT's business (tests/gpu builds real engines). What
``build_engine`` must get right around it is tested here: which graph reaches the ONNX parser for
each precision (FP16 weights with FP32 I/O, Q/DQ for INT8), the network flags per TensorRT major
version, the batch profile, the persistent timing cache (read, replaced when foreign, written
back), parse and build failures as one-line errors with nothing half-written, and the sidecar.
"""

from __future__ import annotations

import json
import logging
import types
from pathlib import Path
from typing import Any

import onnx
import pytest

from musc_edge.core.errors import ModelError
from musc_edge.export import tensorrt as build
from musc_edge.runtime.backends import tensorrt as runner
from musc_edge.runtime.model import read_meta
from musc_edge.runtime.testing import make_tiny_model, tiny_meta

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"
OK = types.SimpleNamespace(value=0, name="cudaSuccess")


class Recorder:
    """What the simulated builder saw, for the assertions."""

    def __init__(self) -> None:
        self.network_flags: list[int] = []
        self.parsed: list[dict[str, Any]] = []
        self.profiles: list[tuple[str, tuple, tuple, tuple]] = []
        self.caches_offered: list[bytes] = []
        self.pool_limits: list[tuple[str, int]] = []


def fake_tensorrt(version: str, rec: Recorder, *, plan: bytes | None = b"PLAN", parse_ok: bool = True,
                  foreign_cache: bytes = b"foreign") -> types.SimpleNamespace:
    class Cache:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def serialize(self) -> bytes:
            return self.data + b"|timings"

    class Config:
        cache: Cache | None = None

        def set_memory_pool_limit(self, pool: str, nbytes: int) -> None:
            rec.pool_limits.append((pool, nbytes))

        def add_optimization_profile(self, profile: Any) -> int:
            return 0

        def create_timing_cache(self, data: bytes) -> Cache:
            rec.caches_offered.append(bytes(data))
            return Cache(bytes(data))

        def set_timing_cache(self, cache: Cache, ignore_mismatch: bool) -> bool:
            if cache.data == foreign_cache and not ignore_mismatch:
                return False
            self.cache = cache
            return True

        def get_timing_cache(self) -> Cache:
            return self.cache

    class Profile:
        def set_shape(self, name: str, lo: tuple, opt: tuple, hi: tuple) -> None:
            rec.profiles.append((name, lo, opt, hi))

    class Builder:
        def __init__(self, logger: Any) -> None:
            pass

        def create_network(self, flags: int) -> object:
            rec.network_flags.append(flags)
            return object()

        def create_builder_config(self) -> Config:
            return Config()

        def create_optimization_profile(self) -> Profile:
            return Profile()

        def build_serialized_network(self, network: Any, config: Config):
            return plan

    class OnnxParser:
        num_errors = 0 if parse_ok else 1

        def __init__(self, network: Any, logger: Any) -> None:
            pass

        def parse_from_file(self, path: str) -> bool:
            model = onnx.load(path)
            # TensorRT's parser: DequantizeLinear of int8 only (ORT's int32 biases are refused)
            inits = {i.name: i.data_type for i in model.graph.initializer}
            for n in model.graph.node:
                if n.op_type == "DequantizeLinear" and inits.get(n.input[0], onnx.TensorProto.INT8) != onnx.TensorProto.INT8:
                    self.num_errors = 1
                    self._error = f"DequantizeLinear {n.name}: unsupported input type {inits[n.input[0]]}"
                    return False
            rec.parsed.append({
                "qdq": any(n.op_type in build.QDQ_OPS for n in model.graph.node),
                "weights": {i.data_type for i in model.graph.initializer if len(i.dims) > 1},
                "input": model.graph.input[0].type.tensor_type.elem_type,
            })
            return parse_ok

        def get_error(self, i: int):
            message = getattr(self, "_error", "Unsupported ONNX op 'Frobnicate'")
            return types.SimpleNamespace(desc=lambda: message)

    flags = types.SimpleNamespace(STRONGLY_TYPED=5)
    return types.SimpleNamespace(__version__=version, Logger=type("Logger", (), {"WARNING": 2, "__init__": lambda s, l: None}),
                                 Builder=Builder, OnnxParser=OnnxParser, NetworkDefinitionCreationFlag=flags,
                                 MemoryPoolType=types.SimpleNamespace(WORKSPACE="WORKSPACE"))


def fake_cudart() -> types.SimpleNamespace:
    props = types.SimpleNamespace(name=b"Simulated H200\x00\x00", major=9, minor=0)
    return types.SimpleNamespace(cudaRuntimeGetVersion=lambda: (OK, 12080), cudaDriverGetVersion=lambda: (OK, 12090),
                                 cudaGetDeviceProperties=lambda device: (OK, props))


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64))


@pytest.fixture()
def simulated(monkeypatch):
    """Install a simulated TensorRT; returns (install(version, **kw) -> Recorder)."""

    def install(version: str = "10.16.1.11", **kwargs: Any) -> Recorder:
        rec = Recorder()
        trt = fake_tensorrt(version, rec, **kwargs)
        monkeypatch.setattr(build, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(build, "import_cudart", fake_cudart)
        return rec

    return install


def test_fp16_engine_graph_profile_cache_and_sidecar(tmp_path, tiny, simulated):
    rec = simulated("10.16.1.11")
    cache = tmp_path / "cache" / "timing.cache"
    engine = build.build_engine(tiny, tmp_path / "out" / "m.engine", read_meta(tiny), precision="fp16",
                                max_batch=16, timing_cache=cache)
    assert engine.read_bytes() == b"PLAN" and not list(engine.parent.glob("*.tmp"))
    assert rec.network_flags == [1 << 5]  # STRONGLY_TYPED on TensorRT 10
    (seen,) = rec.parsed
    assert seen["weights"] == {onnx.TensorProto.FLOAT16} and seen["input"] == onnx.TensorProto.FLOAT and not seen["qdq"]
    assert rec.profiles == [("image", (1, 3, 64, 64), (16, 3, 64, 64), (16, 3, 64, 64))]
    assert rec.caches_offered == [b""] and cache.read_bytes() == b"|timings"  # new cache, written back
    side = json.loads(runner.sidecar_file(engine).read_text())
    assert side["tensorrt_version"] == "10.16.1.11" and side["precision"] == "fp16" and side["max_batch"] == 16
    assert side["cuda_version"] == "12.8" and side["cuda_driver_version"] == "12.9"
    assert side["gpu"] == "Simulated H200" and side["compute_capability"] == "9.0"
    assert side["precision_source"] == "onnxruntime float16 converter" and side["source_onnx"] == "tiny.onnx"
    assert read_meta(engine) == read_meta(tiny)
    assert not rec.pool_limits  # TensorRT's default workspace unless asked


def test_a_second_build_reuses_the_timing_cache_and_a_foreign_one_is_replaced(tmp_path, tiny, simulated, caplog):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier")
    rec = simulated("11.4.0.106")
    build.build_engine(tiny, tmp_path / "a.engine", read_meta(tiny), precision="fp32", timing_cache=cache,
                       workspace_gib=2)
    assert rec.network_flags == [0]  # TensorRT 11: strongly typed always, the flag is deprecated
    assert rec.caches_offered == [b"earlier"] and cache.read_bytes() == b"earlier|timings"
    assert rec.pool_limits == [("WORKSPACE", 2 << 30)]
    assert rec.parsed[0]["weights"] == {onnx.TensorProto.FLOAT}  # fp32: the graph as exported

    cache.write_bytes(b"foreign")
    rec = simulated("11.4.0.106")
    with caplog.at_level(logging.WARNING):
        build.build_engine(tiny, tmp_path / "b.engine", read_meta(tiny), precision="fp32", timing_cache=cache)
    assert "made by another TensorRT or GPU; starting a new one" in caplog.text
    assert rec.caches_offered == [b"foreign", b""] and cache.read_bytes() == b"|timings"


def test_int8_from_calibration_images_parses_a_q_dq_graph(tmp_path, tiny, simulated):
    rec = simulated()
    engine = build.build_engine(tiny, tmp_path / "m.int8.engine", read_meta(tiny), precision="int8",
                                calib_dir=SAMPLE, max_batch=4, quantizer="ort", num_calib=8,
                                timing_cache=tmp_path / "t.cache")
    assert rec.parsed[0]["qdq"] and rec.parsed[0]["input"] == onnx.TensorProto.FLOAT
    side = runner.read_sidecar(engine)
    assert side["precision"] == "int8" and side["precision_source"] == "onnxruntime-trt"


def test_int8_of_a_cnn_with_biases_gives_a_graph_tensorrt_parses(tmp_path, simulated):
    """Conv biases (every BatchNorm-folded CNN has them) stay float: ORT would quantize them to an
    int32 DequantizeLinear, which TensorRT's parser refuses (the simulated parser does too)."""
    biased = make_tiny_model(tmp_path / "biased.onnx", meta=tiny_meta(image_size=64), conv_bias=True)
    rec = simulated()
    build.build_engine(biased, tmp_path / "b.engine", read_meta(biased), precision="int8", calib_dir=SAMPLE,
                       quantizer="ort", num_calib=8, timing_cache=tmp_path / "t.cache")
    assert rec.parsed[0]["qdq"]


def test_int8_from_a_q_dq_model_builds_it_as_given(tmp_path, tiny, simulated):
    qdq = tmp_path / "tiny.qdq.onnx"
    build.quantize_for_tensorrt(tiny, qdq, read_meta(tiny), SAMPLE, quantizer="ort", num=8)
    rec = simulated()
    engine = build.build_engine(qdq, tmp_path / "m.engine", read_meta(tiny), precision="int8",
                                timing_cache=tmp_path / "t.cache")
    assert rec.parsed[0]["qdq"] and runner.read_sidecar(engine)["precision_source"] == "Q/DQ model as given"


@pytest.mark.parametrize("kwargs, message", [
    ({"parse_ok": False}, r"TensorRT cannot parse fp16.onnx: Unsupported ONNX op 'Frobnicate'"),
    ({"plan": None}, r"TensorRT failed to build an engine from fp16.onnx"),
])
def test_failures_are_one_line_and_leave_no_engine_behind(tmp_path, tiny, simulated, kwargs, message):
    simulated(**kwargs)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"an older, working engine")
    cache = tmp_path / "t.cache"
    with pytest.raises(ModelError, match=message) as info:
        build.build_engine(tiny, engine, read_meta(tiny), precision="fp16", timing_cache=cache)
    assert "\n" not in str(info.value)
    assert engine.read_bytes() == b"an older, working engine"  # nothing half-written over it
    assert not runner.sidecar_file(engine).exists() and not cache.exists()


# ------------------------------------------------------------------ CLI: export --format engine --from-onnx
def run_cli(*args: str) -> int:
    from musc_edge.cli import main

    return main(["export", *args])


def test_from_onnx_builds_on_the_target_without_torch(tmp_path, tiny, simulated, monkeypatch, capsys):
    import sys

    for mod in ("torch", "open_clip", "torchvision"):
        monkeypatch.setitem(sys.modules, mod, None)  # any import of them now fails: the target has none
    rec = simulated()
    monkeypatch.setattr(build, "default_timing_cache", lambda: tmp_path / "t.cache")
    assert run_cli("--format", "engine", "--from-onnx", str(tiny), "--max-batch", "4") == 0
    engine = tiny.with_suffix(".engine")
    assert runner.read_sidecar(engine)["precision"] == "fp16" and rec.profiles[0][3][0] == 4
    assert f"wrote {engine} (fp16, batch 1..4)" in capsys.readouterr().out


def test_from_onnx_takes_a_q_dq_model_as_int8_and_out_names_the_engine(tmp_path, tiny, simulated, monkeypatch):
    qdq = tmp_path / "tiny.int8.onnx"
    build.quantize_for_tensorrt(tiny, qdq, read_meta(tiny), SAMPLE, quantizer="ort", num=8)
    simulated()
    monkeypatch.setattr(build, "default_timing_cache", lambda: tmp_path / "t.cache")
    out = tmp_path / "line3" / "tiny.int8.engine"
    assert run_cli("--format", "engine", "--from-onnx", str(qdq), "--out", str(out)) == 0
    assert runner.read_sidecar(out)["precision"] == "int8"  # no --precision needed for a Q/DQ model


@pytest.mark.parametrize("args, message", [
    (["--from-onnx", "{tiny}"], "--from-onnx builds a TensorRT engine: add --format engine"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--backbone", "vit_b16"], "--backbone shape a new export"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--weights", "random", "--layers", "1,2"],
     "--weights, --layers shape a new export"),
    (["--format", "engine", "--from-onnx", "{tmp}/missing.onnx"], "not an existing .onnx file"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--out", "{tmp}/x.onnx"], "--out names the engine"),
    (["--format", "engine", "--from-onnx", "{bare}"], "no musc-edge metadata"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--precision", "int8"], "no Q/DQ nodes: INT8 needs calibration"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--quantizer", "ort"], "--quantizer chooses who calibrates"),
    (["--format", "engine", "--from-onnx", "{tiny}", "--opset", "18"], "--opset shape a new export"),
])
def test_from_onnx_bad_use_is_one_line(tmp_path, tiny, simulated, capsys, args, message):
    rec = simulated()
    bare = make_tiny_model(tmp_path / "bare.onnx", with_metadata=False)
    args = [a.format(tiny=tiny, tmp=tmp_path, bare=bare) for a in args]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not rec.parsed and not list(tmp_path.rglob("*.engine"))


def test_int8_calibration_defaults_to_our_trt_mode_and_modelopt_is_asked_for(tmp_path, tiny, simulated, monkeypatch,
                                                                              capsys):
    import sys

    simulated()
    monkeypatch.setattr(build, "default_timing_cache", lambda: tmp_path / "t.cache")
    monkeypatch.setitem(sys.modules, "modelopt", None)  # as if ModelOpt were not installed
    base = ["--format", "engine", "--from-onnx", str(tiny), "--precision", "int8", "--calib", str(SAMPLE)]
    assert run_cli(*base, "--out", str(tmp_path / "a.engine")) == 0
    assert runner.read_sidecar(tmp_path / "a.engine")["precision_source"] == "onnxruntime-trt"
    assert run_cli(*base, "--out", str(tmp_path / "b.engine"), "--quantizer", "modelopt") == 2
    assert "needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]'" in capsys.readouterr().err
    assert not (tmp_path / "b.engine").exists()


def test_a_cuda_query_failure_after_the_build_leaves_the_old_engine_and_sidecar(tmp_path, tiny, simulated,
                                                                                monkeypatch):
    from musc_edge.core.errors import DeviceError

    simulated()
    bad = types.SimpleNamespace(value=35, name="cudaErrorInsufficientDriver")
    broken = fake_cudart()
    broken.cudaGetDeviceProperties = lambda device: (bad, None)
    monkeypatch.setattr(build, "import_cudart", lambda: broken)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"old plan")
    runner.write_sidecar(engine, read_meta(tiny), {"tensorrt_version": "10.0.0"})
    with pytest.raises(DeviceError, match="cudaGetDeviceProperties failed"):
        build.build_engine(tiny, engine, read_meta(tiny), precision="fp32", timing_cache=tmp_path / "t.cache")
    assert engine.read_bytes() == b"old plan"  # the pair stays consistent
    assert runner.read_sidecar(engine)["tensorrt_version"] == "10.0.0"
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_from_onnx_without_onnx_names_the_module_not_tensorrt(tmp_path, tiny, simulated, monkeypatch, capsys):
    import sys

    simulated()
    monkeypatch.setitem(sys.modules, "onnx", None)  # a target with tensorrt but without the onnx package
    assert run_cli("--format", "engine", "--from-onnx", str(tiny)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs onnx, not installed" in err[0] and "musc-edge[gpu,trt]" in err[0], err


def test_from_onnx_on_a_box_without_the_engine_stack_names_all_that_is_missing(tmp_path, tiny, monkeypatch, capsys):
    import sys

    for mod in ("tensorrt", "onnxruntime"):
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setattr(build, "import_cudart", lambda: (_ for _ in ()).throw(runner.DeviceError("no cuda-python")))
    assert run_cli("--format", "engine", "--from-onnx", str(tiny)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: building a TensorRT engine needs tensorrt, cuda-python, onnxruntime-gpu, not installed "
                   "here: pip install 'musc-edge[gpu,trt]' on the NVIDIA machine, or use --format onnx"]
