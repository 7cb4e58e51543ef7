"""Quantization modes, argument checks and metadata (calibration/quantize.py)."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from musc_edge.calibration.quantize import (QUANT_PROP, QUANTIZED_OPS, cnn_plan, default_mode, make_config,
                                            quantization_info, quantize_model)
from musc_edge.calibration.reader import split_images
from musc_edge.calibration.report import compare_outputs
from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import ModelMeta
from musc_edge.runtime.model import load_model, read_meta
from musc_edge.runtime.testing import make_tiny_model, tiny_meta

from .conftest import relu6_cnn


@pytest.fixture(scope="module")
def split(sample_dir):
    return split_images(sample_dir, 8, holdout=8)


@pytest.mark.parametrize("mode", ["static", "static-pc", "static-cnn", "dynamic", "trt"])
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
    (dict(mode="fp8"), "unknown quantization mode 'fp8'; choose one of static, static-pc, static-cnn, dynamic, trt"),
    (dict(mode="static", method="kl"), "unknown calibration method 'kl'"),
    (dict(mode="static", num=0), "at least 1"),
])
def test_bad_combinations_are_refused_up_front(kwargs, message):
    with pytest.raises(InputError, match=message):
        make_config(**kwargs)


def test_defaults():
    assert make_config("static").method == "minmax"
    assert make_config("dynamic").method is None
    vit = ModelMeta(backbone="vit_b16", family="vit", weights="random", image_size=224, patch_size=16, grid=14,
                    layers=(3, 6, 9, 12), token_dims=(768,) * 4, embed_dim=512, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert default_mode(vit) == "dynamic"
    assert default_mode(tiny_meta()) == "static-cnn"


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


@pytest.mark.parametrize("content", [b"{bad", b"\xff\xfe\x00"])
def test_unreadable_calibration_cache_is_a_one_line_input_error(tmp_path, tiny_model, split, content):
    cache = tmp_path / "ranges.json"
    cache.write_bytes(content)
    with pytest.raises(InputError, match="not a readable JSON cache"):
        quantize_model(tiny_model, tmp_path / "e.onnx", make_config("static", "minmax", cache=cache),
                       split.calibration)


def test_quantization_prop_does_not_disturb_metadata(tmp_path, tiny_model):
    out = tmp_path / "d.onnx"
    quantize_model(tiny_model, out, make_config("dynamic"), ())
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert QUANT_PROP in props and ModelMeta.from_props(props) == read_meta(tiny_model)


def test_int8_model_of_a_first_release_export_records_its_family(tmp_path):
    # first-release metadata: no schema, no family (derived on read from the vit_* name)
    src = make_tiny_model(tmp_path / "old.onnx", meta=replace(tiny_meta(image_size=64), backbone="vit_b16"))
    model = onnx.load(str(src))
    kept = [p for p in model.metadata_props if p.key not in ("musc_edge.schema", "musc_edge.family")]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, str(src))
    assert read_meta(src).family == "vit"
    out = tmp_path / "old.int8.onnx"
    quantize_model(src, out, make_config("dynamic"), ())
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert (props["musc_edge.schema"], props["musc_edge.family"]) == ("2", "vit")
    assert read_meta(out) == read_meta(src)


def test_default_mode_follows_the_family_of_a_file(tmp_path):
    # the tiny graph named like a DINO ViT: only its recorded family picks the recipe
    for family, mode in (("vit", "dynamic"), ("cnn", "static-cnn")):
        meta = replace(tiny_meta(family=family), backbone="dino_vits8")
        path = make_tiny_model(tmp_path / f"{family}.onnx", meta=meta)
        assert default_mode(read_meta(path)) == mode


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_methods_with_a_partial_last_batch(tmp_path, tiny_model, split, method):
    # 8 images in batches of 3 would leave a batch of 2, which ORT's histogram collector cannot stack
    out = tmp_path / f"{method}.onnx"
    quantize_model(tiny_model, out, make_config("static", method, num=8, batch=3), split.calibration)
    assert quantization_info(out)["method"] == method


@pytest.mark.parametrize("mode", ["static", "static-pc", "static-cnn"])
def test_cosine_on_the_shared_mtd_images(tmp_path, tiny_model, mtd_dir, mode):
    # issue 5: the calibrated model runs in ONNX Runtime on the CPU within cosine 0.98 of FP32 on MTD
    mtd_split = split_images(mtd_dir, 8, holdout=12, seed=3)
    out = tmp_path / "mtd.int8.onnx"
    quantize_model(tiny_model, out, make_config(mode, num=8), mtd_split.calibration)
    with load_model(tiny_model, "cpu") as fp32, load_model(out, "cpu") as int8:
        cos = compare_outputs(fp32, int8, list(mtd_split.heldout))
    assert min(v["min"] for v in cos.values()) >= 0.98, cos


# ------------------------------------------------------------------------------------ static-cnn
def test_cnn_plan_keeps_the_chain_before_the_first_fork_and_reduces_dense_weights(tmp_path, tiny_model):
    props = {p.key: p.value for p in onnx.load(str(tiny_model)).metadata_props}
    plan = cnn_plan(onnx.load(str(relu6_cnn(tmp_path / "cnn.onnx", props))))
    assert plan.float_convs == ("stem", "dw0", "pw0")  # up to c_pw0, read by block 1 and its residual Add
    assert plan.reduced_weights == ("w_ex", "w_pw1")  # dense, quantized: not dw1, not the FP32 ones
    # a plain chain (no fork): everything before the second dense conv (pw0)
    chain = cnn_plan(onnx.load(str(relu6_cnn(tmp_path / "chain.onnx", props, residual=False))))
    assert chain.float_convs == ("stem", "dw0")
    assert chain.reduced_weights == ("w_pw0", "w_ex", "w_pw1")
    # a graph without depthwise convs (ResNet-like, here the tiny model's two convs) keeps only its stem
    dense = onnx.load(str(tiny_model))
    for i, n in enumerate(dense.graph.node):
        n.name = f"n{i}"
    convs = [n.name for n in dense.graph.node if n.op_type == "Conv"]
    assert len(convs) == 2 and cnn_plan(dense).float_convs == (convs[0],)
    assert cnn_plan(dense).reduced_weights == (next(n for n in dense.graph.node if n.name == convs[1]).input[1],)


def _dequantized_weight(model, weight):
    """The int weights and scales of ``weight`` (None when it was left in float)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0].startswith(weight + "_") and n.input[0] in inits:
            return inits[n.input[0]]
    return None


def _output_scale(model, tensor):
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor]
    return float(scales[0]) if scales else None


def test_static_cnn_mode_applies_the_plan(tmp_path, tiny_model, split):
    props = {p.key: p.value for p in onnx.load(str(tiny_model)).metadata_props}
    fp32 = relu6_cnn(tmp_path / "cnn.onnx", props)
    cnn = tmp_path / "cnn.static-cnn.onnx"
    plain = tmp_path / "cnn.static.onnx"
    result = quantize_model(fp32, cnn, make_config("static-cnn", num=8), split.calibration)
    quantize_model(fp32, plain, make_config("static", num=8), split.calibration)
    q, p = onnx.load(str(cnn)), onnx.load(str(plain))
    # the convolutions before the first fork stay FP32, and the metadata says so
    assert all(_dequantized_weight(q, w) is None for w in ("w_stem", "w_dw0", "w_pw0"))
    assert _dequantized_weight(p, "w_stem") is not None
    assert quantization_info(cnn)["float_nodes"] == ["stem", "dw0", "pw0"] == list(result.float_nodes)
    # 7-bit weights on dense convs (no int16 saturation in u8 x s8 GEMMs), full 8 bits on the depthwise one
    for w in ("w_ex", "w_pw1"):
        assert np.abs(_dequantized_weight(q, w).astype(int)).max() <= 64, w
    assert np.abs(_dequantized_weight(q, "w_dw1").astype(int)).max() == 127
    # per-channel weights: one scale per output channel
    scales = {n.input[0]: numpy_helper.to_array(i) for n in q.graph.node if n.op_type == "DequantizeLinear"
              for i in q.graph.initializer if i.name == n.input[1]}
    assert any(v.size == 32 for k, v in scales.items() if k.startswith("w_ex"))
    # ReLU6 range: the expand conv's output is quantized over [0, 6] (ONNX Runtime folds the Clip
    # into it), not over its wide raw range as in plain static mode
    assert "clip2" not in {n.name for n in q.graph.node}
    assert _output_scale(q, "a2") == pytest.approx(6 / 255, rel=1e-4)
    assert _output_scale(p, "c_ex") > 2 * 6 / 255
    # and it runs on the CPU
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    out = ort.InferenceSession(str(cnn), providers=["CPUExecutionProvider"]).run(None, {props["musc_edge.input_name"]: x})
    assert out[0].shape == (2, 16, 32, 32) and np.isfinite(out[0]).all()
