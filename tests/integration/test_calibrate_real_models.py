"""``musc-edge calibrate`` end to end on real exported backbones (slow: export + quantize + report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from musc_edge.cli import main

pytest.importorskip("torch", reason="exporting needs the export extra")

SAMPLE = Path(__file__).resolve().parents[2] / "examples" / "mtd_sample" / "magnetic_tile"


@pytest.mark.slow
def test_vit_b16_default_int8_stays_within_cosine_098_on_mtd(tmp_path, mtd_dir, capsys):
    fp32 = tmp_path / "vit.onnx"
    assert main(["export", "--backbone", "vit_b16", "--weights", "random", "--out", str(fp32)]) == 0
    out = tmp_path / "vit.int8.onnx"
    rc = main(["calibrate", "--model", str(fp32), "--images", str(mtd_dir), "--out", str(out), "--num", "8",
               "--holdout", "8", "--no-musc", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "vit.int8.report.json").read_text())
    assert report["quantization"]["mode"] == "dynamic"  # the measured ViT default
    assert set(report["cosine"]) == {"tokens_0", "tokens_1", "tokens_2", "tokens_3", "embedding"}
    assert report["cosine_min"] >= 0.98, report["cosine"]
    assert report["size_ratio"] < 0.3


@pytest.mark.slow
def test_efficientnet_report_has_fp32_and_int8_musc_metrics(tmp_path, capsys):
    fp32 = tmp_path / "effnet.onnx"
    assert main(["export", "--backbone", "efficientnet_lite0", "--out", str(fp32)]) == 0
    out = tmp_path / "effnet.int8.onnx"
    rc = main(["calibrate", "--model", str(fp32), "--images", str(SAMPLE), "--out", str(out), "--num", "8",
               "--holdout", "8", "--threads", "2"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "effnet.int8.report.json").read_text())
    q = report["quantization"]
    assert q["mode"] == "static-cnn"  # the measured CNN default: every conv before the first residual kept FP32
    assert q["float_nodes"] == ["/_conv_stem/Conv", "/_blocks.0/_depthwise_conv/Conv", "/_blocks.0/_project_conv/Conv",
                                "/_blocks.1/_expand_conv/Conv", "/_blocks.1/_depthwise_conv/Conv",
                                "/_blocks.1/_project_conv/Conv"]
    assert min(v["min"] for v in report["cosine"].values()) >= 0.98, report["cosine"]  # the embedding too
    musc = report["musc"]
    assert musc["images"] == 32
    for side in ("fp32", "int8"):
        assert 0.5 < musc[side]["pixel"]["auroc"] <= 1.0 and 0.0 <= musc[side]["image"]["auroc"] <= 1.0
    assert musc["image_auroc_drop"] == pytest.approx(
        musc["fp32"]["image"]["auroc"] - musc["int8"]["image"]["auroc"], abs=1e-6)
