"""`musc-edge score` end to end on synthetic folders with a tiny ONNX model (no torch)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.cli import main  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402


def tile(rng, h, w):
    """A plain textured surface, like a line part under even light."""
    return np.clip(120 + rng.normal(0, 6, (h, w)), 0, 255).astype(np.uint8)


def make_category(root, n_good=10, defects=("blob", "scratch"), n_each=2, seed=0, same_stems=True):
    """MVTec layout: test/good, test/<defect> with masks in ground_truth/<defect>/<stem>_mask.png."""
    rng = np.random.default_rng(seed)
    (root / "test" / "good").mkdir(parents=True)
    for i in range(n_good):
        h, w = int(rng.integers(50, 70)), int(rng.integers(40, 80))
        cv2.imwrite(str(root / "test" / "good" / f"{i:03d}.png"), tile(rng, h, w))
    for d in defects:
        (root / "test" / d).mkdir(parents=True)
        (root / "ground_truth" / d).mkdir(parents=True)
        for i in range(n_each):
            h, w = int(rng.integers(50, 70)), int(rng.integers(40, 80))
            img, mask = tile(rng, h, w), np.zeros((h, w), np.uint8)
            if d == "blob":
                mask[15:32, 12:30] = 255
            else:
                mask[h // 2 - 3: h // 2 + 3, 5: w - 5] = 255
            img[mask > 0] = 250
            stem = f"{i:03d}" if same_stems else f"{d}_{i:03d}"
            cv2.imwrite(str(root / "test" / d / f"{stem}.png"), img)
            cv2.imwrite(str(root / "ground_truth" / d / f"{stem}_mask.png"), mask)
    return root


@pytest.fixture()
def model(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64, patch_size=8))


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_mvtec_category(tmp_path, model, capsys):
    data = make_category(tmp_path / "cat")
    (data / "test" / "good" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 50)
    out = tmp_path / "out"
    rc = main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--batch", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "scored 14 of 15 images (1 skipped)" in captured.out
    assert "auroc" in captured.out and "features" in captured.err  # summary table; progress bar on stderr

    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "raw_score", "label"]
    assert len(rows) == 14
    labels = {r["path"].split("/test/")[1]: int(r["label"]) for r in rows}
    assert labels["good/000.png"] == 0 and labels["blob/000.png"] == 1 and labels["scratch/001.png"] == 1
    scores = {r["path"].split("/test/")[1]: float(r["image_score"]) for r in rows}
    worst_good = max(v for k, v in scores.items() if k.startswith("good/"))
    assert min(v for k, v in scores.items() if not k.startswith("good/")) > worst_good  # the defects stand out

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["image"]) == {"auroc", "ap", "f1_max"}
    assert set(metrics["pixel"]) == {"auroc", "ap", "f1_max", "aupro"}
    assert metrics["image"]["auroc"] == 1.0
    assert metrics["pixel"]["auroc"] > 0.8
    assert metrics["counts"] == {"images": 14, "defective": 4, "normal": 10, "pixel_images": 14}

    run = json.loads((out / "run.json").read_text())
    assert run["counts"] == {"found": 15, "scored": 14, "skipped": 1}
    assert run["skipped"][0]["path"].endswith("corrupt.png") and "png" in run["skipped"][0]["reason"]
    assert run["model"]["meta"]["backbone"] == "tiny_patchify"
    assert run["settings"]["r"] == [1, 3, 5] and run["settings"]["batch"] == 3
    for stage in ("decode_preprocess_s", "inference_s", "score_s", "metrics_s", "heatmaps_s", "total_s"):
        assert run["timings_s"][stage] >= 0

    # one overlay per scored image, at its original size, no collisions between defect types
    maps = sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.png"))
    assert len(maps) == 14 and "blob/000.png" in maps and "scratch/000.png" in maps
    for rel in ("blob/000.png", "good/003.png"):
        overlay = cv2.imread(str(out / "maps" / rel))
        original = cv2.imread(str(data / "test" / rel))
        assert overlay.shape == original.shape


def test_flat_folder_without_labels(tmp_path, model):
    rng = np.random.default_rng(1)
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(5):
        cv2.imwrite(str(data / f"part_{i}.jpg"), tile(rng, 48, 64))
    cv2.imwrite(str(data / "part_0.bmp"), tile(rng, 48, 64))  # same stem, other suffix
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet",
                 "--r", "1,3", "--k", "1,2"]) == 0
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "raw_score"] and len(rows) == 6
    assert not (out / "metrics.json").exists()
    names = sorted(p.name for p in (out / "maps").iterdir())
    assert len(names) == 6 and "part_0.jpg.png" in names and "part_0.bmp.png" in names
    run = json.loads((out / "run.json").read_text())
    assert run["layout"] == "flat" and run["settings"]["k"] == [1, 2]


def test_flat_folder_with_a_mask_folder(tmp_path, model):
    rng = np.random.default_rng(2)
    data, masks = tmp_path / "imgs", tmp_path / "masks"
    data.mkdir()
    masks.mkdir()
    for i in range(6):
        img = tile(rng, 50, 50)
        if i == 4:
            mask = np.zeros((50, 50), np.uint8)
            mask[10:25, 10:25] = 255
            img[mask > 0] = 250
            cv2.imwrite(str(masks / f"p{i}_mask.png"), mask)
        cv2.imwrite(str(data / f"p{i}.png"), img)
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--gt", str(masks), "--quiet"]) == 0
    rows = read_csv(out / "scores.csv")
    assert [int(r["label"]) for r in rows] == [0, 0, 0, 0, 1, 0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["image"]["auroc"] == 1.0 and metrics["pixel"]["aupro"] is not None


def test_gt_none_ignores_ground_truth(tmp_path, model):
    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--gt", "none", "--quiet"]) == 0
    assert not (out / "metrics.json").exists()
    assert "label" not in read_csv(out / "scores.csv")[0]


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "musc_edge", *map(str, args)], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_bad_inputs_exit_2_with_one_line(tmp_path, model):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, _, err = run_cli("score", empty, "--model", model, "--out", tmp_path / "o1")
    assert rc == 2 and "no images" in one_error_line(err)

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.png").write_text("not an image")
    (texts / "b.jpg").write_text("not an image")
    rc, _, err = run_cli("score", texts, "--model", model, "--out", tmp_path / "o2", "--quiet")
    line = one_error_line(err)
    assert rc == 2 and "only 0 readable image(s)" in line and "2 skipped" in line

    data = make_category(tmp_path / "cat", n_good=3, defects=("blob",), n_each=1)
    plain = make_tiny_model(tmp_path / "plain.onnx", with_metadata=False)
    rc, _, err = run_cli("score", data, "--model", plain, "--out", tmp_path / "o3")
    assert rc == 2 and "no musc-edge metadata" in one_error_line(err)

    rc, _, err = run_cli("score", data, "--model", tmp_path / "missing.onnx", "--out", tmp_path / "o4")
    assert rc == 2 and "not found" in one_error_line(err)

    rc, _, err = run_cli("score", tmp_path / "nowhere", "--model", model, "--out", tmp_path / "o5")
    assert rc == 2 and "does not exist" in one_error_line(err)

    rc, _, err = run_cli("score", data, "--model", model, "--out", tmp_path / "o6", "--gt", tmp_path / "nomasks")
    assert rc == 2 and "no such mask folder" in one_error_line(err)

    rc, _, err = run_cli("score", data, "--model", model, "--out", tmp_path / "o7", "--r", "1,x")
    assert rc == 2 and "--r expects" in one_error_line(err)

    rc, _, err = run_cli("score", data, "--model", model, "--out", tmp_path / "o8", "--device", "cuda")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert rc == 2 and "available devices" in one_error_line(err)


@pytest.mark.parametrize("flag", ["--out", "--reference"])
def test_out_or_reference_being_the_scored_folder_is_named(tmp_path, model, capsys, flag):
    rng = np.random.default_rng(3)
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(3):
        cv2.imwrite(str(data / f"p{i}.png"), tile(rng, 40, 40))
    out = data if flag == "--out" else tmp_path / "out"
    extra = ["--window", "2", "--reference", str(data)] if flag == "--reference" else []
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {data} is the folder being scored" in err and len(err.strip().splitlines()) == 1


def test_random_weights_model_warns(tmp_path):
    data = make_category(tmp_path / "cat", n_good=3, defects=("blob",), n_each=1)
    model = make_tiny_model(tmp_path / "random.onnx", meta=tiny_meta(weights="random"))
    rc, out, err = run_cli("score", data, "--model", model, "--out", tmp_path / "o", "--quiet")
    assert rc == 0
    assert "random weights" in err and "mean nothing" in err
    assert "random-weights model" in out


def test_scoring_step_is_swappable_and_gets_float16_tokens(tmp_path, model):
    from musc_edge import MuscParams
    from musc_edge.score.folder import ScoreSettings, batch_score_step, score_folder

    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    seen = {}

    def spy(tokens, embedding, params, device):
        seen.update(dtypes={t.dtype for t in tokens}, n=len(embedding), r=params.r_list, k=params.k_list,
                    device=device.name)
        return batch_score_step(tokens, embedding, params, device)

    result = score_folder(data, model, tmp_path / "out",
                          ScoreSettings(params=MuscParams(r_list=(1, 3)), progress=False),
                          score_step=spy)
    assert seen == {"dtypes": {np.dtype(np.float16)}, "n": 5, "r": (1, 3), "k": (1, 2, 3), "device": "cpu"}
    assert result.run["settings"]["scorer"] == "spy"
    assert len(result.samples) == 5 and result.scores.patch_maps.shape == (5, 8, 8)


def test_feature_stage_never_holds_all_decoded_images(tmp_path, model):
    """Peak traced memory of the feature stage stays far below the size of all decoded images."""
    import tracemalloc

    from musc_edge.core.pools import BatchPool
    from musc_edge.score.folder import ScoreSettings, _extract
    from musc_edge.datasets import discover
    from musc_edge.runtime.model import load_model

    rng = np.random.default_rng(3)
    data = tmp_path / "many"
    data.mkdir()
    n, side = 64, 320
    for i in range(n):
        cv2.imwrite(str(data / f"{i:03d}.png"), rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    all_decoded = n * side * side * 3
    settings = ScoreSettings(batch_size=8, progress=False)
    with load_model(model) as extractor:
        tracemalloc.start()
        try:
            pool = BatchPool(extractor.meta, n, settings.params)
            ext = _extract(discover(data), extractor, settings, pool)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert len(ext.samples) == n and all(t.dtype == np.float16 and len(t) == n for t in pool.tokens)
    assert peak < all_decoded / 3, f"peak {peak / 1e6:.1f} MB vs {all_decoded / 1e6:.1f} MB of decoded images"


def test_window_over_the_memory_budget_is_one_line(tmp_path, model, capsys):
    """score --window W that cannot fit: exit 2 naming the GiB and the largest window that fits."""
    data = make_category(tmp_path / "cat", n_good=3, defects=("blob",), n_each=1)
    rc = main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "out"), "--window", "100000",
               "--mem-budget", "1GiB", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = one_error_line(err)
    assert "--window 100000 needs" in line and "GiB" in line and "the largest --window that fits is" in line
    assert not (tmp_path / "out" / "scores.csv").exists()


# --- progress of the scoring stage, the O(N^2) warning, heatmap panels, outputs that cannot be written ---


def test_score_tokens_reports_each_layer_and_r_call():
    from musc_edge import MuscParams, score_tokens

    rng = np.random.default_rng(0)
    tokens = [rng.standard_normal((5, 1 + 16, c)).astype(np.float32) for c in (8, 12)]
    calls = []
    plain = score_tokens(tokens, params=MuscParams(r_list=(1, 3, 5)))
    tracked = score_tokens(tokens, params=MuscParams(r_list=(1, 3, 5)), progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 6) for i in range(7)]  # 2 layers x 3 r, from 0 of 6
    assert np.array_equal(plain.patch_maps, tracked.patch_maps)


def test_pool_scorers_report_progress():
    from musc_edge.core.pools import BatchPool, StreamPool

    meta = tiny_meta(image_size=32, patch_size=8)
    rng = np.random.default_rng(1)
    n = 10
    tokens = [rng.standard_normal((n, 1 + meta.grid ** 2, c)).astype(np.float32) for c in meta.token_dims]
    emb = rng.standard_normal((n, meta.embed_dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)

    batch_calls = []
    pool = BatchPool(meta, n, progress=lambda d, t: batch_calls.append((d, t)))
    pool.add(tokens, emb)
    pool.finish()
    assert batch_calls == [(i, 6) for i in range(7)]

    stream_calls, truth = [], []
    stream = StreamPool(meta, 4, progress=lambda d, t: stream_calls.append((d, t)))
    for i in range(n):  # one image at a time: after each, compare with the images actually scored
        stream.add([t[i:i + 1] for t in tokens], emb[i:i + 1])
        truth.append((sum(m is not None for m in stream.stream._maps), i + 1))
    stream.finish()
    assert stream_calls[:-1] == truth and stream_calls[-1] == (n, n)
    assert truth[3] == (0, 4) and truth[4] == (3, 5)  # one window buffered, then each image W // 2 later


def test_score_stage_draws_a_progress_bar(tmp_path, model, capsys):
    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o1")]) == 0
    err = capsys.readouterr().err
    assert "score: 100%" in err and "6/6" in err  # tiny model: 2 layers x r = 1,3,5
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o2"), "--window", "2"]) == 0
    assert "scored 4" in capsys.readouterr().err  # 5 images, window 2: all but the last W // 2 scored
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o3"), "--quiet"]) == 0
    assert "score:" not in capsys.readouterr().err


def test_estimate_of_the_batch_score_time():
    from musc_edge import MuscParams
    from musc_edge.score import folder

    meta = tiny_meta(image_size=64, patch_size=8, token_dims=(16, 24))  # L = 64 patches, C = 40
    params = MuscParams(r_list=(1, 3))
    per_pair = 2 * 64 * 64 * 40 * 2
    rate = folder.SCORE_RATE_FLOPS["cpu"]
    assert folder.estimate_score_seconds(10, meta, params) == pytest.approx(45 * per_pair / rate)
    assert folder.estimate_score_seconds(10, meta, params, window=4) == pytest.approx(40 * per_pair / rate)
    assert folder.estimate_score_seconds(10, meta, params, window=16) == pytest.approx(45 * per_pair / rate)
    # 3,000 images: the distance table (3000 x 64 x 3000 float32) is over MSM's 1 GiB, pairs go twice
    assert folder.estimate_score_seconds(3000, meta, params) == pytest.approx(2 * 4498500 * per_pair / rate)
    # EfficientNet-Lite0 @ 224 (grid 28, C = 40 + 112, r = 1,3,5) on 3,000 images: tens of hours
    effnet = tiny_meta(image_size=224, patch_size=8, token_dims=(40, 112))
    assert 20 * 3600 < folder.estimate_score_seconds(3000, effnet, MuscParams()) < 80 * 3600


def test_slow_batch_score_warns_and_suggests_a_window(tmp_path, model, caplog, monkeypatch):
    from musc_edge.score import folder

    def warned():
        lines = [r.getMessage() for r in caplog.records if "O(N^2)" in r.getMessage()]
        caplog.clear()
        return lines

    data = make_category(tmp_path / "cat", n_good=8, defects=("blob",), n_each=1)  # 9 images
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "fast"), "--quiet"]) == 0
    assert warned() == []  # a tiny pool at the real rate: no warning
    assert json.loads((tmp_path / "fast" / "run.json").read_text())["warnings"] == []

    monkeypatch.setitem(folder.SCORE_RATE_FLOPS, "cpu", 1e3)  # a machine a million times slower
    monkeypatch.setattr(folder, "SUGGESTED_WINDOW", 2)  # a window far smaller than this tiny pool
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "slow"), "--quiet"]) == 0
    lines = warned()
    assert len(lines) == 1 and "\n" not in lines[0] and "9 images" in lines[0] and "--window 2" in lines[0]
    run = json.loads((tmp_path / "slow" / "run.json").read_text())
    assert run["warnings"] == lines and run["score_estimate_s"] > folder.SLOW_SCORE_WARN_S

    monkeypatch.setattr(folder, "SUGGESTED_WINDOW", 64)  # no faster with a window than the pool itself
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "small"), "--quiet"]) == 0
    lines = warned()
    assert len(lines) == 1 and "--window" not in lines[0]

    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "win"), "--quiet",
                 "--window", "4"]) == 0
    assert warned() == []  # already streaming


def test_heatmap_panels_threshold_and_verdict(tmp_path, model):
    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet",
                 "--threshold", "0.5", "--heatmap-scale", "0,1.5"]) == 0
    rows = read_csv(out / "scores.csv")
    assert list(rows[0]) == ["path", "image_score", "raw_score", "verdict", "label"]
    assert all(r["verdict"] == ("anomalous" if float(r["raw_score"]) >= 0.5 else "good") for r in rows)
    run = json.loads((out / "run.json").read_text())
    assert run["settings"]["threshold"] == 0.5 and run["settings"]["heatmap_range"] == [0.0, 1.5]
    for rel in ("blob/000.png", "good/000.png"):
        original = cv2.imread(str(data / "test" / rel))
        assert cv2.imread(str(out / "maps" / rel)).shape == original.shape  # pixel-aligned overlay
        panel = cv2.imread(str(out / "panels" / rel))
        assert panel.shape[0] > 2 * original.shape[0] and panel.shape[1] > 2 * original.shape[1]


def test_a_heatmap_that_cannot_be_written_never_loses_the_rest(tmp_path, model, monkeypatch):
    import errno

    from musc_edge.score import folder

    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    real_write = folder.write_png

    def write_png(path, image):
        if "001" in str(path):
            raise OSError(errno.ENAMETOOLONG, "File name too long", str(path))
        real_write(path, image)

    monkeypatch.setattr(folder, "write_png", write_png)
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet"]) == 0
    assert (out / "metrics.json").exists() and len(read_csv(out / "scores.csv")) == 5
    run = json.loads((out / "run.json").read_text())
    lost = [w for w in run["warnings"] if "not written" in w]
    assert len(lost) == 2 and all("good/001" in w and "File name too long" in w for w in lost)  # overlay + panel
    assert sorted(p.relative_to(out / "maps").as_posix() for p in (out / "maps").rglob("*.png")) == [
        "blob/000.png", "good/000.png", "good/002.png", "good/003.png"]


def test_a_250_byte_file_name_scores_to_the_end(tmp_path, model):
    rng = np.random.default_rng(4)
    data = make_category(tmp_path / "cat", n_good=3, defects=("blob",), n_each=1)
    long_name = "p" * 246 + ".png"  # 250 bytes: its output name plus a temporary suffix passes 255
    cv2.imwrite(str(data / "test" / "good" / long_name), tile(rng, 50, 50))
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet"]) == 0
    assert (out / "run.json").exists() and (out / "metrics.json").exists()
    assert len(read_csv(out / "scores.csv")) == 5
    # its heatmaps are either written (under a name that fits) or listed as not written
    written = len(list((out / "maps").rglob("*.png"))) + len(list((out / "panels").rglob("*.png")))
    lost = [w for w in json.loads((out / "run.json").read_text())["warnings"] if "not written" in w]
    assert written + len(lost) == 10 and all("p" * 20 in w for w in lost)


def test_max_file_size_skips_a_file_over_it_before_reading(tmp_path, model, capsys):
    """score --max-file-size: a file over the limit is listed as skipped with the flag to raise,
    the others are scored."""
    data = make_category(tmp_path / "cat", n_good=4, defects=("blob",), n_each=1)
    big = data / "test" / "good" / "big.png"
    big.write_bytes((data / "test" / "good" / "000.png").read_bytes() + b"\0" * 300_000)
    out = tmp_path / "out"
    rc = main(["score", str(data), "--model", str(model), "--out", str(out), "--quiet", "--max-file-size", "100KiB"])
    assert rc == 0, capsys.readouterr().err
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["skipped"] == 1 and run["counts"]["scored"] == 5
    (skip,) = run["skipped"]
    assert skip["path"].endswith("big.png") and "--max-file-size" in skip["reason"]
