"""The NVIDIA ModelOpt branch of the TensorRT INT8 path (export/tensorrt.py: quantize_for_tensorrt).

The ModelOpt tests skip where ``nvidia-modelopt[onnx]`` is absent (CI, the dev venv). The Q/DQ
model is judged the way TensorRT will run it: ONNX Runtime with graph optimizations off, so Q/DQ is
evaluated as float arithmetic rather than by ORT's CPU int8 kernels (which saturate on AVX2).

ModelOpt monkeypatches ONNX Runtime's calibrators and quantizer registries for the rest of the
process (``modelopt.onnx.quantization.ort_patching``), after which our own ``trt``/``static`` modes
fail; so it runs in a child process here, and the parent checks what it wrote.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from musc_edge.calibration.reader import load_batch
from musc_edge.calibration.report import cosine_per_image
from musc_edge.export import tensorrt as build
from musc_edge.runtime.model import read_meta
from musc_edge.runtime.testing import make_tiny_model, tiny_meta

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"


@pytest.fixture()
def modelopt():
    return pytest.importorskip("modelopt.onnx.quantization")


@pytest.fixture()
def tiny(tmp_path) -> Path:
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    return make_tiny_model(model_dir / "tiny.onnx", meta=tiny_meta(image_size=64))


def _quantize_in_child(src: Path, dst: Path, input_name: str | None = None) -> dict:
    """quantize_for_tensorrt(quantizer="modelopt", num=8) in a fresh interpreter: {"how"} or {"error", "message"}."""
    script = f"""
import dataclasses, json
from pathlib import Path
from musc_edge.core.errors import MuscEdgeError
from musc_edge.export.tensorrt import quantize_for_tensorrt
from musc_edge.runtime.model import read_meta
meta = read_meta(Path({str(src)!r}))
if {input_name!r}:
    meta = dataclasses.replace(meta, input_name={input_name!r})
try:
    how = quantize_for_tensorrt(Path({str(src)!r}), Path({str(dst)!r}), meta, Path({str(SAMPLE)!r}),
                                quantizer="modelopt", num=8)
    print("RESULT " + json.dumps({{"how": how}}))
except MuscEdgeError as e:
    print("RESULT " + json.dumps({{"error": type(e).__name__, "message": str(e)}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


def _simulated(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.slow  # the child imports torch and ModelOpt: ~5-10 s
def test_modelopt_writes_a_qdq_model_close_to_fp32(tmp_path, tiny, modelopt):
    meta = read_meta(tiny)
    out = tmp_path / "qdq.onnx"
    assert _quantize_in_child(tiny, out) == {"how": "modelopt"}
    assert build.has_qdq(out)
    # ModelOpt's intermediate models went to a temporary folder, not next to the source model
    assert sorted(p.name for p in tiny.parent.iterdir()) == ["tiny.onnx"]
    # the norm of the embedding is among FP32_OPS: it stays FP32 in the otherwise FP16 graph
    model = onnx.shape_inference.infer_shapes(onnx.load(str(out)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    l2 = [n for n in model.graph.node if n.op_type == "ReduceL2"]
    assert l2 and all(types.get(n.input[0]) == onnx.TensorProto.FLOAT for n in l2)
    assert onnx.TensorProto.FLOAT16 in types.values()
    # images beyond the 8 spread ones calibration used (40 in the sample)
    images = sorted(SAMPLE.rglob("test/*/*.jpg"))[1::5]
    batch, _ = load_batch(images, meta)
    fp32, qdq = _simulated(tiny), _simulated(out)
    names = [o.name for o in fp32.get_outputs()]
    feed = {meta.input_name: batch}
    for name, a, b in zip(names, fp32.run(names, feed), qdq.run(names, feed)):
        assert b.dtype == np.float32 and np.isfinite(b).all(), name
        assert cosine_per_image(a, b).min() > 0.99, name  # measured 0.9966 (tokens_0) on 8 held-out MTD images


@pytest.mark.slow
def test_a_modelopt_failure_is_one_line_model_error(tmp_path, tiny, modelopt):
    # calibration data under a name the model has no input for: ModelOpt's own assertion fails
    result = _quantize_in_child(tiny, tmp_path / "qdq.onnx", input_name="pixels")
    assert result["error"] == "ModelError"
    assert re.fullmatch(r"ModelOpt could not quantize tiny\.onnx: AssertionError: `assert .+` at \w+\.py:\d+ .*",
                        result["message"]) and "\n" not in result["message"]
    assert not (tmp_path / "qdq.onnx").exists()


@pytest.mark.parametrize("providers, device, expected", [
    (["CUDAExecutionProvider", "CPUExecutionProvider"], True, ["cuda:0", "cpu"]),
    (["CUDAExecutionProvider", "CPUExecutionProvider"], False, ["cpu"]),  # onnxruntime-gpu, no GPU
    (["CPUExecutionProvider"], True, ["cpu"]),
])
def test_calibration_providers_follow_the_machine(monkeypatch, providers, device, expected):
    monkeypatch.setattr(ort, "get_available_providers", lambda: providers)
    monkeypatch.setattr(build, "_cuda_device_present", lambda: device)
    assert build.modelopt_calibration_eps() == expected
