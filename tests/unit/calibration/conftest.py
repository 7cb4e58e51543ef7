"""Fixtures for the calibration tests: the runtime's tiny ONNX model and small image folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from musc_edge.runtime.testing import make_tiny_model, tiny_meta

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 64 x 64 patchify model (two tapped layers) with musc-edge metadata."""
    meta = tiny_meta(image_size=64, patch_size=8, token_dims=(16, 24), embed_dim=12)
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.onnx", meta=meta)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 40-image MTD sample (29 good, 11 defective, masks) shipped in examples/."""
    if not SAMPLE.is_dir():
        pytest.fail(f"examples/mtd_sample missing at {SAMPLE}")
    return SAMPLE


def copy_images(src: Path, dst: Path, n: int) -> Path:
    """Copy the first ``n`` images of ``src`` (recursively) flat into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in sorted(src.rglob("*.jpg"))[:n]:
        shutil.copy(p, dst / f"{p.parent.name}_{p.name}")
    return dst
