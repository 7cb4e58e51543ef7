"""Export-test fixtures: a tiny CLIP ViT registered for the session so exports take a second."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("open_clip")

from musc_edge.export import backbones  # noqa: E402

TINY = "tiny_vit_test"

#: A 4-block ViT (width 32, patch 8) with the ViT-B/16 design: QuickGELU, CLS token, ln_post + proj.
TINY_CFG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_spec():
    spec = backbones.register(backbones.BackboneSpec(
        name=TINY, family="clip", arch="tiny-test-vit", image_size=32, patch_size=8,
        num_blocks=4, layers=(1, 2, 3, 4), weights="openai", summary="test-only tiny ViT", arch_cfg=TINY_CFG))
    yield spec
    backbones.unregister(TINY)
