"""Bias correction of INT8 convolutions (calibration/bias.py) and its use in ``static-cnn``."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from musc_edge.calibration.bias import bias_shift, conv_input_means, dequantized_conv_weights
from musc_edge.calibration.quantize import make_config, quantization_info, quantize_model
from musc_edge.calibration.reader import load_batch, split_images
from musc_edge.core.errors import InputError

from .conftest import relu6_cnn


def _run_conv(weight: np.ndarray, x: np.ndarray, group: int) -> np.ndarray:
    """One Conv (no bias, no padding) in ONNX Runtime: the reference for :func:`bias_shift`."""
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=group)], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight.astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.astype(np.float32)})[0]


@pytest.mark.parametrize("cout, cin, k, group", [(8, 6, 1, 1), (8, 6, 3, 1), (6, 6, 3, 6), (8, 6, 3, 2)])
def test_bias_shift_is_the_mean_output_change_of_the_rounded_weights(cout, cin, k, group):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((cout, cin // group, k, k))
    rounded = np.round(weight * 3) / 3  # a coarse rounding, so the shift is large
    # every channel constant over the image (different per image): each output position sees
    # the same input, so the mean change of the output is exactly the shift, borders included
    x = np.broadcast_to(rng.uniform(0, 6, (5, cin, 1, 1)), (5, cin, 9, 9)).copy()
    measured = (_run_conv(rounded, x, group) - _run_conv(weight, x, group)).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(bias_shift(weight, rounded, x.mean(axis=(0, 2, 3)), group), measured,
                               rtol=1e-4, atol=1e-4)


def test_bias_shift_refuses_shapes_that_do_not_fit():
    w = np.zeros((8, 3, 1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        bias_shift(w, w, np.zeros(4), 1)
    with pytest.raises(ValueError, match="weight shapes differ"):
        bias_shift(w, np.zeros((8, 3, 3, 3)), np.zeros(3), 1)


def test_bias_correction_defaults_and_refusal():
    assert make_config("static-cnn").bias_correction is True  # part of the CNN recipe
    assert make_config("static").bias_correction is False
    assert make_config("static-cnn", bias_correction=False).bias_correction is False
    assert make_config("trt", bias_correction=True).bias_correction is True
    with pytest.raises(InputError, match="bias correction needs calibration images"):
        make_config("dynamic", bias_correction=True)


@pytest.fixture(scope="module")
def split(sample_dir):
    return split_images(sample_dir, 8, holdout=8)


@pytest.fixture()
def cnn(tmp_path, tiny_model):
    props = {p.key: p.value for p in onnx.load(str(tiny_model)).metadata_props}
    return relu6_cnn(tmp_path / "cnn.onnx", props)


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}


def _dequantized_bias(model: onnx.ModelProto, conv: str) -> tuple[np.ndarray, np.ndarray]:
    """The bias a Q/DQ convolution adds, and its quantization step (int32 with scale s_x * s_w)."""
    inits = _inits(model)
    node = next(n for n in model.graph.node if n.name == conv)
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == node.input[2])
    scale = inits[dq.input[1]].astype(np.float64)
    return inits[dq.input[0]].astype(np.float64) * scale, scale


def _fp32_input_means(fp32, images, meta) -> dict[str, np.ndarray]:
    """Each convolution's input mean per channel, from the FP32 graph's intermediate tensors (numpy)."""
    model = onnx.load(str(fp32))
    convs = {n.name: n.input[0] for n in model.graph.node if n.op_type == "Conv"}
    for t in set(convs.values()):
        model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    x, _ = load_batch(list(images), meta)
    values = dict(zip(names, session.run(None, {meta.input_name: x})))
    return {c: values[t].astype(np.float64).mean(axis=(0, 2, 3)) for c, t in convs.items()}


def test_static_cnn_biases_cancel_the_weight_rounding(tmp_path, cnn, split):
    out = tmp_path / "cnn.int8.onnx"
    result = quantize_model(cnn, out, make_config("static-cnn", num=8), split.calibration)
    # every quantized convolution (not block 0, kept FP32) is corrected
    assert result.bias_corrected == ("ex", "dw1", "pw1")
    info = quantization_info(out)
    assert info["bias_correction"] is True and info["bias_corrected_convs"] == 3
    q = onnx.load(str(out))
    weights = dequantized_conv_weights(q)
    assert set(weights) == {"ex", "dw1", "pw1"}
    fp32 = onnx.load(str(cnn))
    w32, groups = _inits(fp32), {n.name: next((a.i for a in n.attribute if a.name == "group"), 1)
                                 for n in fp32.graph.node}
    means = _fp32_input_means(cnn, split.calibration, result.meta)
    for conv, wq in weights.items():
        w = w32[f"w_{conv}"]
        expected = -bias_shift(w, wq, means[conv], groups[conv])  # the FP32 graph has no bias
        bias, step = _dequantized_bias(q, conv)
        assert np.all(np.abs(bias - expected) <= 0.5 * step + 1e-6 * np.abs(expected)), conv  # up to int32 rounding
        assert np.abs(expected).max() > 1e-3, conv  # a real correction, not rounding noise


def test_bias_correction_changes_only_the_biases_and_reduces_the_mean_shift(tmp_path, cnn, split):
    fixed, plain = tmp_path / "fixed.onnx", tmp_path / "plain.onnx"
    meta = quantize_model(cnn, fixed, make_config("static-cnn", num=8), split.calibration).meta
    quantize_model(cnn, plain, make_config("static-cnn", num=8, bias_correction=False), split.calibration)
    assert "bias_corrected_convs" not in quantization_info(plain)
    a, b = dequantized_conv_weights(onnx.load(str(fixed))), dequantized_conv_weights(onnx.load(str(plain)))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)  # same int8 weights
    x, _ = load_batch(list(split.calibration), meta)

    def output(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {meta.input_name: x})[0].astype(np.float64)

    ref = output(cnn)
    shift = {k: np.abs((output(p) - ref).mean(axis=(0, 2, 3))).mean() for k, p in (("fixed", fixed), ("plain", plain))}
    assert shift["fixed"] < 0.5 * shift["plain"], shift  # 0.017 against 0.063 when written


def test_conv_input_means_in_the_graph_equal_numpy(cnn, split):
    from musc_edge.runtime.model import read_meta

    meta = read_meta(cnn)
    convs = ["stem", "dw0", "pw1"]
    got = conv_input_means(cnn, convs, list(split.calibration), meta, batch_size=3)  # a partial last batch
    want = _fp32_input_means(cnn, split.calibration, meta)
    assert set(got) == set(convs)
    for c in convs:
        np.testing.assert_allclose(got[c], want[c], rtol=1e-5, atol=1e-6)


def test_static_cnn_from_a_cache_alone_warns_and_leaves_biases(tmp_path, cnn, split, caplog):
    cache = tmp_path / "ranges.json"
    quantize_model(cnn, tmp_path / "a.onnx", make_config("static-cnn", num=8, cache=cache), split.calibration)
    with caplog.at_level(logging.WARNING, logger="musc_edge.calibration.quantize"):
        result = quantize_model(cnn, tmp_path / "b.onnx", make_config("static-cnn", num=8, cache=cache), ())
    assert result.bias_corrected == ()
    assert "bias correction needs the calibration images" in caplog.text
