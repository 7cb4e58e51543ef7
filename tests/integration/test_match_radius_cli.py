"""``--match-radius`` through ``musc-edge score`` with a tiny ONNX model (no torch)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.cli import main  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402

from .test_score_cli import make_category, read_csv  # noqa: E402


@pytest.fixture()
def model(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64, patch_size=8))


def test_match_radius_is_recorded_and_changes_scores(tmp_path, model):
    data = make_category(tmp_path / "cat", n_good=8, n_each=1)
    runs = {}
    for radius in ("global", "1", "7"):
        out = tmp_path / f"out_{radius}"
        assert main(["score", str(data), "--model", str(model), "--out", str(out), "--quiet",
                     "--match-radius", radius]) == 0
        settings = json.loads((out / "run.json").read_text())["settings"]
        assert settings["match_radius"] == (None if radius == "global" else int(radius))
        runs[radius] = {r["path"]: float(r["raw_score"]) for r in read_csv(out / "scores.csv")}
    assert runs["7"] == pytest.approx(runs["global"], abs=1e-6)  # 7 covers the 8 x 8 grid
    assert runs["1"] != pytest.approx(runs["global"], abs=1e-6)


@pytest.mark.parametrize("value", ["-1", "near", "1.5"])
def test_a_bad_match_radius_is_one_line(tmp_path, model, capsys, value):
    data = make_category(tmp_path / "cat", n_good=3, n_each=1)
    rc = main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--match-radius", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--match-radius" in err[0]
