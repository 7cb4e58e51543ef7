"""Fixtures of the watch unit tests: a fake clock per test, one tiny ONNX model per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from musc_edge.watch.clock import FakeClock

sys.path.insert(0, str(Path(__file__).parent))
from watch_fakes import tiny_model  # noqa: E402


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    _, m = tiny_model(tmp_path_factory.mktemp("model"))
    yield m
    m.close()
