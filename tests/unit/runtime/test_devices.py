"""--device names mapped onto ONNX Runtime providers, without needing a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from musc_edge.core.errors import DeviceError
from musc_edge.runtime.backends.onnxruntime import resolve_providers

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


def names(providers):
    return [p for p, _ in providers]


@pytest.mark.parametrize("available,expected", [
    ([CPU], [CPU]),
    (["AzureExecutionProvider", CPU], [CPU]),
    ([CUDA, CPU], [CUDA, CPU]),
    ([TRT, CUDA, CPU], [TRT, CUDA, CPU]),
])
def test_auto_prefers_tensorrt_then_cuda_then_cpu(available, expected):
    assert names(resolve_providers("auto", available)) == expected


def test_explicit_choices_keep_slower_fallbacks():
    everything = [TRT, CUDA, CPU]
    assert names(resolve_providers("cpu", everything)) == [CPU]
    assert names(resolve_providers("cuda", everything)) == [CUDA, CPU]
    assert names(resolve_providers("CUDA", everything)) == [CUDA, CPU]
    assert names(resolve_providers("gpu", everything)) == [CUDA, CPU]
    assert names(resolve_providers("tensorrt", everything)) == [TRT, CUDA, CPU]
    assert names(resolve_providers("tensorrt", [TRT, CPU])) == [TRT, CPU]


def test_tensorrt_gets_an_engine_cache_outside_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (_, opts), *_ = resolve_providers("tensorrt", [TRT, CUDA, CPU])
    assert opts["trt_engine_cache_enable"] is True
    assert Path(opts["trt_engine_cache_path"]) == tmp_path / "cache" / "musc-edge" / "trt"
    assert opts["trt_fp16_enable"] is False
    (_, opts), *_ = resolve_providers("tensorrt", [TRT, CPU], trt_cache_dir=tmp_path / "c", trt_fp16=True)
    assert opts["trt_engine_cache_path"] == str(tmp_path / "c") and opts["trt_fp16_enable"] is True


@pytest.mark.parametrize("device,available,match", [
    ("cuda", [CPU], "CUDAExecutionProvider"),
    ("tensorrt", [CUDA, CPU], "TensorrtExecutionProvider"),
])
def test_unavailable_choice_lists_what_is_there(device, available, match):
    with pytest.raises(DeviceError, match=match) as info:
        resolve_providers(device, available)
    text = str(info.value)
    assert "available devices: auto" in text and CPU in text and "\n" not in text


def test_unknown_device_names_the_choices():
    with pytest.raises(DeviceError, match="auto, cpu, cuda, tensorrt"):
        resolve_providers("tpu", [CPU])


def test_no_usable_provider():
    with pytest.raises(DeviceError, match="none of"):
        resolve_providers("auto", ["AzureExecutionProvider"])
