"""`musc-edge score` end to end on VisA and MVTec LOCO AD folders, with a tiny ONNX model (no torch)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.cli import main  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402


def tile(rng, h, w):
    """A plain textured surface, like a line part under even light."""
    return np.clip(120 + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)


def defect(rng, h, w, boxes):
    """A tile with bright defects in ``boxes`` (y0, y1, x0, x1) and the boxes as a 0/1 mask."""
    img, mask = tile(rng, h, w), np.zeros((h, w), np.uint8)
    for y0, y1, x0, x1 in boxes:
        mask[y0:y1, x0:x1] = 1
    img[mask > 0] = 250
    return img, mask


def make_visa(root, n_normal=8, n_anomaly=3, seed=0):
    """A VisA root with candle (scored) and capsules (another object) and split_csv/1cls.csv."""
    rng = np.random.default_rng(seed)
    rows = []
    for obj in ("candle", "capsules"):
        images, masks = root / obj / "Data" / "Images", root / obj / "Data" / "Masks" / "Anomaly"
        for sub in ("Normal", "Anomaly"):
            (images / sub).mkdir(parents=True)
        masks.mkdir(parents=True)
        cv2.imwrite(str(images / "Normal" / "train_0000.JPG"), tile(rng, 60, 64))
        rows.append((obj, "train", "normal", f"{obj}/Data/Images/Normal/train_0000.JPG", ""))
        for i in range(n_normal):
            cv2.imwrite(str(images / "Normal" / f"{i:04d}.JPG"), tile(rng, 60, 64))
            rows.append((obj, "test", "normal", f"{obj}/Data/Images/Normal/{i:04d}.JPG", ""))
        for i in range(n_anomaly):
            img, mask = defect(rng, 60, 64, [(10 + 5 * i, 28 + 5 * i, 12, 30)])
            cv2.imwrite(str(images / "Anomaly" / f"{i:03d}.JPG"), img)
            # VisA's masks: nonzero is defect (1 here, 255 in some objects)
            cv2.imwrite(str(masks / f"{i:03d}.png"), mask * (255 if i % 2 else 1))
            rows.append((obj, "test", "anomaly", f"{obj}/Data/Images/Anomaly/{i:03d}.JPG",
                         f"{obj}/Data/Masks/Anomaly/{i:03d}.png"))
    (root / "split_csv").mkdir(parents=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["object", "split", "label", "image", "mask"])
        w.writerows(rows)
    return root


def make_loco(root, n_good=8, n_each=2, seed=1):
    """MVTec LOCO AD: ground_truth/<type>/<stem>/000.png, 001.png, one per defect region."""
    rng = np.random.default_rng(seed)
    (root / "test" / "good").mkdir(parents=True)
    (root / "train" / "good").mkdir(parents=True)
    for i in range(n_good):
        cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), tile(rng, 56, 64))
    for t, kind in enumerate(("logical_anomalies", "structural_anomalies")):
        (root / "test" / kind).mkdir(parents=True)
        for i in range(n_each):
            # two regions per image, elsewhere in each image (a defect repeated in place matches itself)
            dy, dx = 7 * (2 * t + i), 5 * (2 * t + i)
            regions = [(2 + dy, 12 + dy, 2 + dx, 14 + dx), (40 - dy, 52 - dy, 44 - dx, 58 - dx)]
            img, _ = defect(rng, 56, 64, regions)
            cv2.imwrite(str(root / "test" / kind / f"{i:03d}.png"), img)
            gt = root / "ground_truth" / kind / f"{i:03d}"
            gt.mkdir(parents=True)
            for j, (y0, y1, x0, x1) in enumerate(regions):
                m = np.zeros((56, 64), np.uint8)
                m[y0:y1, x0:x1] = 255 if j == 0 else 9  # LOCO: region values, not only 255
                cv2.imwrite(str(gt / f"{j:03d}.png"), m)
    return root


@pytest.fixture()
def model(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64, patch_size=8))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_outputs(out, n_images, n_defective, layout):
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "raw_score", "label"]
    assert len(rows) == n_images
    assert sum(int(r["label"]) for r in rows) == n_defective
    assert all(math.isfinite(float(r["image_score"])) and math.isfinite(float(r["raw_score"])) for r in rows)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["counts"] == {"images": n_images, "defective": n_defective, "normal": n_images - n_defective,
                                 "pixel_images": n_images}
    assert set(metrics["pixel"]) == {"auroc", "ap", "f1_max", "aupro"}
    assert all(v is not None and math.isfinite(v) for v in metrics["pixel"].values()), metrics
    assert all(v is not None and math.isfinite(v) for v in metrics["image"].values()), metrics
    run = json.loads((out / "run.json").read_text())
    assert run["layout"] == layout
    return rows, metrics, run


def test_score_a_visa_object(tmp_path, model, capsys):
    visa = make_visa(tmp_path / "VisA")
    out = tmp_path / "out"
    rc = main(["score", str(visa / "candle"), "--model", str(model), "--out", str(out), "--quiet", "--heatmaps"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "layout visa" in captured.out
    rows, metrics, run = check_outputs(out, n_images=11, n_defective=3, layout="visa")
    assert run["settings"]["layout"] == "auto"
    assert all("/candle/" in r["path"] and "train_" not in r["path"] for r in rows)  # one object, test split
    labels = {r["path"].rsplit("/", 2)[-2] + "/" + r["path"].rsplit("/", 1)[-1]: int(r["label"]) for r in rows}
    assert labels["Normal/0000.JPG"] == 0 and labels["Anomaly/002.JPG"] == 1
    scores = [float(r["image_score"]) for r in rows]
    defective = [s for s, r in zip(scores, rows) if r["label"] == "1"]
    assert min(defective) > max(s for s, r in zip(scores, rows) if r["label"] == "0")  # the blobs stand out
    assert metrics["pixel"]["auroc"] > 0.8  # masks of value 1 and 255 both read as defect
    assert (out / "maps" / "bad" / "000.png").is_file() and (out / "maps" / "good" / "0000.png").is_file()


def test_score_a_visa_root_with_two_objects_exits_2(tmp_path, model, capsys):
    visa = make_visa(tmp_path / "VisA", n_normal=2, n_anomaly=1)
    rc = main(["score", str(visa), "--model", str(model), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "lists 2 objects (candle, capsules)" in err and "Traceback" not in err


def test_score_a_loco_category(tmp_path, model, capsys):
    loco = make_loco(tmp_path / "breakfast_box")
    out = tmp_path / "out"
    rc = main(["score", str(loco), "--model", str(model), "--out", str(out), "--quiet", "--layout", "auto"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rows, metrics, run = check_outputs(out, n_images=12, n_defective=4, layout="loco")
    labels = {r["path"].split("/test/")[1]: int(r["label"]) for r in rows}
    assert labels["good/000.png"] == 0 and labels["structural_anomalies/001.png"] == 1
    assert metrics["pixel"]["auroc"] > 0.75  # both regions (values 255 and 9) are in the union


def test_score_explicit_layout_and_flag_errors(tmp_path, model, capsys):
    loco = make_loco(tmp_path / "box", n_good=3, n_each=1)
    out = tmp_path / "out"
    rc = main(["score", str(loco), "--model", str(model), "--out", str(out), "--quiet", "--layout", "loco"])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["settings"]["layout"] == "loco"
    for extra, message in ((["--layout", "mvtec"], "use --layout loco"),
                           (["--layout", "loco", "--normal-dir", "test/good"], "belong to --layout folder, not loco"),
                           (["--layout", "folder"], "needs --normal-dir")):
        rc = main(["score", str(loco), "--model", str(model), "--out", str(tmp_path / "o2"), "--quiet", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and message in err, (extra, err)
