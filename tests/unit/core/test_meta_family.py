"""ModelMeta's family and schema: old files migrate on read, new ones round-trip, newer ones are refused.

The first-release metadata below is written out by hand, key by key as that release's
``to_props`` / engine sidecar wrote it (no ``schema``, no ``family``), so these tests do not
derive the "old" format from the code under test.
"""

from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest

from musc_edge.core.errors import ModelError
from musc_edge.core.meta import FAMILIES, PREFIX, SCHEMA, ModelMeta

ROOT = Path(__file__).resolve().parents[3]

#: ONNX metadata_props of a ViT-B/16 export by the first release (schema 1).
V1_VIT_PROPS = {
    "musc_edge.backbone": "vit_b16", "musc_edge.weights": "openai", "musc_edge.image_size": "224",
    "musc_edge.patch_size": "16", "musc_edge.grid": "14", "musc_edge.layers": "[3, 6, 9, 12]",
    "musc_edge.token_dims": "[768, 768, 768, 768]", "musc_edge.embed_dim": "512",
    "musc_edge.mean": "[0.48145466, 0.4578275, 0.40821073]", "musc_edge.std": "[0.26862954, 0.26130258, 0.27577711]",
    "musc_edge.interpolation": "bicubic", "musc_edge.version": "0.1.0", "musc_edge.opset": "17",
    "musc_edge.input_name": "image",
    # extras export wrote beside the metadata (ignored by from_props)
    "musc_edge.embedding_layer": "12", "musc_edge.num_blocks": "12", "musc_edge.arch": "ViT-B-16-quickgelu",
}
#: The JSON sidecar of an EfficientNet-Lite0 engine built by the first release.
V1_CNN_SIDECAR = {
    "backbone": "efficientnet_lite0", "weights": "imagenet", "image_size": 224, "patch_size": 8, "grid": 28,
    "layers": [3, 5], "token_dims": [40, 112], "embed_dim": 1280, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear", "version": "0.1.0", "opset": 17, "input_name": "image",
    "tensorrt_version": "10.13.0", "precision": "fp16", "max_batch": 8,
}


def vit_meta(**changes) -> ModelMeta:
    meta = ModelMeta(backbone="vit_b16", family="vit", weights="openai", image_size=224, patch_size=16, grid=14,
                     layers=(3, 6, 9, 12), token_dims=(768,) * 4, embed_dim=512,
                     mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                     version="0.1.0")
    return replace(meta, **changes)


# ---------------------------------------------------------------------------------- old files
def test_first_release_onnx_props_load_as_a_vit():
    meta = ModelMeta.from_props(V1_VIT_PROPS, source="old.onnx")
    assert meta.family == "vit"
    assert meta == vit_meta()  # nothing else changed on the way


def test_first_release_engine_sidecar_loads_as_a_cnn():
    meta = ModelMeta.from_dict(V1_CNN_SIDECAR, source="old.engine.json")
    assert (meta.backbone, meta.family, meta.grid, meta.token_dims) == ("efficientnet_lite0", "cnn", 28, (40, 112))


@pytest.mark.parametrize("name,family", [("vit_b32", "vit"), ("vit_l14", "vit"), ("vit_l14_336", "vit"),
                                         ("efficientnet_lite0", "cnn")])
def test_every_first_release_backbone_gets_its_family(name, family):
    props = {**V1_VIT_PROPS, "musc_edge.backbone": name}
    assert ModelMeta.from_props(props).family == family


def test_first_release_metadata_with_an_unknown_backbone_is_refused_not_guessed():
    props = {**V1_VIT_PROPS, "musc_edge.backbone": "my_custom_net"}
    with pytest.raises(ModelError) as e:
        ModelMeta.from_props(props, source="custom.onnx")
    msg = str(e.value)
    assert "custom.onnx" in msg and "'my_custom_net'" in msg and "musc-edge export" in msg
    assert "\n" not in msg


def test_migrated_metadata_is_written_back_in_the_current_schema():
    props = ModelMeta.from_props(V1_VIT_PROPS).to_props()
    assert props[PREFIX + "schema"] == str(SCHEMA) and props[PREFIX + "family"] == "vit"


# --------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("family", FAMILIES)
def test_props_round_trip_keeps_the_family(family):
    meta = vit_meta(backbone="dino_vits8", family=family)
    props = meta.to_props()
    assert props[PREFIX + "schema"] == "2" and props[PREFIX + "family"] == family
    assert all(isinstance(v, str) for v in props.values())  # ONNX metadata_props are strings
    assert ModelMeta.from_props(props) == meta


def test_dict_round_trip_through_json():
    meta = vit_meta(family="cnn", interpolation="bilinear")
    d = json.loads(json.dumps(meta.to_dict()))
    assert d["schema"] == 2 and d["family"] == "cnn"
    assert ModelMeta.from_dict(d) == meta


def test_schema_is_not_a_constructor_argument():
    # a ModelMeta in memory is always the current layout; only files carry older ones
    assert vit_meta().schema == SCHEMA == 2
    fields = {k: v for k, v in vit_meta().to_dict().items() if k != "schema"}
    with pytest.raises(TypeError):
        ModelMeta(schema=1, **fields)  # type: ignore[call-arg]


# ----------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("newer", [3, "3", 17])
def test_a_newer_schema_is_refused_naming_both_versions(newer):
    d = {**vit_meta().to_dict(), "schema": newer}
    with pytest.raises(ModelError) as e:
        ModelMeta.from_dict(d, source="future.onnx")
    msg = str(e.value)
    assert f"schema {int(newer)}" in msg and f"schema {SCHEMA} at most" in msg and "upgrade musc-edge" in msg
    assert msg.startswith("future.onnx") and "\n" not in msg


def test_a_newer_schema_is_refused_before_its_keys_are_read():
    # a future layout may drop or rename keys: the version message must come first
    with pytest.raises(ModelError, match="schema 3"):
        ModelMeta.from_props({PREFIX + "schema": "3", PREFIX + "backbone": "x"})


@pytest.mark.parametrize("bad", ["two", "", 0, -1])
def test_a_malformed_schema_is_refused(bad):
    with pytest.raises(ModelError, match="malformed musc-edge metadata: schema"):
        ModelMeta.from_dict({**vit_meta().to_dict(), "schema": bad})


def test_schema_2_without_a_family_is_refused():
    d = vit_meta().to_dict()
    del d["family"]
    with pytest.raises(ModelError, match="schema 2 has no 'family'"):
        ModelMeta.from_dict(d, source="m.onnx")


def test_an_unknown_family_is_refused_from_files_and_code():
    with pytest.raises(ModelError, match=r"m.onnx: unknown model family 'swin'; musc-edge knows vit, cnn"):
        ModelMeta.from_dict({**vit_meta().to_dict(), "family": "swin"}, source="m.onnx")
    with pytest.raises(ModelError, match="unknown model family 'ViT'"):
        vit_meta(family="ViT")


# -------------------------------------------------------------------------- decisions by family
def test_int8_default_mode_follows_the_family_not_the_name():
    pytest.importorskip("onnx")
    from musc_edge.calibration.quantize import DEFAULT_MODES, default_mode

    assert default_mode(vit_meta(backbone="dino_vits8", family="vit")) == "dynamic"
    # a ViT-sounding name with a CNN family gets the CNN recipe: the name decides nothing
    assert default_mode(vit_meta(backbone="vit_b16", family="cnn")) == "static-cnn"
    assert set(DEFAULT_MODES) == set(FAMILIES)  # a new family must choose its recipe


def _name_switches(tree: ast.AST) -> list[int]:
    """Lines where code branches on a backbone name: ``x.backbone.startswith(...)`` or
    ``x.backbone == / != / in ...`` (either side)."""
    def is_backbone(node: ast.AST) -> bool:
        return isinstance(node, ast.Attribute) and node.attr == "backbone"

    hits = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("startswith", "endswith") and is_backbone(node.func.value)):
            hits.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(is_backbone(n) for n in [node.left, *node.comparators]):
            hits.append(node.lineno)
    return hits


def test_the_detector_sees_the_old_name_switch():
    assert _name_switches(ast.parse('m = "dynamic" if meta.backbone.startswith("vit") else "static-cnn"')) == [1]
    assert _name_switches(ast.parse('if spec.backbone == "vit_b16": pass')) == [1]
    assert _name_switches(ast.parse("same = (a.backbone, a.grid) == (b.backbone, b.grid)")) == []


def test_no_package_code_branches_on_a_backbone_name():
    found = []
    for folder in ("musc_edge", "export", "runtime", "calibration"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            found += [f"{path.relative_to(ROOT)}:{line}" for line in _name_switches(ast.parse(path.read_text()))]
    assert not found, f"decide by ModelMeta.family, not the backbone name: {found}"
