"""EfficientNet-Lite0: the packaged ImageNet weights load strictly and classify; taps match the fixture."""

from __future__ import annotations

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from musc_edge.core.errors import InputError, ModelError
from musc_edge.export import backbones
from musc_edge.export.efficientnet import EfficientNetLite, build, packaged_weights_path, same_padding
from musc_edge.export.onnx import export_onnx
from musc_edge.export.weights import load_state_dict, resolve_weights
from musc_edge.core.meta import ModelMeta

SPEC = backbones.get_spec("efficientnet_lite0")


@pytest.fixture(scope="module")
def lite0():
    return build(SPEC, resolve_weights(SPEC, None), 224, (3, 5))


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) -> (3, 224, 224), bilinear resize, mean/std 0.5 (the spec's preprocessing)."""
    x = cv2.resize(rgb, (224, 224), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    return (torch.from_numpy(x).permute(2, 0, 1) - 0.5) / 0.5


def test_same_padding_is_tensorflows():
    assert same_padding(224, 3, 2) == (0, 1)   # even size, stride 2: the extra pixel goes after
    assert same_padding(56, 5, 2) == (1, 2)
    assert same_padding(28, 5, 1) == (2, 2)
    assert same_padding(7, 1, 1) == (0, 0)


def test_packaged_state_dict_loads_strictly():
    sd = load_state_dict(packaged_weights_path())
    net = EfficientNetLite()
    net.load_state_dict(sd, strict=True)  # raises on any missing/unexpected/misshapen key
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(4.65e6, rel=0.02)


def test_chelsea_is_a_cat(lite0):
    skimage_data = pytest.importorskip("skimage.data")
    x = _normalise(skimage_data.chelsea())[None]
    with torch.no_grad():
        probs = lite0.module.net(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"top-1 class {top} is not a cat"
    assert float(probs[281:286].sum()) > 0.5


def test_taps_shapes_and_zero_cls(lite0):
    with torch.no_grad():
        t0, t1, emb = lite0.module(torch.randn(2, 3, 224, 224))
    assert t0.shape == (2, 1 + 28 * 28, 40) and t1.shape == (2, 1 + 28 * 28, 112) and emb.shape == (2, 1280)
    assert torch.count_nonzero(t0[:, 0]) == 0 and torch.count_nonzero(t1[:, 0]) == 0
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert lite0.token_dims == (40, 112) and lite0.embed_dim == 1280 and lite0.grid == 28


def test_tokens_match_the_effnet_fixture(lite0, fixtures_dir, mtd_dir):
    """The shared fixture's 16 MTD images: our taps reproduce its float16 tokens and embeddings."""
    ref = np.load(fixtures_dir / "musc_parity_effnet_mtd.npz")
    images = []
    for name in ref["names"]:
        bgr = cv2.imread(str(mtd_dir / str(name)), cv2.IMREAD_COLOR)
        assert bgr is not None, name
        images.append(_normalise(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)))
    with torch.no_grad():
        t0, t1, emb = (t.numpy() for t in lite0.module(torch.stack(images)))
    for ours, key in ((t0, "tokens_0"), (t1, "tokens_1")):
        theirs = ref[key].astype(np.float32)
        assert ours.shape == theirs.shape
        scale = np.abs(theirs).max()
        assert np.abs(ours - theirs).max() < 2e-3 * scale, key  # float16 storage: ~5e-4 relative
    np.testing.assert_allclose(emb, ref["cls"], atol=1e-4)


def test_shallow_stage_and_odd_size_are_refused():
    with pytest.raises(InputError, match="stages 3-7"):
        build(SPEC, resolve_weights(SPEC, "random"), 224, (2, 5))
    with pytest.raises(InputError, match="multiple of 8"):
        build(SPEC, resolve_weights(SPEC, "random"), 228, (3, 5))


def test_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "vit.pt"
    torch.save({"conv1.weight": torch.zeros(4, 3, 16, 16)}, path)
    with pytest.raises(ModelError, match="not an EfficientNet-Lite0 state dict"):
        build(SPEC, resolve_weights(SPEC, str(path)), 224, (3, 5))


def test_export_parity_and_metadata(lite0, tmp_path):
    result = export_onnx(lite0, tmp_path / "lite0.onnx")
    assert max(result.max_abs_diff.values()) < 1e-3
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert (meta.backbone, meta.weights, meta.patch_size, meta.grid, meta.layers, meta.token_dims) == (
        "efficientnet_lite0", "imagenet", 8, 28, (3, 5), (40, 112))
    assert (meta.mean, meta.std, meta.interpolation, meta.embed_dim) == ((0.5,) * 3, (0.5,) * 3, "bilinear", 1280)
    assert meta.family == "cnn"
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        ref = lite0.module(x)
    for got, want in zip(sess.run(None, {"image": x.numpy()}), ref):
        np.testing.assert_allclose(got, want.numpy(), atol=5e-4, rtol=1e-4)
