"""ONNX export: parity with torch, metadata round trip, dynamic batch, pruning, failure path."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from musc_edge.core.errors import ModelError
from musc_edge.export.clip import build
from musc_edge.export.onnx import PARITY_TOL, export_onnx
from musc_edge.export.weights import resolve_weights
from musc_edge.core.meta import PREFIX, ModelMeta


@pytest.fixture(scope="module")
def tiny_export(tiny_spec, tmp_path_factory):
    built = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 2, 4))
    result = export_onnx(built, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return built, result


def test_parity_is_checked_and_small(tiny_export):
    _, result = tiny_export
    assert set(result.max_abs_diff) == {"tokens_0", "tokens_1", "tokens_2", "embedding"}
    assert all(0 <= d <= PARITY_TOL for d in result.max_abs_diff.values())
    assert result.path.is_file() and not result.path.with_name(result.path.name + ".partial").exists()


def test_graph_signature(tiny_export):
    _, result = tiny_export
    model = onnx.load(str(result.path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,) = model.graph.input
    assert inp.name == "image"
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]
    assert [o.name for o in model.graph.output] == ["tokens_0", "tokens_1", "tokens_2", "embedding"]


def test_metadata_round_trip_through_onnxruntime(tiny_export):
    built, result = tiny_export
    props = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).get_modelmeta()
    meta = ModelMeta.from_props(props.custom_metadata_map)
    assert meta == result.meta == built.meta(17)
    assert (meta.backbone, meta.weights, meta.image_size, meta.patch_size, meta.grid) == (
        "tiny_vit_test", "random", 32, 8, 4)
    assert meta.layers == (1, 2, 4) and meta.token_dims == (32, 32, 32) and meta.embed_dim == 16
    assert meta.is_random and meta.interpolation == "bicubic" and meta.opset == 17 and meta.version
    assert props.custom_metadata_map[PREFIX + "embedding_layer"] == "4"
    # the family comes from the registry's builder family (clip -> vit), not from the name
    assert meta.family == "vit" and not meta.backbone.startswith("vit")
    assert props.custom_metadata_map[PREFIX + "schema"] == "2"


@pytest.mark.parametrize("batch", [1, 3])
def test_dynamic_batch_matches_torch(tiny_export, batch):
    built, result = tiny_export
    x = torch.randn(batch, 3, 32, 32)
    with torch.no_grad():
        ref = built.module(x)
    got = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        assert g.shape == tuple(r.shape) and g.shape[0] == batch
        np.testing.assert_allclose(g, r.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got[-1], axis=1), 1.0, atol=1e-5)


def test_pruned_graph_holds_fewer_blocks(tiny_spec, tmp_path):
    def layer_norms(path):
        ops = [n.op_type for n in onnx.load(str(path)).graph.node]
        return ops.count("LayerNormalization") or ops.count("ReduceMean")

    pruned = export_onnx(build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 2)), tmp_path / "p.onnx")
    full = export_onnx(build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (1, 2), keep_all_blocks=True),
                       tmp_path / "f.onnx")
    # ln_pre + 2 per block + ln_post: 2 blocks -> 6, 4 blocks -> 10
    assert layer_norms(pruned.path) < layer_norms(full.path)
    assert pruned.path.stat().st_size < full.path.stat().st_size
    meta = ort.InferenceSession(str(pruned.path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map[PREFIX + "embedding_layer"] == "2"


def test_parity_failure_writes_nothing(tiny_spec, tmp_path):
    built = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (4,))
    out = tmp_path / "bad.onnx"
    with pytest.raises(ModelError) as e:
        export_onnx(built, out, tol=-1.0)  # no difference can pass a negative tolerance
    assert "disagrees with torch" in str(e.value) and "nothing was written" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_old_opset_is_refused(tiny_spec, tmp_path):
    built = build(tiny_spec, resolve_weights(tiny_spec, "random"), 32, (4,))
    with pytest.raises(ModelError, match="opset"):
        export_onnx(built, tmp_path / "m.onnx", opset=13)
    assert list(tmp_path.iterdir()) == []
