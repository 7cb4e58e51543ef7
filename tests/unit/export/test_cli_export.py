"""`musc-edge export` end to end in-process: exit codes, messages, the random-weights warning."""

from __future__ import annotations

import importlib.util

import onnxruntime as ort
import pytest

from musc_edge.cli import main
from musc_edge.core.meta import ModelMeta


def run(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["export", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow  # ~25 s on a busy 2-core box: tracing the 12 full-width blocks dominates
def test_vit_b16_random_small_exports_and_warns(capsys, tmp_path):
    out = tmp_path / "b16.onnx"
    rc, stdout, err = run(capsys, "--backbone", "vit_b16", "--weights", "random", "--image-size", "64",
                          "--out", str(out))
    assert rc == 0, err
    assert "random weights" in err and "means nothing" in err
    for name in ("tokens_0", "tokens_3", "embedding"):
        assert f"{name}" in stdout and "max abs diff" in stdout
    meta = ModelMeta.from_props(ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
                                .get_modelmeta().custom_metadata_map)
    assert (meta.backbone, meta.weights, meta.image_size, meta.grid, meta.layers, meta.token_dims, meta.embed_dim) == (
        "vit_b16", "random", 64, 4, (3, 6, 9, 12), (768,) * 4, 512)


def test_layers_flag_prunes(capsys, tmp_path, tiny_spec):
    out = tmp_path / "t.onnx"
    rc, stdout, err = run(capsys, "--backbone", "tiny_vit_test", "--weights", "random", "--layers", "1,2",
                          "--out", str(out))
    assert rc == 0, err
    assert "embedding from block 2 of 4" in stdout
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["tokens_0", "tokens_1", "embedding"]


@pytest.mark.parametrize("args, needle", [
    (["--backbone", "vit_h14"], "choose one of: efficientnet_lite0"),
    (["--weights", "/no/such/file.pt"], "--weights PATH"),
    (["--layers", "3,13"], "out of range"),
    (["--layers", "a,b"], "comma-separated integers"),
    (["--image-size", "100"], "multiple of 16"),
    (["--precision", "int8"], "--format engine"),
    (["--format", "engine", "--calib", "."], "--precision int8"),
    (["--out", "model.txt", "--weights", "random"], "must end in .onnx"),
])
def test_bad_usage_exits_2_with_one_line(capsys, args, needle):
    rc, _, err = run(capsys, *args)
    assert rc == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], err


def test_click_level_errors_exit_2(capsys):
    assert run(capsys, "--opset", "13")[0] == 2
    assert run(capsys, "--format", "tflite")[0] == 2


def test_list_shows_every_backbone(capsys):
    rc, stdout, _ = run(capsys, "--list")
    assert rc == 0
    for name in ("vit_b16", "vit_b32", "vit_l14", "vit_l14_336", "efficientnet_lite0"):
        assert name in stdout


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed here")
def test_engine_without_tensorrt_is_a_clear_error(capsys, tmp_path, tiny_spec):
    rc, _, err = run(capsys, "--backbone", "tiny_vit_test", "--weights", "random", "--format", "engine",
                     "--out", str(tmp_path / "t.onnx"))
    assert rc == 2
    assert "TensorRT" in err and "[trt]" in err
    assert (tmp_path / "t.onnx").is_file()  # the ONNX file is written first and stays usable


def test_missing_export_stack_is_one_line(capsys, monkeypatch):
    import importlib.util as util

    real = util.find_spec
    monkeypatch.setattr(util, "find_spec", lambda name, *a: None if name == "open_clip" else real(name, *a))
    rc, _, err = run(capsys, "--backbone", "vit_b16", "--weights", "random")
    assert rc == 2 and "open_clip" in err and "musc-edge[export]" in err
