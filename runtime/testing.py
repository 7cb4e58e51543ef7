"""A tiny ONNX backbone with musc-edge metadata, built with ``onnx.helper`` (no torch).

Tests of the runtime, ``score``, ``watch`` and calibration need a model file; exporting a real
backbone needs torch and takes seconds. This graph is a fixed random patchify convolution (the
ViT patch embedding, no transformer) that yields exactly the output layout of an exported
backbone: ``tokens_i`` (B, 1 + G*G, C_i) with a zero CLS slot and an L2-normalised
``embedding`` (B, D). Its features are crude but real functions of the pixels, so a bright blob on
a plain background does stand out. Needs the ``onnx`` package (the ``export``/``calib`` extras),
imported only when called.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from musc_edge import __version__
from musc_edge.core.meta import ModelMeta

OPSET = 17


def tiny_meta(image_size: int = 32, patch_size: int = 8, token_dims: tuple[int, ...] = (16, 24),
              embed_dim: int = 12, weights: str = "synthetic", interpolation: str = "bicubic",
              family: str = "cnn") -> ModelMeta:
    """Metadata of the model :func:`make_tiny_model` builds with the same arguments.

    family: ``cnn`` by default because the graph is convolutions only (no attention), so the
    CNN INT8 recipe is the one that quantizes it; pass ``vit`` to exercise ViT code paths.
    """
    if image_size % patch_size:
        raise ValueError("image_size must be a multiple of patch_size")
    return ModelMeta(
        backbone="tiny_patchify", family=family, weights=weights, image_size=image_size, patch_size=patch_size,
        grid=image_size // patch_size, layers=tuple(range(1, len(token_dims) + 1)), token_dims=tuple(token_dims),
        embed_dim=embed_dim, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), interpolation=interpolation,
        version=__version__, opset=OPSET)


def make_tiny_model(path: str | Path, *, meta: ModelMeta | None = None, seed: int = 0,
                    with_metadata: bool = True, conv_bias: bool = False) -> Path:
    """Write the tiny model to ``path`` (with ``meta`` or :func:`tiny_meta`'s default) and return it.

    conv_bias: give the convolutions a bias input, as real CNN exports have (BatchNorm folded).
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    meta = meta or tiny_meta()
    rng = np.random.default_rng(seed)
    p, g, dims = meta.patch_size, meta.grid, meta.token_dims
    inits = [numpy_helper.from_array(np.array([0, -1, g * g], dtype=np.int64), "shape_bcl")]
    nodes = []
    prev, prev_c = meta.input_name, 3
    for i, c in enumerate(dims):
        if i == 0:  # patch embedding: conv P x P, stride P
            w = rng.standard_normal((c, 3, p, p)) / np.sqrt(3 * p * p)
            attrs = {"kernel_shape": [p, p], "strides": [p, p]}
        else:  # 1 x 1 mixing, then tanh: a second "layer"
            w = rng.standard_normal((c, prev_c, 1, 1)) / np.sqrt(prev_c)
            attrs = {"kernel_shape": [1, 1]}
        inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{i}"))
        conv_inputs = [prev, f"w{i}"]
        if conv_bias:
            inits.append(numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"b{i}"))
            conv_inputs.append(f"b{i}")
        nodes.append(helper.make_node("Conv", conv_inputs, [f"conv{i}"], **attrs))
        fmap = f"conv{i}"
        if i > 0:
            nodes.append(helper.make_node("Tanh", [f"conv{i}"], [f"act{i}"]))
            fmap = f"act{i}"
        # (B, C, G, G) -> (B, G*G, C) with a zero CLS token in front
        nodes += [
            helper.make_node("Reshape", [fmap, "shape_bcl"], [f"flat{i}"]),
            helper.make_node("Transpose", [f"flat{i}"], [f"seq{i}"], perm=[0, 2, 1]),
            helper.make_node("ReduceMean", [f"seq{i}"], [f"mean{i}"], axes=[1], keepdims=1),
            helper.make_node("Sub", [f"mean{i}", f"mean{i}"], [f"cls{i}"]),
            helper.make_node("Concat", [f"cls{i}", f"seq{i}"], [f"tokens_{i}"], axis=1),
        ]
        prev, prev_c = fmap, c
    we = rng.standard_normal((prev_c, meta.embed_dim)).astype(np.float32)
    inits += [numpy_helper.from_array(we, "w_embed"), numpy_helper.from_array(np.array(1e-12, np.float32), "eps")]
    nodes += [
        helper.make_node("ReduceMean", [prev], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("MatMul", ["pooled", "w_embed"], ["emb_raw"]),
        helper.make_node("ReduceL2", ["emb_raw"], ["emb_norm"], axes=[1], keepdims=1),
        helper.make_node("Max", ["emb_norm", "eps"], ["emb_den"]),
        helper.make_node("Div", ["emb_raw", "emb_den"], ["embedding"]),
    ]
    s = meta.image_size
    graph = helper.make_graph(
        nodes, "tiny_patchify",
        [helper.make_tensor_value_info(meta.input_name, TensorProto.FLOAT, ["batch", 3, s, s])],
        [helper.make_tensor_value_info(f"tokens_{i}", TensorProto.FLOAT, ["batch", 1 + g * g, c])
         for i, c in enumerate(dims)]
        + [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", meta.embed_dim])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="musc-edge-test")
    model.ir_version = 8
    if with_metadata:
        helper.set_model_props(model, meta.to_props())
    onnx.checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
