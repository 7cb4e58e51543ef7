"""What of the TensorRT engine path can be checked without a GPU (export/tensorrt.py, runner).

The build and the runner themselves need TensorRT and a GPU: tests/gpu/test_tensorrt.py.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from musc_edge.core.errors import DeviceError, InputError, ModelError
from musc_edge.export import tensorrt as build
from musc_edge.runtime.backends import tensorrt as runner
from musc_edge.runtime.model import load_model, read_meta
from musc_edge.runtime.testing import make_tiny_model, tiny_meta

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"


@pytest.fixture()
def tiny(tmp_path) -> Path:
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64))


@pytest.fixture()
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail even where it is installed."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


@pytest.mark.parametrize("precision, calib, max_batch, qdq, engine, message", [
    ("int4", None, 8, False, "m.engine", "unknown precision 'int4'"),
    ("fp16", None, 0, False, "m.engine", "--max-batch must be between 1 and 1024"),
    ("fp16", None, 8, False, "m.onnx", "must end in .engine, .plan, .trt"),
    ("fp16", "calib", 8, False, "m.engine", "--calib is for INT8 calibration"),
    ("int8", None, 8, False, "m.engine", "no Q/DQ nodes: INT8 needs calibration images (--calib DIR)"),
    ("int8", "calib", 8, True, "m.engine", "already quantized (Q/DQ); drop --calib"),
    ("fp16", None, 8, True, "m.engine", "is an INT8 Q/DQ model"),
])
def test_bad_build_combinations(tmp_path, precision, calib, max_batch, qdq, engine, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        build.check_build_args(tmp_path / "m.onnx", tmp_path / engine, precision, tmp_path / calib if calib else None,
                               max_batch, qdq)


def test_good_build_combinations(tmp_path):
    for precision, calib, qdq in (("fp16", None, False), ("fp32", None, False), ("int8", "c", False),
                                  ("int8", None, True)):
        build.check_build_args(tmp_path / "m.onnx", tmp_path / "m.engine", precision,
                               tmp_path / calib if calib else None, 8, qdq)


def _fake_trt(version: str, strongly_typed: bool = True):
    flags = types.SimpleNamespace(**({"STRONGLY_TYPED": 5} if strongly_typed else {}))
    return types.SimpleNamespace(__version__=version, NetworkDefinitionCreationFlag=flags)


def test_network_flags_per_tensorrt_version():
    assert build.network_flags(_fake_trt("10.3.0.26")) == 1 << 5  # strongly typed on 10
    assert build.network_flags(_fake_trt("11.1.0", strongly_typed=False)) == 0  # always strongly typed on 11
    assert build.network_flags(_fake_trt("11.1.0")) == 0
    with pytest.raises(ModelError, match="too old"):
        build.network_flags(_fake_trt("8.6.1", strongly_typed=False))


def test_profile_is_batch_1_to_max():
    assert build.profile_shapes(tiny_meta(image_size=64), 16) == ((1, 3, 64, 64), (16, 3, 64, 64), (16, 3, 64, 64))


def test_fp16_graph_keeps_precise_ops_in_fp32_and_runs_close(tmp_path, tiny):
    out = build.to_fp16(tiny, tmp_path / "fp16.onnx")
    model = onnx.load(str(out))
    assert {i.name: i.data_type for i in model.graph.initializer}["w0"] == onnx.TensorProto.FLOAT16
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O kept FP32
    x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    ref = ort.InferenceSession(str(tiny)).run(None, {"image": x})
    got = ort.InferenceSession(str(out)).run(None, {"image": x})
    for a, b in zip(ref, got):
        cos = (a * b).sum() / np.linalg.norm(a) / np.linalg.norm(b)
        assert b.dtype == np.float32 and cos > 0.999
    # every op of FP32_OPS reads FP32: the converter wraps them in casts rather than converting them
    types_of = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    for n in model.graph.node:
        if n.op_type in ("ReduceL2", "ReduceMean"):
            assert types_of.get(n.output[0], onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT, n.name


def test_int8_without_q_dq_calibrates_with_onnxruntime_trt_mode(tmp_path, tiny):
    out = tmp_path / "qdq.onnx"
    how = build.quantize_for_tensorrt(tiny, out, read_meta(tiny), SAMPLE, quantizer="ort", num=8)
    assert how == "onnxruntime-trt" and build.has_qdq(out) and not build.has_qdq(tiny)


def test_build_without_tensorrt_is_a_device_error_after_the_argument_checks(tmp_path, tiny, no_tensorrt):
    with pytest.raises(InputError, match="no Q/DQ nodes"):
        build.build_engine(tiny, tmp_path / "m.engine", read_meta(tiny), precision="int8")
    with pytest.raises(DeviceError, match=r"pip install 'musc-edge\[trt\]'"):
        build.build_engine(tiny, tmp_path / "m.engine", read_meta(tiny), precision="fp16")
    assert not (tmp_path / "m.engine").exists()


def test_sidecar_round_trip_and_runtime_reads_it(tmp_path, tiny):
    meta = read_meta(tiny)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"not a real plan")
    facts = build.build_facts("10.3.0.26", "fp16", 8, "as exported", tiny, tmp_path / "t.cache")
    facts.update(cuda_version="12.4", cuda_driver_version="12.6", gpu="Fake", compute_capability="9.0")
    side = runner.write_sidecar(engine, meta, facts)
    assert side.name == "m.engine.json"
    data = runner.read_sidecar(engine)
    assert data["tensorrt_version"] == "10.3.0.26" and data["cuda_version"] == "12.4" and data["max_batch"] == 8
    assert read_meta(engine) == meta  # the runtime's metadata reader understands our sidecar
    with pytest.raises(ValueError, match="overwrite metadata"):
        runner.write_sidecar(engine, meta, {"backbone": "x"})


def test_missing_or_broken_sidecar(tmp_path):
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    with pytest.raises(ModelError, match="no sidecar m.engine.json"):
        runner.read_sidecar(engine)
    (tmp_path / "m.engine.json").write_text("{oops")
    with pytest.raises(ModelError, match="not readable JSON"):
        runner.read_sidecar(engine)


def test_engine_from_another_tensorrt_is_refused():
    runner.check_engine_version("10.3.0.26", "10.3.0.30", "m.engine")  # same 10.3.0: fine
    with pytest.raises(ModelError, match=r"built with TensorRT 10\.3\.0\.26, but TensorRT 11\.0\.1 is installed.*rebuild"):
        runner.check_engine_version("10.3.0.26", "11.0.1", "m.engine")
    with pytest.raises(ModelError, match="built with TensorRT 10.2.0"):
        runner.check_engine_version("10.2.0", "10.3.0", "m.engine")
    with pytest.raises(ModelError, match="does not say which TensorRT built it"):
        runner.check_engine_version(None, "10.3.0", "m.engine")
    assert runner.version_tuple("11.0.0rc1") == (11, 0)


def test_runner_without_tensorrt_gives_a_clear_device_error(tmp_path, tiny, no_tensorrt):
    meta = read_meta(tiny)
    engine = tmp_path / "m.engine"
    engine.write_bytes(b"x")
    runner.write_sidecar(engine, meta, {"tensorrt_version": "10.3.0"})
    with pytest.raises(DeviceError, match=r"need the tensorrt package.*musc-edge\[trt\]"):
        runner.TensorRTBackend(engine, meta)
    with pytest.raises(DeviceError, match="tensorrt package"):
        load_model(engine, "auto")


def test_cuda_call_unpacks_and_names_failures():
    ok = types.SimpleNamespace(value=0, name="cudaSuccess")
    bad = types.SimpleNamespace(value=35, name="cudaErrorInsufficientDriver")
    assert runner.cuda_call((ok, 7), "x") == 7
    assert runner.cuda_call((ok,), "x") is None
    assert runner.cuda_call((ok, 1, 2), "x") == (1, 2)
    with pytest.raises(DeviceError, match=r"CUDA cudaMalloc failed: cudaErrorInsufficientDriver \(35\)"):
        runner.cuda_call((bad, None), "cudaMalloc")


def test_engine_modules_never_import_torch():
    src = Path(runner.__file__).read_text() + Path(build.__file__).read_text()
    assert "import torch" not in src and "from torch" not in src


def test_sort_nodes_restores_topological_order_stably(tiny):
    model = onnx.load(str(tiny))
    original = [n.name or n.output[0] for n in model.graph.node]
    shuffled = list(model.graph.node)[::-1]  # every producer after its users
    del model.graph.node[:]
    model.graph.node.extend(shuffled)
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)
    build.sort_nodes(model.graph)
    onnx.checker.check_model(model)
    assert sorted(n.name or n.output[0] for n in model.graph.node) == sorted(original)
    model = onnx.load(str(tiny))
    build.sort_nodes(model.graph)
    assert [n.name or n.output[0] for n in model.graph.node] == original  # a sorted graph stays as it is
    cyclic = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["b"], ["a"]), onnx.helper.make_node("Relu", ["a"], ["b"])], "g", [], [])
    with pytest.raises(ModelError, match="cycle"):
        build.sort_nodes(cyclic)


def test_fp16_conversion_names_nodes_so_converted_casts_cannot_collide(tmp_path, tiny):
    assert any(not n.name for n in onnx.load(str(tiny)).graph.node)  # the tiny model has unnamed nodes
    model = onnx.load(str(build.to_fp16(tiny, tmp_path / "fp16.onnx")))
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    onnx.checker.check_model(model, full_check=True)
