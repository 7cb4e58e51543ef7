"""The FP32-vs-INT8 report and the ``musc-edge calibrate`` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from musc_edge.calibration.calibrate import calibrate_folder
from musc_edge.calibration.report import (REPORT_KEYS, compare_speed, cosine_per_image, open_simulated,
                                          report_path)
from musc_edge.cli import main
from musc_edge.runtime.testing import make_tiny_model
from musc_edge.core.types import Features

from .conftest import copy_images


def test_cosine_per_image_against_a_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((3, 5, 4)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal(a.shape).astype(np.float32)
    expected = [float(np.dot(x.ravel(), y.ravel()) / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosine_per_image(a, b), expected, rtol=1e-6)
    np.testing.assert_allclose(cosine_per_image(a, -a), -1.0)
    z = np.zeros((2, 3))
    np.testing.assert_array_equal(cosine_per_image(z, z), [1.0, 1.0])
    np.testing.assert_array_equal(cosine_per_image(z, np.ones((2, 3))), [0.0, 0.0])


def test_report_path():
    assert report_path("/m/vit.int8.onnx").name == "vit.int8.report.json"


def test_speed_is_measured_side_by_side():
    calls = []
    now = [0.0]

    class Fake:  # advances a fake clock: FP32 takes 4 units per batch, INT8 1 (the first run 10: warm-up)
        def __init__(self, name, cost):
            self.name, self.cost = name, cost

        def __call__(self, batch):
            now[0] += 10.0 if self.name not in calls else self.cost
            calls.append(self.name)
            return Features(tokens=(), embedding=np.zeros((len(batch), 1)))

    speed = compare_speed(Fake("fp32", 4.0), Fake("int8", 1.0), np.zeros((4, 3, 8, 8), np.float32), repeats=3,
                          clock=lambda: now[0])
    assert calls == ["fp32", "int8"] * 4  # warm-up (not timed), then interleaved
    assert speed == {"batch": 4, "repeats": 3, "fp32_images_per_s": 1.0, "int8_images_per_s": 4.0, "ratio": 4.0}


def test_full_report_on_the_mtd_sample(tmp_path, tiny_model, sample_dir):
    out = tmp_path / "tiny.int8.onnx"
    run = calibrate_folder(tiny_model, sample_dir, out, mode="static", num=8, holdout=8, batch=4)
    report = json.loads(run.report_path.read_text())
    assert run.report_path == tmp_path / "tiny.int8.report.json"
    assert set(REPORT_KEYS) <= set(report)
    assert len(report["calibration_images"]) == 8 and len(report["heldout_images"]) == 8
    assert not set(report["calibration_images"]) & set(report["heldout_images"])
    assert set(report["cosine"]) == {"tokens_0", "tokens_1", "embedding"}
    assert report["cosine_min"] >= 0.98
    assert report["fp32_model"]["bytes"] == tiny_model.stat().st_size
    assert report["int8_model"]["bytes"] == out.stat().st_size
    assert report["speed"]["fp32_images_per_s"] > 0 and report["speed"]["int8_images_per_s"] > 0
    musc = report["musc"]
    assert musc["images"] == 32  # every image not used for calibration: 21 good + 11 defective
    for side in ("fp32", "int8"):
        assert 0.0 <= musc[side]["image"]["auroc"] <= 1.0
        assert 0.0 <= musc[side]["pixel"]["auroc"] <= 1.0
    assert musc["image_auroc_drop"] == pytest.approx(musc["fp32"]["image"]["auroc"] - musc["int8"]["image"]["auroc"],
                                                     abs=1e-6)
    assert report["quantization"]["mode"] == "static" and report["quantization"]["method"] == "minmax"


def test_trt_mode_is_judged_as_simulated_quantization_not_by_cpu_int8_kernels(tmp_path, tiny_model, sample_dir,
                                                                              capsys):
    out = tmp_path / "tiny.trt.onnx"
    rc = main(["calibrate", "--model", str(tiny_model), "--images", str(sample_dir), "--out", str(out),
               "--num", "8", "--holdout", "4", "--mode", "trt", "--no-musc"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    report = json.loads((tmp_path / "tiny.trt.report.json").read_text())
    assert report["execution"]["int8_arithmetic"] == "simulated" and "simulated" in report["execution"]["int8"]
    assert "for TensorRT" in report["speed"]["skipped"]
    assert "simulated quantization" in text.out and "speed: skipped" in text.out
    # simulated = each Q/DQ pair rounds and clamps in float: close to FP32, but really quantized
    from musc_edge.calibration.reader import load_batch
    from musc_edge.runtime.model import load_model

    with load_model(tiny_model, "cpu") as fp32, open_simulated(out) as sim:
        x, _ = load_batch(sorted(sample_dir.rglob("*.jpg"))[:4], fp32.meta)
        a, b = fp32(x), sim(x)
    for p, q in zip(list(a.tokens) + [a.embedding], list(b.tokens) + [b.embedding]):
        cos = cosine_per_image(p, q)
        assert (cos > 0.98).all() and (cos < 1 - 1e-7).all() and not np.allclose(p, q, atol=1e-6)


def test_flat_folder_without_labels_skips_musc_with_a_reason(tmp_path, tiny_model, sample_dir):
    folder = copy_images(sample_dir, tmp_path / "flat", 12)
    run = calibrate_folder(tiny_model, folder, tmp_path / "t.int8.onnx", mode="dynamic", num=6, holdout=4)
    assert "no labels" in run.report["musc"]["skipped"]
    assert run.report["quantization"]["calibration_images"] == 0  # dynamic: nothing calibrated


def test_cli_writes_model_and_report(tmp_path, tiny_model, sample_dir, capsys):
    out = tmp_path / "cli.int8.onnx"
    rc = main(["calibrate", "--model", str(tiny_model), "--images", str(sample_dir), "--out", str(out),
               "--num", "8", "--holdout", "4", "--mode", "static-pc", "--method", "percentile", "--no-musc"])
    text = capsys.readouterr()
    assert rc == 0, text.err
    assert out.is_file() and (tmp_path / "cli.int8.report.json").is_file()
    assert "static-pc, percentile, 8 calibration images" in text.out
    assert "skipped (disabled" in text.out


@pytest.mark.parametrize("case, message", [
    ("empty", "is empty"),
    ("few", "too few for --num 8"),
    ("bare", "no musc-edge metadata"),
    ("combo", "--method minmax has no effect with --mode dynamic"),
])
def test_cli_bad_inputs_exit_2_with_one_line(tmp_path, tiny_model, sample_dir, capsys, case, message):
    images, model = sample_dir, tiny_model
    extra: list[str] = []
    if case == "empty":
        images = tmp_path / "empty"
        images.mkdir()
    elif case == "few":
        images = copy_images(sample_dir, tmp_path / "few", 5)
    elif case == "bare":
        model = make_tiny_model(tmp_path / "bare.onnx", with_metadata=False)
    else:
        extra = ["--mode", "dynamic", "--method", "minmax"]
    rc = main(["calibrate", "--model", str(model), "--images", str(images), "--out", str(tmp_path / "o.int8.onnx"),
               "--num", "8", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.int8.onnx").exists()


def test_random_weights_warn_even_without_a_report(tmp_path, sample_dir, caplog):
    from musc_edge.runtime.testing import tiny_meta

    model = make_tiny_model(tmp_path / "random.onnx",
                            meta=tiny_meta(image_size=64, patch_size=8, token_dims=(16, 24), embed_dim=12,
                                           weights="random"))
    folder = copy_images(sample_dir / "test" / "good", tmp_path / "imgs", 10)
    with caplog.at_level("WARNING"):
        run = calibrate_folder(model, folder, tmp_path / "r.int8.onnx", mode="dynamic", num=6, holdout=2,
                               report=False)
    assert run.report is None and run.report_path is None
    assert "random weights" in caplog.text
