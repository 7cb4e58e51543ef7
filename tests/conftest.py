"""Shared test fixtures: paths to ../shared (fixtures, MTD data) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MUSC_EDGE_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures"
MTD = SHARED / "data" / "mtd" / "magnetic_tile"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"../shared not found at {SHARED}: set MUSC_EDGE_SHARED")
    return SHARED


@pytest.fixture(scope="session")
def fixtures_dir(shared_dir: Path) -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def mtd_dir(shared_dir: Path) -> Path:
    return MTD
