"""Quantization modes, argument checks and metadata (calibration/quantize.py)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from musc_edge.calibration.quantize import (QUANT_PROP, QUANTIZED_OPS, default_mode, make_config, quantization_info,
                                            quantize_model)
from musc_edge.calibration.reader import split_images
from musc_edge.calibration.report import compare_outputs
from musc_edge.errors import InputError, ModelError
from musc_edge.meta import ModelMeta
from musc_edge.runtime.model import load_model, read_meta
from musc_edge.runtime.testing import make_tiny_model, tiny_meta


@pytest.fixture(scope="module")
def split(sample_dir):
    return split_images(sample_dir, 8, holdout=8)


@pytest.mark.parametrize("mode", ["static", "static-pc", "dynamic", "trt"])
def test_every_mode_runs_on_cpu_keeps_metadata_and_stays_close(tmp_path, tiny_model, split, mode):
    out = tmp_path / f"tiny.{mode}.onnx"
    result = quantize_model(tiny_model, out, make_config(mode, num=8), split.calibration)
    assert read_meta(out) == read_meta(tiny_model)
    info = quantization_info(out)
    assert info["mode"] == mode and info["calibration_images"] == (0 if mode == "dynamic" else 8)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops & ({"DynamicQuantizeLinear", "MatMulInteger"} if mode == "dynamic" else {"QuantizeLinear"})
    with load_model(tiny_model, "cpu") as fp32, load_model(out, "cpu") as int8:
        cos = compare_outputs(fp32, int8, list(split.heldout))
    assert set(cos) == {"tokens_0", "tokens_1", "embedding"}
    assert all(v["min"] >= 0.98 for v in cos.values()), cos
    assert result.meta == read_meta(tiny_model)


def test_trt_mode_is_symmetric_and_quantizes_only_matmul_conv_gemm(tmp_path, tiny_model, split):
    out = tmp_path / "tiny.trt.onnx"
    quantize_model(tiny_model, out, make_config("trt", num=8), split.calibration)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    consumers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, set()).add(n.op_type)
    qnodes = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qnodes
    for n in qnodes:
        zp = inits[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), "TensorRT needs zero points of 0 (int8)"
    by_output = {n.output[0]: n for n in qnodes}
    for n in qnodes:  # every activation Q/DQ pair exists for a Conv/MatMul/Gemm input, none for outputs
        if n.op_type == "DequantizeLinear" and n.input[0] in by_output:
            assert consumers[n.output[0]] & set(QUANTIZED_OPS), (n.name, consumers[n.output[0]])
    assert "emb_raw_QuantizeLinear_Output" not in {o for n in qnodes for o in n.output}


def test_static_mode_uses_uint8_activations_and_per_tensor_weights(tmp_path, tiny_model, split):
    out = tmp_path / "tiny.static.onnx"
    quantize_model(tiny_model, out, make_config("static", num=8), split.calibration)
    model = onnx.load(str(out))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    zps = [inits[n.input[2]] for n in model.graph.node if n.op_type == "QuantizeLinear"]
    assert any(z.dtype == np.uint8 for z in zps)
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[1] in inits]
    assert all(s.size == 1 for s in scales)  # per tensor


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="dynamic", method="entropy"), "--method entropy has no effect with --mode dynamic"),
    (dict(mode="dynamic", cache="x.json"), "--cache has no effect with --mode dynamic"),
    (dict(mode="fp8"), "unknown quantization mode 'fp8'; choose one of static, static-pc, dynamic, trt"),
    (dict(mode="static", method="kl"), "unknown calibration method 'kl'"),
    (dict(mode="static", num=0), "at least 1"),
])
def test_bad_combinations_are_refused_up_front(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_config(**kwargs)


def test_defaults():
    assert make_config("static").method == "minmax"
    assert make_config("dynamic").method is None
    vit = ModelMeta(backbone="vit_b16", weights="random", image_size=224, patch_size=16, grid=14, layers=(3, 6, 9, 12),
                    token_dims=(768,) * 4, embed_dim=512, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert default_mode(vit) == "dynamic"
    assert default_mode(tiny_meta()) == "static-pc"


def test_model_without_metadata_is_refused(tmp_path, split):
    bare = make_tiny_model(tmp_path / "bare.onnx", with_metadata=False)
    with pytest.raises(ModelError, match="no musc-edge metadata"):
        quantize_model(bare, tmp_path / "bare.int8.onnx", make_config("static"), split.calibration)


def test_not_an_onnx_model_is_refused(tmp_path, split):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        quantize_model(junk, tmp_path / "junk.int8.onnx", make_config("static"), split.calibration)
    with pytest.raises(ModelError, match="not found"):
        quantize_model(tmp_path / "missing.onnx", tmp_path / "m.int8.onnx", make_config("static"), split.calibration)


def test_already_quantized_and_bad_output_paths_are_refused(tmp_path, tiny_model, split):
    q = tmp_path / "q.onnx"
    quantize_model(tiny_model, q, make_config("dynamic"), ())
    with pytest.raises(ModelError, match="already quantized"):
        quantize_model(q, tmp_path / "qq.onnx", make_config("dynamic"), ())
    with pytest.raises(InputError, match="would overwrite the FP32 model"):
        quantize_model(tiny_model, tiny_model, make_config("dynamic"), ())
    with pytest.raises(InputError, match="must end in .onnx"):
        quantize_model(tiny_model, tmp_path / "x.int8", make_config("dynamic"), ())
    with pytest.raises(InputError, match="needs calibration images"):
        quantize_model(tiny_model, tmp_path / "s.onnx", make_config("static"), ())


def test_calibration_cache_is_reused_and_refused_for_another_method(tmp_path, tiny_model, split):
    cache = tmp_path / "ranges.json"
    quantize_model(tiny_model, tmp_path / "a.onnx", make_config("static", "minmax", cache=cache), split.calibration)
    assert cache.is_file() and json.loads(cache.read_text())
    # reused without images: same ranges, same model
    quantize_model(tiny_model, tmp_path / "b.onnx", make_config("static", "minmax", cache=cache), ())
    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(InputError, match="calibration cache"):
        quantize_model(tiny_model, tmp_path / "c.onnx", make_config("static", "entropy", cache=cache), ())


def test_quantization_prop_does_not_disturb_metadata(tmp_path, tiny_model):
    out = tmp_path / "d.onnx"
    quantize_model(tiny_model, out, make_config("dynamic"), ())
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert QUANT_PROP in props and ModelMeta.from_props(props) == read_meta(tiny_model)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_with_a_partial_last_batch(tmp_path, tiny_model, split, method):
    # 8 images in batches of 3 would leave a batch of 2, which ORT's histogram collector cannot stack
    out = tmp_path / f"{method}.onnx"
    quantize_model(tiny_model, out, make_config("static", method, num=8, batch=3), split.calibration)
    assert quantization_info(out)["method"] == method


@pytest.mark.parametrize("mode", ["static", "static-pc"])
def test_cosine_on_the_shared_mtd_images(tmp_path, tiny_model, mtd_dir, mode):
    # issue 5: the calibrated model runs in ONNX Runtime on the CPU within cosine 0.98 of FP32 on MTD
    mtd_split = split_images(mtd_dir, 8, holdout=12, seed=3)
    out = tmp_path / "mtd.int8.onnx"
    quantize_model(tiny_model, out, make_config(mode, num=8), mtd_split.calibration)
    with load_model(tiny_model, "cpu") as fp32, load_model(out, "cpu") as int8:
        cos = compare_outputs(fp32, int8, list(mtd_split.heldout))
    assert min(v["min"] for v in cos.values()) >= 0.98, cos
