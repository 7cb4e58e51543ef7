"""The backbone registry: entries per MUSC_SPEC 1, lookups, validation of user choices."""

from __future__ import annotations

import pytest

from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import FAMILIES
from musc_edge.export import backbones


def test_builtin_entries_follow_the_spec():
    b16 = backbones.get_spec("vit_b16")
    assert (b16.arch, b16.image_size, b16.patch_size, b16.layers, b16.weights) == (
        "ViT-B-16-quickgelu", 224, 16, (3, 6, 9, 12), "openai")
    assert b16.mean == backbones.CLIP_MEAN and b16.interpolation == "bicubic"
    assert backbones.get_spec("vit_l14_336").layers == (6, 12, 18, 24)
    assert backbones.get_spec("vit_l14_336").image_size == 336
    eff = backbones.get_spec("efficientnet_lite0")
    assert (eff.patch_size, eff.layers, eff.image_size, eff.mean, eff.std, eff.interpolation) == (
        8, (5, 7), 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    assert {"vit_b16", "vit_b32", "vit_l14", "vit_l14_336", "efficientnet_lite0"} <= set(backbones.names())


def test_every_clip_arch_exists_in_open_clip():
    open_clip = pytest.importorskip("open_clip")
    for name in backbones.names():
        spec = backbones.get_spec(name)
        if spec.family == "clip" and spec.arch_cfg is None:
            cfg = open_clip.get_model_config(spec.arch)
            assert cfg is not None, spec.arch
            assert cfg["vision_cfg"]["layers"] == spec.num_blocks
            assert cfg["vision_cfg"]["patch_size"] == spec.patch_size
            assert cfg.get("quick_gelu") is True  # OpenAI weights were trained with QuickGELU
            assert open_clip.get_pretrained_cfg(spec.arch, spec.weights).get("hf_hub")


def test_efficientnet_lite_entries_share_one_builder_and_differ_in_data():
    specs = [backbones.get_spec(f"efficientnet_lite{i}") for i in range(3)]
    assert [(s.arch, s.image_size) for s in specs] == [
        ("efficientnet-lite0", 256), ("efficientnet-lite1", 256), ("efficientnet-lite2", 256)]
    for s in specs:  # the taps and side measured on MTD (docs/export.md "Detection quality")
        assert (s.family, s.model_family, s.patch_size, s.num_blocks, s.layers, s.weights) == (
            "efficientnet", "cnn", 8, 7, (5, 7), "imagenet")
        assert (s.mean, s.std, s.interpolation) == ((0.5,) * 3, (0.5,) * 3, "bilinear")
        assert backbones.resolve_image_size(s, None) == s.image_size  # the default passes its own check
    # Lite2 trained at 260, which the stride-8 token grid cannot take
    with pytest.raises(InputError, match="multiple of 8"):
        backbones.resolve_image_size(specs[2], 260)


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ModelError) as e:
        backbones.get_spec("vit_h14")
    msg = str(e.value)
    assert "vit_h14" in msg
    for name in backbones.names():
        assert name in msg


def test_layers_are_validated():
    spec = backbones.get_spec("vit_b16")
    assert backbones.resolve_layers(spec, None) == (3, 6, 9, 12)
    assert backbones.resolve_layers(spec, (2, 4)) == (2, 4)
    with pytest.raises(InputError, match="out of range.*12 blocks"):
        backbones.resolve_layers(spec, (3, 13))
    with pytest.raises(InputError, match="increasing"):
        backbones.resolve_layers(spec, (6, 3))
    with pytest.raises(InputError, match="duplicates"):
        backbones.resolve_layers(spec, (3, 3))


def test_image_size_must_fit_the_patch_grid():
    spec = backbones.get_spec("vit_b16")
    assert backbones.resolve_image_size(spec, None) == 224
    assert backbones.resolve_image_size(spec, 512) == 512
    with pytest.raises(InputError, match="multiple of 16"):
        backbones.resolve_image_size(spec, 250)
    with pytest.raises(InputError, match="multiple of 16"):
        backbones.resolve_image_size(spec, 16)
    assert spec.grid(512) == 32


def test_register_rejects_an_unknown_family():
    with pytest.raises(ValueError, match="family"):
        backbones.register(backbones.BackboneSpec(
            name="x", family="nope", arch="x", image_size=32, patch_size=8, num_blocks=1,
            layers=(1,), weights="none"))
    assert "x" not in backbones.names()


def test_every_entry_has_a_model_family_from_its_builder():
    for name in backbones.names():
        spec = backbones.get_spec(name)
        assert spec.model_family == backbones.MODEL_FAMILIES[spec.family] in FAMILIES, name
    assert backbones.get_spec("vit_b16").model_family == "vit"
    assert backbones.get_spec("efficientnet_lite0").model_family == "cnn"


def test_built_metadata_carries_the_model_family():
    spec = backbones.get_spec("efficientnet_lite0")
    built = backbones.BuiltBackbone(spec=spec, module=None, weights_tag="imagenet", image_size=224, layers=(3, 5),
                                    token_dims=(40, 112), embed_dim=1280, embedding_layer=7)
    assert built.meta(17).family == "cnn"


def test_a_new_vit_builder_family_is_one_line_per_map(monkeypatch):
    # a DINO builder: its entries say "vit" without being named vit_*, and get ViT wording
    monkeypatch.setitem(backbones.FAMILY_BUILDERS, "dino", "musc_edge.export.dino:build")
    monkeypatch.setitem(backbones.MODEL_FAMILIES, "dino", "vit")
    spec = backbones.BackboneSpec(name="dino_vits8", family="dino", arch="vit_small_patch8", image_size=224,
                                  patch_size=8, num_blocks=12, layers=(3, 6, 9, 12), weights="random")
    try:
        backbones.register(spec)
        assert backbones.get_spec("dino_vits8").model_family == "vit"
        with pytest.raises(InputError, match="12 blocks"):
            backbones.resolve_layers(spec, (13,))
    finally:
        backbones.unregister("dino_vits8")


def test_register_rejects_a_builder_family_without_a_model_family(monkeypatch):
    monkeypatch.setitem(backbones.FAMILY_BUILDERS, "mystery", "somewhere:build")
    with pytest.raises(ValueError, match="'mystery' has no model family in MODEL_FAMILIES"):
        backbones.register(backbones.BackboneSpec(
            name="m", family="mystery", arch="m", image_size=32, patch_size=8, num_blocks=1,
            layers=(1,), weights="none"))
    assert "m" not in backbones.names()
