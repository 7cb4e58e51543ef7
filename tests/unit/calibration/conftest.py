"""Fixtures for the calibration tests: the runtime's tiny ONNX model and small image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from musc_edge.runtime.testing import make_tiny_model, tiny_meta

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 64 x 64 patchify model (two tapped layers) with musc-edge metadata."""
    meta = tiny_meta(image_size=64, patch_size=8, token_dims=(16, 24), embed_dim=12)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", meta=meta)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 40-image MTD sample (29 good, 11 defective, masks) shipped in examples/."""
    if not SAMPLE.is_dir():
        pytest.fail(f"examples/mtd_sample missing at {SAMPLE}")
    return SAMPLE


def copy_images(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` images of ``src`` (recursively) flat into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*.jpg"))[:n]:
        shutil.copy(p, dst / f"{p.parent.name}_{p.name}")
    return dst


def relu6_cnn(path, props, seed=0, residual=True):
    """A MobileNet-shaped graph: stem, ReLU6, depthwise, project (block 0), then expand (wide
    pre-activation range), ReLU6, depthwise, ReLU6, project (block 1) with a residual Add around
    block 1 (``residual=False``: a plain chain); with the metadata ``props`` (64 px input). Its
    convolutions have no bias (``static-cnn``'s bias correction adds them)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(seed)
    name = props["musc_edge.input_name"]
    shapes = {"w_stem": (8, 3, 3, 3), "w_dw0": (8, 1, 3, 3), "w_pw0": (16, 8, 1, 1), "w_ex": (32, 16, 1, 1),
              "w_dw1": (32, 1, 3, 3), "w_pw1": (16, 32, 1, 1)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * (4.0 if k == "w_ex" else 0.5)).astype(np.float32), k)
             for k, s in shapes.items()]
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in (("lo", 0.0), ("hi", 6.0))]
    conv = helper.make_node
    nodes = [
        conv("Conv", [name, "w_stem"], ["c_stem"], name="stem", pads=[1, 1, 1, 1], strides=[2, 2]),
        conv("Clip", ["c_stem", "lo", "hi"], ["a0"], name="clip0"),
        conv("Conv", ["a0", "w_dw0"], ["c_dw0"], name="dw0", group=8, pads=[1, 1, 1, 1]),
        conv("Clip", ["c_dw0", "lo", "hi"], ["a1"], name="clip1"),
        conv("Conv", ["a1", "w_pw0"], ["c_pw0"], name="pw0"),
        conv("Conv", ["c_pw0", "w_ex"], ["c_ex"], name="ex"),
        conv("Clip", ["c_ex", "lo", "hi"], ["a2"], name="clip2"),
        conv("Conv", ["a2", "w_dw1"], ["c_dw1"], name="dw1", group=32, pads=[1, 1, 1, 1]),
        conv("Clip", ["c_dw1", "lo", "hi"], ["a3"], name="clip3"),
        conv("Conv", ["a3", "w_pw1"], ["c_pw1" if residual else "out"], name="pw1"),
    ]
    if residual:
        nodes.append(conv("Add", ["c_pw0", "c_pw1"], ["out"], name="add1"))
    graph = helper.make_graph(nodes, "relu6_cnn", [helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                                                  ["b", 3, 64, 64])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path
