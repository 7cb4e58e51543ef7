"""Loading models: metadata round trip, refusal of foreign files, input/output checks, warnings."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

pytest.importorskip("onnx")

from musc_edge.core.errors import DeviceError, InputError, ModelError  # noqa: E402
from musc_edge.runtime.model import load_model, read_meta  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402


@pytest.fixture()
def tiny(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx")


def test_metadata_round_trip(tiny):
    assert read_meta(tiny) == tiny_meta()


def test_load_and_run(tiny):
    meta = tiny_meta()
    batch = np.random.default_rng(0).standard_normal((3, 3, meta.image_size, meta.image_size)).astype(np.float32)
    with load_model(tiny, device="cpu") as model:
        assert model.meta == meta
        assert "CPUExecutionProvider" in model.description
        feats = model(batch)
        again = model(batch[:1])
    assert len(feats) == 3
    assert [t.shape for t in feats.tokens] == [(3, 1 + meta.grid ** 2, c) for c in meta.token_dims]
    assert all(t.dtype == np.float32 for t in feats.tokens)
    np.testing.assert_array_equal(feats.tokens[0][:, 0], 0.0)  # CLS slot
    np.testing.assert_allclose(np.linalg.norm(feats.embedding, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(again.tokens[1], feats.tokens[1][:1], rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats.tokens[0][0], feats.tokens[0][1])  # features depend on the image


def test_closed_model_refuses_work(tiny):
    model = load_model(tiny)
    model.close()
    model.close()
    with pytest.raises(ModelError, match="closed"):
        model(np.zeros((1, 3, 32, 32), np.float32))


@pytest.mark.parametrize("batch,match", [
    (np.zeros((1, 3, 32, 32), np.float64), "float32"),
    (np.zeros((1, 3, 64, 64), np.float32), r"\(B, 3, 32, 32\)"),
    (np.zeros((3, 32, 32), np.float32), r"\(B, 3, 32, 32\)"),
    (np.zeros((0, 3, 32, 32), np.float32), "B >= 1"),
    ([[0.0]], "numpy array"),
])
def test_bad_batches_are_refused(tiny, batch, match):
    with load_model(tiny) as model, pytest.raises(InputError, match=match):
        model(batch)


def test_model_without_metadata_is_refused(tmp_path):
    plain = make_tiny_model(tmp_path / "plain.onnx", with_metadata=False)
    for call in (read_meta, load_model):
        with pytest.raises(ModelError, match="no musc-edge metadata") as info:
            call(plain)
        assert "\n" not in str(info.value) and "musc-edge export" in str(info.value)


def test_non_models_are_refused(tmp_path):
    (tmp_path / "notes.onnx").write_text("hello")
    with pytest.raises(ModelError, match="ONNX Runtime could not load"):
        load_model(tmp_path / "notes.onnx")
    with pytest.raises(ModelError, match="not found"):
        load_model(tmp_path / "missing.onnx")
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelError):
        read_meta(tmp_path / "empty.onnx")


def _relabel(src, dst, **changes):
    """Copy a model and overwrite its metadata with different values."""
    import onnx
    from dataclasses import replace

    model = onnx.load(str(src))
    meta = replace(tiny_meta(), **changes)
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta.to_props())
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("changes,match", [
    ({"token_dims": (16, 30)}, "tokens_1"),
    ({"image_size": 64, "grid": 8}, "input 'image'"),
    ({"embed_dim": 7}, "embedding"),
    ({"layers": (1, 2, 3), "token_dims": (16, 24, 24)}, "no output tokens_2"),
    ({"input_name": "pixels"}, "expected one input 'pixels'"),
])
def test_metadata_that_disagrees_with_the_graph_is_refused_at_load(tiny, tmp_path, changes, match):
    bad = _relabel(tiny, tmp_path / "bad.onnx", **changes)
    with pytest.raises(ModelError, match=match):
        load_model(bad)


def test_malformed_metadata_is_refused(tiny, tmp_path):
    import onnx

    model = onnx.load(str(tiny))
    for p in model.metadata_props:
        if p.key == "musc_edge.layers":
            p.value = "[1, 2"
    onnx.save(model, str(tmp_path / "broken.onnx"))
    with pytest.raises(ModelError, match="not a JSON list"):
        read_meta(tmp_path / "broken.onnx")


def test_random_weights_warn_once(tmp_path, caplog):
    path = make_tiny_model(tmp_path / "random.onnx", meta=tiny_meta(weights="random"))
    with caplog.at_level(logging.WARNING):
        load_model(path).close()
        load_model(path).close()
    hits = [r for r in caplog.records if "random weights" in r.getMessage()]
    assert len(hits) == 1 and "mean nothing" in hits[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_model(make_tiny_model(tmp_path / "real.onnx")).close()
    assert not [r for r in caplog.records if "random weights" in r.getMessage()]


def test_engine_needs_its_sidecar(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 16)
    with pytest.raises(ModelError, match="model.engine.json"):
        read_meta(engine)
    (tmp_path / "model.engine.json").write_text(json.dumps(tiny_meta().to_dict()))
    assert read_meta(engine) == tiny_meta()
    (tmp_path / "model.engine.json").write_text("{not json")
    with pytest.raises(ModelError, match="not readable JSON"):
        read_meta(engine)


#: What the first release wrote (metadata schema 1: no ``schema``, no ``family`` key).
V1_KEYS = ("backbone", "weights", "image_size", "patch_size", "grid", "layers", "token_dims", "embed_dim", "mean",
           "std", "interpolation", "version", "opset", "input_name")


def _first_release_dict(backbone: str) -> dict:
    d = tiny_meta().to_dict()
    d["backbone"] = backbone
    return {k: d[k] for k in V1_KEYS}


def test_first_release_onnx_metadata_loads_with_its_family(tiny, tmp_path):
    import onnx

    model = onnx.load(str(tiny))
    del model.metadata_props[:]
    old = {"musc_edge." + k: (json.dumps(v) if isinstance(v, list) else str(v))
           for k, v in _first_release_dict("vit_b32").items()}
    onnx.helper.set_model_props(model, old)
    onnx.save(model, str(tmp_path / "old.onnx"))
    meta = read_meta(tmp_path / "old.onnx")
    assert (meta.backbone, meta.family) == ("vit_b32", "vit")
    with load_model(tmp_path / "old.onnx", device="cpu") as m:
        assert m.meta == meta


def test_first_release_engine_sidecar_loads_with_its_family(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 16)
    old = {**_first_release_dict("efficientnet_lite0"), "tensorrt_version": "10.13.0", "precision": "fp16"}
    (tmp_path / "model.engine.json").write_text(json.dumps(old))
    assert read_meta(engine).family == "cnn"


def test_engine_sidecar_of_a_newer_schema_is_refused(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 16)
    (tmp_path / "model.engine.json").write_text(json.dumps({**tiny_meta().to_dict(), "schema": 9}))
    with pytest.raises(ModelError, match="schema 9, but this musc-edge reads schema 2 at most"):
        read_meta(engine)


def test_onnx_metadata_of_a_newer_schema_is_refused(tmp_path):
    path = make_tiny_model(tmp_path / "new.onnx")
    import onnx

    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == "musc_edge.schema":
            p.value = "3"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="schema 3, but this musc-edge reads schema 2 at most"):
        load_model(path, device="cpu")


def test_sidecar_written_by_export_carries_schema_and_family(tmp_path):
    from musc_edge.runtime.backends.tensorrt import read_sidecar, write_sidecar

    engine = tmp_path / "model.engine"
    write_sidecar(engine, tiny_meta(family="vit"), {"tensorrt_version": "10.13.0"})
    data = read_sidecar(engine)
    assert (data["schema"], data["family"], data["tensorrt_version"]) == (2, "vit", "10.13.0")
    engine.write_bytes(b"\x00" * 16)
    assert read_meta(engine) == tiny_meta(family="vit")


def test_engine_on_cpu_is_a_device_error(tmp_path):
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 16)
    (tmp_path / "model.engine.json").write_text(json.dumps(tiny_meta().to_dict()))
    with pytest.raises(DeviceError, match="NVIDIA GPU"):
        load_model(engine, device="cpu")


def test_engine_without_tensorrt_is_a_clear_error(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    engine = tmp_path / "model.engine"
    engine.write_bytes(b"\x00" * 16)
    (tmp_path / "model.engine.json").write_text(json.dumps(tiny_meta().to_dict()))
    with pytest.raises(DeviceError, match=r"musc-edge\[trt\]"):
        load_model(engine)
