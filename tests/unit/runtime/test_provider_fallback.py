"""A GPU provider that ONNX Runtime could not start: error for an explicit --device, warning for auto.

onnxruntime-gpu on a machine without the NVIDIA driver/CUDA/cuDNN creates the session anyway and
runs it on the CPU. The pure check (``check_providers``) and the wiring in ``open_session`` are
tested here without a GPU, on the log text that onnxruntime-gpu 1.31.1 really printed on such a
machine; the last test runs the real thing where onnxruntime-gpu is installed and skips elsewhere.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from musc_edge.core.errors import DeviceError
from musc_edge.runtime.backends import onnxruntime as ort_backend
from musc_edge.runtime.backends.onnxruntime import open_session, resolve_providers
from musc_edge.runtime.backends.ort_fallback import (OrtOutput, check_providers, likely_cause,
                                                     strip_ort_noise)
from musc_edge.runtime.testing import make_tiny_model, tiny_meta

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"
LIB = "/venv/lib/python3.11/site-packages/onnxruntime/capi"
# What onnxruntime-gpu 1.31.1 printed for [TRT, CUDA, CPU] on a machine with no CUDA libraries
# (stdout banner from the Python API, then the C++ logger on stderr, colour codes included).
BANNER = (
    "*************** EP Error ***************\n"
    "EP Error /onnxruntime_src/onnxruntime/python/onnxruntime_pybind_state.cc:729 void "
    "onnxruntime::python::RegisterTensorRTPluginsAsCustomOps(PySessionOptions&, const "
    "onnxruntime::ProviderOptions&) Please install TensorRT libraries as mentioned in the GPU requirements "
    "page, make sure they're in the PATH or LD_LIBRARY_PATH, and that your GPU is supported.\n"
    " when using ['TensorrtExecutionProvider', 'CUDAExecutionProvider', 'CPUExecutionProvider']\n"
    "Falling back to ['CUDAExecutionProvider', 'CPUExecutionProvider'] and retrying.\n"
    "****************************************\n")
TRT_LIB_LINE = (
    "\x1b[1;31m2026-12-02 10:24:28.309768590 [E:onnxruntime:Default, provider_bridge_ort.cc:2430 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    f"{LIB}/libonnxruntime_providers_tensorrt.so with error: libcublas.so.13: cannot open shared object file: "
    "No such file or directory\n\x1b[m\n")
CUDA_LINES = (
    "\x1b[1;31m2026-12-02 10:24:28.311070221 [E:onnxruntime:Default, provider_bridge_ort.cc:2458 operator()] "
    "/onnxruntime_src/onnxruntime/core/session/provider_bridge_ort.cc:2043 onnxruntime::Provider& "
    "onnxruntime::ProviderLibrary::Get() [ONNXRuntimeError] : 1 : FAIL : Failed to load library "
    f"{LIB}/libonnxruntime_providers_cuda.so with error: libcublasLt.so.13: cannot open shared object file: "
    "No such file or directory\n\x1b[m\n"
    "\x1b[0;93m2026-12-02 10:24:28.311185527 [W:onnxruntime:Default, onnxruntime_pybind_state.cc:1295 "
    "CreateExecutionProviderFactoryInstance] Failed to create CUDAExecutionProvider. Require cuDNN 9.* and "
    "CUDA 13.*. Please install all dependencies as mentioned in the GPU requirements page "
    "(https://onnxruntime.ai/docs/execution-providers/CUDA-ExecutionProvider.html#requirements), make sure "
    "they're in the PATH, and that your GPU is supported.\n\x1b[m\n")
NO_CUDA_LOG = BANNER + TRT_LIB_LINE + CUDA_LINES
REAL_SESSION = ort.InferenceSession


@pytest.mark.parametrize("device,requested,loaded", [
    ("cuda", [CUDA, CPU], [CUDA, CPU]),
    ("tensorrt", [TRT, CUDA, CPU], [TRT, CUDA, CPU]),  # a working TensorRT EP lists CUDA and CPU too
    ("auto", [TRT, CUDA, CPU], [TRT, CUDA, CPU]),
    ("auto", [CPU], [CPU]),
    ("cpu", [CPU], [CPU]),
])
def test_the_provider_asked_for_is_in_use(device, requested, loaded):
    assert check_providers(device, requested, loaded, ort_log=NO_CUDA_LOG) is None


def test_explicit_cuda_on_the_cpu_is_one_line_with_cause_and_fix():
    with pytest.raises(DeviceError) as info:
        check_providers("cuda", [CUDA, CPU], [CPU], ort_log=CUDA_LINES, ort_version="1.31.1")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("--device cuda asked ONNX Runtime 1.31.1 for CUDAExecutionProvider, "
                           "but it loaded only CPUExecutionProvider")
    assert "(libcublasLt.so.13: cannot open shared object file: No such file or directory)" in text
    assert "NVIDIA driver, CUDA and cuDNN" in text and "(cuDNN 9.* and CUDA 13.*)" in text
    assert text.endswith("or use --device cpu")


def test_gpu_alias_is_reported_as_cuda():
    with pytest.raises(DeviceError, match=r"^--device cuda asked"):
        check_providers("GPU", [CUDA, CPU], [CPU])


def test_explicit_tensorrt_is_an_error_even_when_cuda_loaded():
    with pytest.raises(DeviceError) as info:
        check_providers("tensorrt", [TRT, CUDA, CPU], [CUDA, CPU], ort_log=BANNER + TRT_LIB_LINE)
    text = str(info.value)
    assert "for TensorrtExecutionProvider, but it loaded only CUDAExecutionProvider, CPUExecutionProvider" in text
    assert "(libcublas.so.13: cannot open shared object file" in text and "install the TensorRT libraries this onnxruntime-gpu was built with" in text
    assert text.endswith("or use --device cuda or cpu")


def test_auto_warns_and_names_what_runs():
    warning = check_providers("auto", [TRT, CUDA, CPU], [CUDA, CPU], ort_log=BANNER + TRT_LIB_LINE)
    assert warning is not None and "\n" not in warning
    assert "could not start TensorrtExecutionProvider (libcublas.so.13" in warning
    assert "running on CUDAExecutionProvider." in warning and "slower" not in warning
    assert "To use TensorRT, install the TensorRT libraries" in warning  # the GPU itself works
    assert warning.endswith("pass --device cuda to run there without this warning")


def test_auto_on_the_cpu_names_every_provider_that_failed_and_cudas_cause():
    warning = check_providers("auto", [TRT, CUDA, CPU], [CPU], ort_log=NO_CUDA_LOG, ort_version="1.31.1")
    assert warning is not None
    assert warning.startswith("--device auto: ONNX Runtime 1.31.1 could not start TensorrtExecutionProvider "
                              "or CUDAExecutionProvider (libcublasLt.so.13: cannot open shared object file")
    assert "running on CPUExecutionProvider (much slower)" in warning and "--device cpu" in warning


def test_without_a_log_there_is_no_made_up_cause():
    with pytest.raises(DeviceError) as info:
        check_providers("cuda", [CUDA, CPU], [CPU])
    assert "CPUExecutionProvider; install the NVIDIA driver, CUDA and cuDNN that this onnxruntime-gpu needs, " \
           "or use --device cpu" in str(info.value)


def test_likely_cause_from_each_kind_of_message():
    assert likely_cause(BANNER, TRT) == "Please install TensorRT libraries as mentioned in the GPU requirements page"
    assert likely_cause(NO_CUDA_LOG, TRT) == \
        "libcublas.so.13: cannot open shared object file: No such file or directory"
    warning_only = CUDA_LINES.split("\x1b[m\n", 1)[1]
    assert likely_cause(warning_only, CUDA) == "Failed to create CUDAExecutionProvider"
    assert likely_cause("2026 [E:onnxruntime:Default, x.cc:1 f] CUDA failure 100: no CUDA-capable device is "
                        "detected ; GPU=0", CUDA) == "CUDA failure 100: no CUDA-capable device is detected ; GPU=0"
    assert likely_cause("unrelated text\n", CUDA) is None


def test_strip_ort_noise_keeps_everything_else():
    assert strip_ort_noise("before\n" + NO_CUDA_LOG + "\nafter\n") == "before\n\nafter\n"


def test_ort_output_captures_the_fd_level_stderr_and_python_stdout(capfd):
    with OrtOutput() as output:
        os.write(2, b"from C++\n")
        print("banner")
    assert (output.stderr, output.stdout) == ("from C++\n", "banner\n")
    assert capfd.readouterr() == ("", "")
    output.replay()
    assert capfd.readouterr() == ("banner\n", "from C++\n")
    with OrtOutput(enabled=False) as output:
        os.write(2, b"passes through\n")
    assert output.text == "" and capfd.readouterr().err == "passes through\n"


class _FallbackSession:
    """Stand-in for ``ort.InferenceSession`` on a machine without CUDA: prints what onnxruntime-gpu
    printed there, then runs a real session on the CPU (this build may not know CUDA at all)."""

    def __init__(self, path, sess_options=None, providers=None, provider_options=None):
        print(BANNER, end="")
        os.write(2, (TRT_LIB_LINE + CUDA_LINES).encode())
        os.write(2, b"a line from someone else\n")
        self._session = REAL_SESSION(path, sess_options=sess_options, providers=[CPU])

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def no_cuda(monkeypatch, tmp_path):
    monkeypatch.setattr(ort, "InferenceSession", _FallbackSession)
    monkeypatch.setattr(ort_backend, "_warned", set())
    return make_tiny_model(tmp_path / "tiny.onnx")


def test_open_session_explicit_cuda_raises_and_hides_orts_lines(no_cuda, capfd):
    with pytest.raises(DeviceError, match=r"^--device cuda asked .* \(libcublasLt\.so\.13: "):
        open_session(no_cuda, resolve_providers("cuda", [TRT, CUDA, CPU]), device="cuda")
    out, err = capfd.readouterr()
    assert out == "" and err == "a line from someone else\n"


def test_open_session_auto_warns_once_and_runs(no_cuda, capfd, caplog):
    providers = resolve_providers("auto", [TRT, CUDA, CPU])
    with caplog.at_level(logging.WARNING):
        sessions = [open_session(no_cuda, providers, device="auto") for _ in range(2)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("--device auto: ONNX Runtime")
    out, err = capfd.readouterr()
    assert out == "" and err == "a line from someone else\n" * 2
    s = tiny_meta().image_size
    (embedding,) = sessions[0].run(["embedding"], {"image": np.zeros((1, 3, s, s), np.float32)})
    assert embedding.shape == (1, tiny_meta().embed_dim)


def test_open_session_without_device_checks_nothing_and_passes_orts_lines_on(no_cuda, capfd):
    session = open_session(no_cuda, resolve_providers("cuda", [CUDA, CPU]))
    assert session.get_providers() == [CPU]
    out, err = capfd.readouterr()
    assert "EP Error" in out and "libcublasLt.so.13" in err


@pytest.mark.skipif(CUDA not in ort.get_available_providers(),
                    reason="needs onnxruntime-gpu (CUDAExecutionProvider available)")
def test_real_onnxruntime_gpu_never_runs_an_explicit_gpu_device_on_the_cpu(tmp_path, caplog):
    """Whatever this machine has: what a raw [CUDA, CPU] session gets decides what load_model must do."""
    from musc_edge.runtime.model import load_model

    path = make_tiny_model(tmp_path / "tiny.onnx")
    with OrtOutput():  # keep ORT's own lines out of the test output
        cuda_works = CUDA in ort.InferenceSession(str(path), providers=[CUDA, CPU]).get_providers()
    ort_backend._warned.clear()
    if cuda_works:
        with load_model(path, "cuda") as model:
            assert model.backend.providers[0] == CUDA
    else:
        with pytest.raises(DeviceError, match=r"^--device cuda asked ONNX Runtime .* loaded only CPUExecutionProvider"):
            load_model(path, "cuda")
        with caplog.at_level(logging.WARNING), load_model(path, "auto") as model:
            assert model.backend.providers == (CPU,)
        assert any(r.getMessage().startswith("--device auto: ONNX Runtime") for r in caplog.records)
        # End to end: TensorRT cannot start without CUDA; `score` says so on one line, stdout stays clean.
        data = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile"
        proc = subprocess.run([sys.executable, "-m", "musc_edge", "score", str(data), "--model", str(path),
                               "--device", "tensorrt", "--out", str(tmp_path / "out")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stdout == ""
        assert proc.stderr.startswith("error: --device tensorrt asked ONNX Runtime") and proc.stderr.count("\n") == 1
