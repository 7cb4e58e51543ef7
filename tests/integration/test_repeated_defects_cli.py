"""``score --repeated-defects filter`` end to end with a tiny ONNX model (no torch)."""

from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.cli import main  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402


@pytest.fixture()
def model(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64, patch_size=8))


def make_repeated(root, n_good=14, n_repeated=6, seed=0):
    """MVTec layout: good textured parts, and ``n_repeated`` parts with the same dark spot at the
    same place (one tool mark repeated through the batch)."""
    rng = np.random.default_rng(seed)
    for d in ("good", "mark"):
        (root / "test" / d).mkdir(parents=True)
    (root / "ground_truth" / "mark").mkdir(parents=True)
    spot = np.zeros((64, 64), np.uint8)
    spot[24:34, 36:46] = 255
    texture = rng.normal(0, 12, (64, 64))  # the part's surface, the same in every image
    for i in range(n_good + n_repeated):
        img = np.clip(128 + texture + rng.normal(0, 3, (64, 64)), 0, 255).astype(np.uint8)
        if i < n_good:
            cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), img)
        else:
            img[spot > 0] = 20
            cv2.imwrite(str(root / "test" / "mark" / f"{i:03d}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / "mark" / f"{i:03d}_mask.png"), spot)
    return root


def test_filter_finds_the_repeated_mark_and_scores_it(tmp_path, model):
    data = make_repeated(tmp_path / "cat")
    runs = {}
    for mode in ("keep", "filter"):
        out = tmp_path / mode
        assert main(["score", str(data), "--model", str(model), "--out", str(out), "--quiet", "--r", "1",
                     "--repeated-defects", mode]) == 0
        runs[mode] = (json.loads((out / "run.json").read_text()), json.loads((out / "metrics.json").read_text()))
    keep_run, keep_metrics = runs["keep"]
    run, metrics = runs["filter"]
    assert keep_run["settings"]["repeated_defects"] == "keep" and "repeated_defect_groups" not in keep_run
    assert run["settings"]["repeated_defects"] == "filter"
    found = sorted(p.split("/test/")[1] for g in run["repeated_defect_groups"] for p in g)
    assert found == [f"mark/{i:03d}.png" for i in range(14, 20)]
    assert metrics["image"]["auroc"] > keep_metrics["image"]["auroc"]
    assert metrics["image"]["auroc"] == 1.0


@pytest.mark.parametrize("extra", [["--window", "8"], ["--resize", "pad"]])
def test_filter_outside_batch_squash_is_one_line(tmp_path, model, capsys, extra):
    data = make_repeated(tmp_path / "cat", n_good=4, n_repeated=2)
    rc = main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--repeated-defects",
               "filter", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--repeated-defects filter" in err[0]


def test_filter_over_the_memory_budget_is_one_line(tmp_path, model, capsys):
    data = make_repeated(tmp_path / "cat", n_good=4, n_repeated=2)
    rc = main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--repeated-defects",
               "filter", "--mem-budget", "1KiB"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "distance table of 6 images" in err[0] and "--mem-budget" in err[0]
    assert not (tmp_path / "o" / "scores.csv").exists()
