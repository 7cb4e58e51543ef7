"""Choosing where the scoring runs (``--score-device``): the rules and their one-line errors, on
any machine (CuPy is replaced by small stand-ins where its absence or failure is the point)."""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest

from musc_edge.core.device import CPU, resolve_device
from musc_edge.core.errors import DeviceError, InputError


def test_cpu_is_numpy():
    dev = resolve_device("cpu")
    assert dev is CPU and not dev.is_gpu and dev.free_bytes() is None
    x = np.arange(3.0)
    assert dev.to_host(dev.asarray(x)) is not None and dev.asarray(x).__class__ is np.ndarray


def test_unknown_names_are_refused():
    with pytest.raises(InputError, match="--score-device must be one of cpu, cuda, auto"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="--precision must be one of exact, fast"):
        resolve_device("cpu", "half")


def test_fast_needs_the_gpu():
    with pytest.raises(InputError, match="--precision fast needs --score-device cuda"):
        resolve_device("cpu", "fast")


def test_cuda_without_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    with pytest.raises(DeviceError, match=r"needs CuPy, which is not installed.*musc-edge\[cuda\].*cupy-cuda12x"):
        resolve_device("cuda")


def broken_cupy(exc: Exception) -> types.ModuleType:
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "13.9.9"

    def count():
        raise exc

    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))
    return cupy


def test_cuda_with_cupy_but_no_gpu_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", broken_cupy(RuntimeError("cudaErrorNoDevice: no CUDA-capable device")))
    with pytest.raises(DeviceError, match="CuPy 13.9.9 is installed but found no usable GPU.*cudaErrorNoDevice"):
        resolve_device("cuda")


def test_auto_falls_back_to_the_cpu_with_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with caplog.at_level(logging.WARNING):
        dev = resolve_device("auto")
    assert dev is CPU
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "scoring on the CPU" in warnings[0].getMessage()


def test_auto_fast_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(DeviceError, match="needs CuPy"):
        resolve_device("auto", "fast")


def test_tf32_override_is_refused_for_exact(monkeypatch):
    cupy = types.ModuleType("cupy")
    cupy.__version__ = "13.9.9"
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1))
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "1")
    with pytest.raises(DeviceError, match="NVIDIA_TF32_OVERRIDE=1 forces TF32"):
        resolve_device("cuda", "exact")


def test_score_tokens_takes_the_device(fixtures_dir):
    """The Python API: device='cpu' (default) and a ScoreDevice give the fixture's numbers."""
    import musc_edge

    with np.load(fixtures_dir / "musc_parity_small.npz") as f:
        fx = {k: f[k] for k in f.files}
    tokens = [fx[k] for k in sorted(k for k in fx if k.startswith("tokens_"))]
    for device in ("cpu", CPU):
        s = musc_edge.score_tokens(tokens, fx["cls"], device=device)
        np.testing.assert_allclose(s.image_scores, fx["image_scores"], rtol=1e-4, atol=1e-6)
