"""``musc-edge score --resize pad`` and ``--tiles RxC[:overlap] [--tile-match aligned|any]``.

From the scorer's valid mask up to the CLI: pad cells never give the image score, tiles are pooled
as asked (the exclude matrix of ``any``), maps come back at the original size, bad flags are one
line and exit 2.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.cli import main  # noqa: E402
from musc_edge.core.errors import InputError  # noqa: E402
from musc_edge.core.rscin import rscin  # noqa: E402
from musc_edge.core.scorer import score_tokens  # noqa: E402
from musc_edge.runtime.geometry import (InputGeometry, TileSpec, image_views, same_image_exclude,  # noqa: E402
                                        valid_cells, view_map)
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402
from musc_edge.score import geometry as score_geometry  # noqa: E402
from musc_edge.score.geometry import GeometryPool, msm_budget  # noqa: E402

from .test_score_cli import make_category, one_error_line, read_csv, tile  # noqa: E402

META = tiny_meta(image_size=32, patch_size=8)  # grid 4, token_dims (16, 24)


@pytest.fixture()
def model(tmp_path):
    return make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=64, patch_size=8))


def synthetic_tokens(n, g, dims, rng, pad_rows=()):
    """Near-identical texture per image; cells in ``pad_rows`` get extreme, image-unique tokens."""
    base = [rng.normal(size=(1, 1 + g * g, c)) for c in dims]
    layers = []
    for b in base:
        t = np.repeat(b, n, axis=0) + 0.05 * rng.normal(size=(n,) + b.shape[1:])
        for row in pad_rows:
            cells = 1 + row * g + np.arange(g)
            t[:, cells] = 50.0 * rng.normal(size=(n, g, t.shape[2]))
        layers.append(t.astype(np.float32))
    return layers


# --- the scorer's valid mask ------------------------------------------------------------------------
def test_padding_with_extreme_tokens_gives_no_score():
    rng = np.random.default_rng(0)
    n, g = 8, 4
    tokens = synthetic_tokens(n, g, (16, 24), rng, pad_rows=(0, 3))
    emb = rng.normal(size=(n, 6))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    valid = np.zeros((n, g, g), bool)
    valid[:, 1:3] = True
    plain = score_tokens(tokens, emb)
    masked = score_tokens(tokens, emb, valid=valid.reshape(n, -1))
    assert np.array_equal(masked.patch_maps, plain.patch_maps)  # every patch still scored the same
    flat = masked.patch_maps.reshape(n, -1)
    assert np.array_equal(masked.image_scores_raw, flat[:, valid[0].reshape(-1)].max(axis=1))
    assert (plain.image_scores_raw > masked.image_scores_raw + 0.1).all()  # the pad would have won everywhere
    assert np.allclose(masked.image_scores, rscin(masked.image_scores_raw, emb, (1, 2, 3)))


def test_valid_mask_is_checked():
    tokens = synthetic_tokens(4, 4, (8,), np.random.default_rng(1))
    with pytest.raises(InputError, match=r"valid must be an \(N, G\*G\) = \(4, 16\) bool"):
        score_tokens(tokens, valid=np.ones((4, 15), bool))
    bad = np.ones((4, 16), bool)
    bad[2] = False
    with pytest.raises(InputError, match="image 2 with no patch"):
        score_tokens(tokens, valid=bad)


# --- GeometryPool ---------------------------------------------------------------------------------
def feed(pool, n, per_image, rng, sizes=((24, 40),), pad_rows=()):
    tokens = synthetic_tokens(n * per_image, META.grid, META.token_dims, rng, pad_rows)
    emb = rng.normal(size=(n * per_image, META.embed_dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    views = [tuple(image_views(*sizes[i % len(sizes)], META.image_size, pool.geometry)) for i in range(n)]
    for i0 in range(0, n, 2):  # two images per batch, as the pipeline would hand them
        rows = slice(i0 * per_image, min(n, i0 + 2) * per_image)
        pool.add([t[rows] for t in tokens], emb[rows], views=views[i0:i0 + 2])
    return tokens, emb, views


@pytest.fixture()
def spy(monkeypatch):
    calls = []

    def recording(layer_tokens, embeddings, **kw):
        calls.append({"n": len(embeddings), "first": np.asarray(layer_tokens[0][:, 1, 0]), **kw})
        return score_tokens(layer_tokens, embeddings, **kw)

    monkeypatch.setattr(score_geometry, "score_tokens", recording)
    return calls


def test_tile_match_any_is_one_pool_without_same_image_pairs(spy):
    n, v = 5, 4
    pool = GeometryPool(META, n, InputGeometry(tiles=TileSpec(2, 2)), "any")
    tokens, _, _ = feed(pool, n, v, np.random.default_rng(2))
    scores = pool.finish()
    assert len(spy) == 1 and spy[0]["n"] == n * v
    exclude = spy[0]["exclude"]
    assert np.array_equal(exclude, same_image_exclude(n, v))
    for i in range(n * v):  # a tile is scored by every tile of the other images, by none of its own image
        assert set(np.flatnonzero(~exclude[i])) - {i} == {j for j in range(n * v) if j // v != i // v}
    assert scores.patch_maps.shape == (n, v, META.grid, META.grid)
    assert pool.name == "tiles_any_squash"


def test_tile_match_aligned_scores_each_tile_position_as_its_own_pool(spy):
    n, v = 5, 4
    pool = GeometryPool(META, n, InputGeometry(tiles=TileSpec(2, 2)), "aligned")
    tokens, emb, _ = feed(pool, n, v, np.random.default_rng(3))
    scores = pool.finish()
    assert len(spy) == v and all(c["n"] == n and c["exclude"] is None for c in spy)
    for p, call in enumerate(spy):  # position p: tiles p, v + p, 2v + p, ... of the image-major rows
        assert np.array_equal(call["first"], tokens[0][p::v, 1, 0].astype(np.float16))
    # per tile position MuSc + RsCIN; an image's scores are the max over its tiles'
    per_pos = [score_tokens([t[p::v] for t in tokens], emb[p::v]) for p in range(v)]
    raw = np.stack([s.image_scores_raw for s in per_pos], axis=1)
    final = np.stack([s.image_scores for s in per_pos], axis=1)
    # the pool keeps float16 tokens (as BatchPool): compare at float16 resolution
    assert np.allclose(scores.image_scores_raw, raw.max(axis=1), atol=2e-3)
    assert np.allclose(scores.image_scores, final.max(axis=1), atol=2e-2)
    assert np.allclose(scores.patch_maps[:, 1], per_pos[1].patch_maps, atol=2e-3)


def test_pad_cells_give_no_score_and_the_map_is_cropped():
    n = 6
    geometry = InputGeometry("pad")
    pool = GeometryPool(META, n, geometry)
    # 16 x 32 images: letterboxed to rows 8..23 of 32, grid rows 1..2 of 4 hold the image
    _, _, views = feed(pool, n, 1, np.random.default_rng(4), sizes=((16, 32),), pad_rows=(0, 3))
    assert views[0][0].valid == (8, 24, 0, 32)
    cells = valid_cells(views[0][0].valid, META.image_size, META.grid)
    assert cells[:, 0].tolist() == [False, True, True, False]
    scores = pool.finish()
    maps = scores.patch_maps
    assert maps.shape == (n, 4, 4)
    assert maps[:, [0, 3]].min() > maps[:, 1:3].max()  # the extreme pad tokens score highest...
    assert np.array_equal(scores.image_scores_raw, maps[:, 1:3].reshape(n, -1).max(axis=1))  # ...but count for nothing
    lo, hi = pool.maps.value_range()
    assert (lo, hi) == (maps[:, 1:3].min(), maps[:, 1:3].max())  # the colour scale ignores the pad
    full = pool.maps.full(0, (16, 32))
    assert full.shape == (16, 32)
    assert np.array_equal(full, view_map(maps[0], views[0][0].valid, META.image_size, (16, 32)))
    assert full.max() <= hi + 1e-6  # nothing of the pad in the map


def test_memory_budget_counts_the_pool_actually_scored():
    geometry = InputGeometry(tiles=TileSpec(4, 4))
    need_any = score_geometry.pool_bytes(META, 100, 16, "any")
    need_aligned = score_geometry.pool_bytes(META, 100, 16, "aligned")
    assert need_any > need_aligned
    budget = need_aligned + (need_any - need_aligned) // 2 + score_geometry.MIN_MSM_BYTES
    assert msm_budget(META, 100, geometry, "aligned", budget) > score_geometry.MIN_MSM_BYTES
    with pytest.raises(InputError) as e:
        msm_budget(META, 100, geometry, "any", budget)
    msg = str(e.value)
    assert "--tiles 4x4 --tile-match any" in msg and "pools of 1600" in msg and "--mem-budget" in msg
    assert "\n" not in msg
    assert msm_budget(META, 100, InputGeometry("pad"), "aligned", 1) == score_geometry.MSM_BUDGET_BYTES  # no tiles


# --- the CLI --------------------------------------------------------------------------------------
def test_score_with_pad_and_tiles_end_to_end(tmp_path, model):
    data = make_category(tmp_path / "cat", n_good=6, defects=("blob",), n_each=2)
    for extra, scorer in ((["--resize", "pad"], "batch_pad"),
                          (["--tiles", "2x2:0.2"], "tiles_aligned_squash"),
                          (["--tiles", "1x2", "--tile-match", "any", "--resize", "pad"], "tiles_any_pad")):
        out = tmp_path / scorer
        assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet",
                     "--batch", "3", *extra]) == 0
        rows = read_csv(out / "scores.csv")
        assert len(rows) == 8 and all(np.isfinite(float(r["image_score"])) for r in rows)
        run = json.loads((out / "run.json").read_text())
        settings = run["settings"]
        assert settings["scorer"] == scorer and settings["resize"] == ("pad" if "pad" in extra else "squash")
        assert settings["tiles"] == (extra[extra.index("--tiles") + 1] if "--tiles" in extra else None)
        assert settings["tile_match"] == ("any" if "any" in extra else "aligned" if "--tiles" in extra else None)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["pixel"]["auroc"] > 0.8 and metrics["image"]["auroc"] > 0.8
        for rel in ("blob/000.png", "good/003.png"):  # heatmaps at the original size
            assert cv2.imread(str(out / "maps" / rel)).shape == cv2.imread(str(data / "test" / rel)).shape


def test_default_geometry_flags_change_nothing(tmp_path, model):
    rng = np.random.default_rng(5)
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(4):
        cv2.imwrite(str(data / f"p{i}.png"), tile(rng, 40, 56))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["score", str(data), "--model", str(model), "--out", str(a), "--quiet"]) == 0
    assert main(["score", str(data), "--model", str(model), "--out", str(b), "--quiet", "--resize", "squash",
                 "--tiles", "1x1"]) == 0
    assert read_csv(a / "scores.csv") == read_csv(b / "scores.csv")
    assert json.loads((b / "run.json").read_text())["settings"]["scorer"] == "batch_score_step"


@pytest.mark.parametrize("args, needle", [
    (["--tiles", "2x"], "--tiles expects RxC"),
    (["--tiles", "0x2"], "R, C >= 1"),
    (["--tiles", "2x2:0.7"], "overlap is a fraction"),
    (["--tile-match", "any"], "--tile-match needs --tiles"),
    (["--tiles", "2x2", "--window", "4"], "batch-mode options"),
    (["--resize", "pad", "--window", "4"], "batch-mode options"),
    (["--tiles", "8x8", "--tile-match", "any", "--mem-budget", "1MiB"], "over the budget"),
])
def test_bad_geometry_flags_exit_2_with_one_line(tmp_path, model, capsys, args, needle):
    rng = np.random.default_rng(6)
    data = tmp_path / "flat"
    data.mkdir()
    for i in range(3):
        cv2.imwrite(str(data / f"p{i}.png"), tile(rng, 40, 40))
    assert main(["score", str(data), "--model", str(model), "--out", str(tmp_path / "o"), "--quiet", *args]) == 2
    assert needle in one_error_line(capsys.readouterr().err)


def test_unknown_resize_is_a_usage_error(tmp_path, model, capsys):
    assert main(["score", str(tmp_path), "--model", str(model), "--out", str(tmp_path / "o"), "--resize", "crop"]) == 2
    assert "'crop' is not one of 'squash', 'pad'" in capsys.readouterr().err


def test_the_slow_warning_counts_the_tiles_pairs():
    from musc_edge.score.folder import ScoreSettings, _warn_if_slow, estimate_score_seconds

    meta = tiny_meta(image_size=224, patch_size=8)
    one = estimate_score_seconds(500, meta, ScoreSettings().params)
    warnings = []
    aligned = _warn_if_slow(ScoreSettings(tiles=TileSpec(2, 2)), meta, 500, warnings)
    assert aligned == pytest.approx(4 * one)
    assert _warn_if_slow(ScoreSettings(tiles=TileSpec(2, 2), tile_match="any"), meta, 500, warnings) == pytest.approx(
        estimate_score_seconds(2000, meta, ScoreSettings().params))
    assert "500 images x 4 tiles (--tile-match any)" in warnings[-1] and "--tile-match aligned" in warnings[-1]
