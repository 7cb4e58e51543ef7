"""Preprocessing and the feature pipeline under an input geometry (--resize pad, --tiles)."""

from __future__ import annotations

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")

from musc_edge.core.types import Features  # noqa: E402
from musc_edge.runtime.geometry import InputGeometry, TileSpec  # noqa: E402
from musc_edge.runtime.pipeline import iter_features, iter_input_batches  # noqa: E402
from musc_edge.runtime.preprocess import (_normalise, input_from_bytes, resize_like_pil,  # noqa: E402
                                          views_from_bytes)
from musc_edge.runtime.testing import tiny_meta  # noqa: E402

META = tiny_meta(image_size=32, patch_size=8)


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


@pytest.fixture()
def colour():
    return np.random.default_rng(0).integers(0, 256, (40, 90, 3), dtype=np.uint8)  # BGR


def test_default_geometry_equals_input_from_bytes(colour):
    for image in (colour, colour[:, :, 0]):
        data = png(image)
        x, hw, views = views_from_bytes(data, META, InputGeometry())
        ref, ref_hw = input_from_bytes(data, META)
        assert x.shape == (1, 3, 32, 32) and hw == ref_hw == (40, 90) and len(views) == 1
        assert np.array_equal(x[0], ref)


def test_pad_keeps_the_aspect_and_the_padding_is_zero_after_normalising(colour):
    x, hw, (view,) = views_from_bytes(png(colour), META, InputGeometry("pad"))
    y0, y1, x0, x1 = view.valid
    assert (x0, x1) == (0, 32) and y1 - y0 == round(40 * 32 / 90) and y0 == (32 - (y1 - y0)) // 2
    assert not x[0, :, :y0].any() and not x[0, :, y1:].any()  # the normalisation mean: exactly 0
    rgb = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    expected = _normalise(resize_like_pil(rgb, 32, y1 - y0, META.interpolation), META)
    assert np.array_equal(x[0, :, y0:y1], expected)


def test_tiles_smaller_than_the_model_are_enlarged(colour):
    geometry = InputGeometry(tiles=TileSpec(2, 3))
    x, hw, views = views_from_bytes(png(colour), META, geometry)
    assert x.shape == (6, 3, 32, 32) and len(views) == 6
    rgb = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    for k, v in enumerate(views):
        y0, y1, x0, x1 = v.box
        assert (y1 - y0, x1 - x0) == (20, 30)  # 40 x 90 in 2 x 3: each tile below 32 px, upscaled
        assert np.array_equal(x[k], _normalise(resize_like_pil(rgb[y0:y1, x0:x1], 32, 32, META.interpolation), META))


def test_gray_tiles_take_the_one_channel_path_with_the_same_pixels(colour):
    gray = colour[:, :, 0]
    geometry = InputGeometry("pad", TileSpec(2, 2, 0.2))
    x_gray, _, _ = views_from_bytes(png(gray), META, geometry)
    x_rgb, _, _ = views_from_bytes(png(np.repeat(gray[:, :, None], 3, axis=2)), META, geometry)
    assert np.array_equal(x_gray, x_rgb)


def test_an_image_too_small_for_the_tiles_is_skipped_with_its_reason(tmp_path):
    (tmp_path / "tiny.png").write_bytes(png(np.zeros((3, 3), np.uint8)))
    (tmp_path / "ok.png").write_bytes(png(np.zeros((20, 20), np.uint8)))
    batches = list(iter_input_batches([tmp_path / "tiny.png", tmp_path / "ok.png"], META, 8,
                                      geometry=InputGeometry(tiles=TileSpec(4, 4))))
    skipped = [s for b in batches for s in b.skipped]
    assert len(skipped) == 1 and "cannot be cut into 4x4 tiles" in skipped[0][1]
    assert sum(len(b.paths) for b in batches) == 1


class _Counting:
    """A stand-in extractor: records each call's batch size; token row k = input k's mean pixel."""

    def __init__(self, meta):
        self.meta, self.calls = meta, []

    def __call__(self, batch):
        self.calls.append(len(batch))
        g = self.meta.grid
        value = batch.reshape(len(batch), -1).mean(axis=1)
        tokens = tuple(np.repeat(value[:, None, None], 1 + g * g, axis=1) * np.ones((1, 1, c)) for c in
                       self.meta.token_dims)
        return Features(tokens=tokens, embedding=np.repeat(value[:, None], self.meta.embed_dim, axis=1))


def test_batches_hold_whole_images_and_the_model_never_sees_more_than_batch_inputs(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(5):
        p = tmp_path / f"{i}.png"
        p.write_bytes(png(rng.integers(0, 256, (24, 40), dtype=np.uint8)))
        paths.append(p)
    geometry = InputGeometry(tiles=TileSpec(2, 2))
    # batch 8: two images (8 inputs) per batch
    batches = list(iter_input_batches(paths, META, 8, geometry=geometry))
    assert [len(b.paths) for b in batches] == [2, 2, 1] and [len(b.inputs) for b in batches] == [8, 8, 4]
    assert all(len(v) == 4 for b in batches for v in b.views)
    # batch 3 < 4 tiles: one image per batch, its 4 tiles run as 3 + 1
    extractor = _Counting(META)
    out = list(iter_features(paths, extractor, 3, geometry=geometry))
    assert [len(b.paths) for b in out] == [1] * 5 and extractor.calls == [3, 1] * 5
    direct = iter_input_batches(paths, META, 3, geometry=geometry)
    for b, inputs in zip(out, direct):
        assert len(b.features) == 4
        assert np.allclose(b.features.embedding[:, 0], inputs.inputs.reshape(4, -1).mean(axis=1))
