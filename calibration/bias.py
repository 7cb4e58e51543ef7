"""Bias correction: take out of each INT8 convolution the mean shift that rounding its weights causes.

Rounding a convolution's weights moves each output channel's *mean* by

    shift[c] = sum over i, kh, kw of (Wq - W)[c, i, kh, kw] * mean(x_i)

where ``mean(x_i)`` is the mean of input channel ``i``. Behind a ReLU6 every input mean is
positive, so a channel's rounding errors do not cancel; with ``static-cnn``'s 7-bit weights
(twice the int8 step) the shift is large. Random rounding noise mostly averages out in a global
pool, a shift does not, and shifts compound from layer to layer: on EfficientNet-Lite0 they cost
the 1280-d embedding (16 blocks and the head deep, then pooled) a cosine of 0.96 (min 0.92)
against FP32 where the tokens kept 0.98-0.99 (docs/int8_tensorrt.md, "Why the embedding was low").

The correction is the empirical bias correction of Nagel et al., *Data-Free Quantization Through
Weight Equalization and Bias Correction* (ICCV 2019, section 4.2), with the input means measured
on the calibration images: subtract ``shift`` from the FP32 bias and quantize again. The weights,
and so their rounding, stay the same; only the (int32) bias changes, so it costs no speed.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from musc_edge.core.meta import ModelMeta

from .reader import load_batch

log = logging.getLogger(__name__)

#: Suffix of the per-channel mean outputs added to the FP32 graph to measure input means.
MEAN_SUFFIX = "__musc_edge_channel_mean"


def bias_shift(weight: np.ndarray, quantized: np.ndarray, input_mean: np.ndarray, group: int = 1) -> np.ndarray:
    """The mean change of each output channel when ``weight`` is replaced by ``quantized`` (Cout,).

    weight, quantized: (Cout, Cin / group, k...) FP32 and dequantized weights. input_mean: (Cin,)
    mean of each input channel. Exact for a convolution without padding on an input whose channel
    means are the same at every position; padding and borders make it an approximation.
    """
    if weight.shape != quantized.shape:
        raise ValueError(f"weight shapes differ: {weight.shape} and {quantized.shape}")
    cout, cin_g = weight.shape[:2]
    if group < 1 or cout % group or input_mean.shape != (cin_g * group,):
        raise ValueError(f"weight {weight.shape} with group {group} does not fit {input_mean.shape[0]} input channels")
    delta = (quantized.astype(np.float64) - weight.astype(np.float64)).reshape(cout, cin_g, -1).sum(axis=2)
    groups = np.arange(cout) // (cout // group)
    means = input_mean.astype(np.float64).reshape(group, cin_g)[groups]  # (Cout, Cin / group)
    return (delta * means).sum(axis=1)


def dequantized_conv_weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Conv node name -> its weight as the Q/DQ model computes with it (float64).

    A convolution counts when its weight comes from a DequantizeLinear of an initializer (how ONNX
    Runtime's QDQ quantizer writes weights); those left in FP32 are not listed.
    """
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    out: dict[str, np.ndarray] = {}
    for n in model.graph.node:
        if n.op_type != "Conv" or len(n.input) < 2:
            continue
        dq = producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        q = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float64)
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
        zero = (numpy_helper.to_array(inits[dq.input[2]]).astype(np.float64)
                if len(dq.input) > 2 and dq.input[2] in inits else np.zeros_like(scale))
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.size > 1:  # per channel, along ``axis``
            shape[axis] = -1
        out[n.name] = (q - zero.reshape(shape)) * scale.reshape(shape)
    return out


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


def conv_input_means(model_path: str | Path, convs: Sequence[str], images: Sequence[Path], meta: ModelMeta,
                     batch_size: int = 8) -> dict[str, np.ndarray]:
    """Per-channel mean of each named convolution's input over ``images`` (FP32 model, CPU).

    The means are computed inside the graph (a ReduceMean over batch and space per input), so a
    batch never keeps the full activations of every layer alive. Returns ``{conv name: (Cin,)}``;
    unreadable images are skipped like in calibration (:func:`.reader.load_batch`).
    """
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    wanted = set(convs)
    inits = {i.name: i for i in model.graph.initializer}
    tensors: dict[str, str] = {}  # conv name -> input tensor
    for n in model.graph.node:
        if n.op_type == "Conv" and n.name in wanted:
            tensors[n.name] = n.input[0]
    rank = {}
    for n in model.graph.node:
        if n.name in tensors and n.input[1] in inits:
            rank[n.input[0]] = len(inits[n.input[1]].dims)  # input rank = weight rank
    for t in sorted(set(tensors.values())):
        axes = [0] + list(range(2, rank.get(t, 4)))
        if _opset(model) >= 18:  # ReduceMean takes its axes as an input from opset 18
            name = t + MEAN_SUFFIX + "_axes"
            model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
            node = helper.make_node("ReduceMean", [t, name], [t + MEAN_SUFFIX], keepdims=0)
        else:
            node = helper.make_node("ReduceMean", [t], [t + MEAN_SUFFIX], axes=axes, keepdims=0)
        model.graph.node.append(node)
        model.graph.output.append(helper.make_tensor_value_info(t + MEAN_SUFFIX, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="musc-edge-bias-") as tmp:
        path = Path(tmp) / "means.onnx"
        onnx.save(model, str(path))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    outputs = [t + MEAN_SUFFIX for t in sorted(set(tensors.values()))]
    sums: dict[str, np.ndarray] = {}
    count = 0
    for start in range(0, len(images), batch_size):
        batch, used = load_batch(images[start:start + batch_size], meta)
        if not used:
            continue
        for name, value in zip(outputs, session.run(outputs, {meta.input_name: batch})):
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64) * len(used)
        count += len(used)
    if count == 0:
        return {}
    return {conv: sums[t + MEAN_SUFFIX] / count for conv, t in tensors.items()}


def correct_biases(model: onnx.ModelProto, quantized: dict[str, np.ndarray],
                   means: dict[str, np.ndarray]) -> tuple[str, ...]:
    """Subtract :func:`bias_shift` from the bias of every convolution in both dicts, in place.

    ``quantized``: :func:`dequantized_conv_weights` of the INT8 model made from ``model``;
    ``means``: :func:`conv_input_means`. A convolution without a bias gets one. Returns the names
    of the corrected convolutions.
    """
    inits = {i.name: i for i in model.graph.initializer}
    taken = set(inits) | {t for n in model.graph.node for t in list(n.input) + list(n.output)}
    done: list[str] = []
    for n in model.graph.node:
        if n.op_type != "Conv" or n.name not in quantized or n.name not in means or n.input[1] not in inits:
            continue
        weight = numpy_helper.to_array(inits[n.input[1]])
        group = next((a.i for a in n.attribute if a.name == "group"), 1)
        try:
            shift = bias_shift(weight, quantized[n.name], means[n.name], group)
        except ValueError as e:
            log.warning("no bias correction for %s: %s", n.name, e)
            continue
        if len(n.input) > 2 and n.input[2]:
            if n.input[2] not in inits:  # a computed bias: leave it alone
                continue
            bias = inits[n.input[2]]
            value = numpy_helper.to_array(bias).astype(np.float64) - shift
            bias.CopyFrom(numpy_helper.from_array(value.astype(np.float32), bias.name))
        else:
            name = (n.name or n.output[0]) + "_corrected_bias"
            while name in taken:
                name += "_"
            taken.add(name)
            model.graph.initializer.append(numpy_helper.from_array((-shift).astype(np.float32), name))
            while len(n.input) < 3:
                n.input.append("")
            n.input[2] = name
        done.append(n.name)
    return tuple(done)


def bias_corrected_model(fp32_path: str | Path, int8_path: str | Path, images: Sequence[Path], meta: ModelMeta,
                         out_path: str | Path, batch_size: int = 8) -> tuple[Path, tuple[str, ...]]:
    """Write to ``out_path`` the FP32 model whose biases cancel the weight rounding of ``int8_path``.

    Quantizing the result with the same options and activation ranges gives the same int8 weights
    with corrected int32 biases. Returns the path and the corrected convolutions' names.
    """
    model = onnx.load(str(fp32_path))
    quantized = dequantized_conv_weights(onnx.load(str(int8_path), load_external_data=False))
    means = conv_input_means(fp32_path, list(quantized), images, meta, batch_size)
    done = correct_biases(model, quantized, means)
    onnx.save(model, str(out_path))
    return Path(out_path), done
