"""Catch ONNX Runtime quietly running on the CPU when a GPU provider was asked for.

onnxruntime-gpu lists CUDA and TensorRT among its available providers whether or not the machine
has the NVIDIA driver, CUDA and cuDNN. When one of them cannot start, ``InferenceSession`` does not
raise: it logs to stderr (and, for TensorRT, prints an "EP Error" banner to *stdout*) and runs on
what is left, usually the CPU. :func:`check_providers` compares the chain that was asked for with
``session.get_providers()``: an explicit ``--device cuda``/``tensorrt`` that did not get its
provider is a :class:`DeviceError`, ``--device auto`` gets one warning. It is pure, so it is tested
without a GPU; :class:`OrtOutput` captures ORT's messages so the error can quote their cause.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import tempfile
from collections.abc import Sequence

from musc_edge.core.errors import DeviceError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
_DEVICE_OF = {TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}
_LIBRARY = {CUDA: "cuda", TENSORRT: "tensorrt"}  # libonnxruntime_providers_<x>.so / .dll
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_ORT_LOG_LINE = re.compile(r"\[[EWIV]:onnxruntime:")
_REQUIREMENT = re.compile(r"Require (cuDNN [\d.*x]+ and CUDA [\d.*x]+?)\.?(?=\s|$)")


def check_providers(device: str, requested: Sequence[str], loaded: Sequence[str], *, ort_log: str = "",
                    ort_version: str = "") -> str | None:
    """None if the first requested provider is in use; else a warning (auto) or DeviceError (explicit).

    ``requested`` is the chain from ``resolve_providers``, ``loaded`` is ``session.get_providers()``
    (a working TensorRT EP lists CUDA and CPU behind it, so only membership of the first counts),
    ``ort_log`` what ONNX Runtime printed while the session was created, for the likely cause.
    """
    if not requested or requested[0] in loaded:
        return None
    wanted = requested[0]
    # Every GPU provider of the chain that did not start; the last one (CUDA, which TensorRT also
    # needs) usually carries the root cause.
    missing = [p for p in requested if p not in loaded and p != CPU]
    running = loaded[0] if loaded else "nothing"
    ort = f"ONNX Runtime {ort_version}" if ort_version else "ONNX Runtime"
    cause = next((c for c in (likely_cause(ort_log, p) for p in reversed(missing)) if c), None)
    because = f" ({cause})" if cause else ""
    needs = _requirement(ort_log)
    if wanted == TENSORRT and CUDA in loaded:  # the GPU works; only TensorRT's libraries are missing
        install = "install the TensorRT libraries this onnxruntime-gpu was built with"
    else:
        install = ("install TensorRT and " if wanted == TENSORRT else "install ") + \
            f"the NVIDIA driver, CUDA and cuDNN that this onnxruntime-gpu needs{f' ({needs})' if needs else ''}"
    name = (device or "auto").strip().lower()
    if name == "auto":
        slower = " (much slower)" if running == CPU else ""
        goal = "To use TensorRT" if running == CUDA else "To use the GPU"
        return (f"--device auto: {ort} could not start {' or '.join(missing)}{because}; running on "
                f"{running}{slower}. {goal}, {install}; pass --device {_DEVICE_OF.get(running, 'cpu')} "
                "to run there without this warning")
    alternative = "cuda or cpu" if CUDA in loaded else "cpu"
    raise DeviceError(f"--device {'cuda' if name == 'gpu' else name} asked {ort} for {wanted}, but it loaded "
                      f"only {', '.join(loaded) or 'nothing'}{because}; {install}, or use --device {alternative}")


def likely_cause(ort_log: str, provider: str) -> str | None:
    """The reason ORT gave for not starting ``provider``, shortened to one clause, if it gave one.

    Tried in order: the loader error for the provider's shared library (``libcublasLt.so.13: cannot
    open shared object file``), the "EP Error" banner the Python API prints when TensorRT's plugins
    fail to register, then the first ORT log line that names the provider or a CUDA failure.
    """
    text = _ANSI.sub("", ort_log)
    lib = _LIBRARY.get(provider)
    if lib:
        m = re.search(rf"onnxruntime_providers_{lib}\S*\s+with error:\s*(.+)", text)
        if m:
            return _clip(m.group(1))
    if provider == TENSORRT:
        m = re.search(r"EP Error .*?\)\s+(.+?)\s+when using", text, re.S)
        if m:
            return _clip(m.group(1).split(",")[0])
    for line in text.splitlines():
        if _ORT_LOG_LINE.search(line) and (provider in line or "CUDA failure" in line):
            message = line.split("] ", 1)[-1]
            return _clip(re.split(r"(?<=[a-z0-9*])\. ", message)[0])
    return None


def _requirement(ort_log: str) -> str | None:
    """'cuDNN 9.* and CUDA 13.*' from ORT's 'Failed to create CUDAExecutionProvider. Require ...'."""
    m = _REQUIREMENT.search(_ANSI.sub("", ort_log))
    return m.group(1) if m else None


def _clip(text: str, limit: int = 160) -> str:
    text = " ".join(text.split()).rstrip(".")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def strip_ort_noise(text: str) -> str:
    """``text`` without ORT's log lines and "EP Error" banners (anything else is kept)."""
    kept, in_banner = [], False
    for line in text.splitlines(keepends=True):
        plain = _ANSI.sub("", line).strip()
        if plain.startswith("*") and "EP Error" in plain:
            in_banner = True
        if in_banner:
            in_banner = not (plain.startswith("****") and "EP Error" not in plain)
            continue
        if _ORT_LOG_LINE.search(plain) or (not plain and line.strip()):  # a log line, or its colour reset
            continue
        kept.append(line)
    return "".join(kept)


class OrtOutput:
    """Capture what ONNX Runtime prints while a session is created: stderr at the file-descriptor
    level (its C++ logger writes there directly) and Python's ``sys.stdout`` (its "EP Error" banner).

    Used only around session creation with a GPU provider; afterwards :meth:`replay` writes it back,
    optionally without ORT's own lines once they have been summarised in one message. The capture
    is process-wide (fd 2 and ``sys.stdout``): what another thread prints meanwhile is held back
    and replayed with it, so nothing is lost, only delayed.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.stdout = ""
        self.stderr = ""
        self._stack = contextlib.ExitStack()

    @property
    def text(self) -> str:
        """Everything captured, stdout then stderr, without terminal colour codes."""
        return _ANSI.sub("", self.stdout + self.stderr)

    def __enter__(self) -> "OrtOutput":
        if not self.enabled:
            return self
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no usable fd 2 (e.g. pythonw): capture nothing
            self.enabled = False
            return self
        tmp = self._stack.enter_context(tempfile.TemporaryFile())
        os.dup2(tmp.fileno(), 2)

        def restore() -> None:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            self.stderr = tmp.read().decode(errors="replace")

        self._stack.callback(restore)
        buffer = io.StringIO()
        self._stack.callback(lambda: setattr(self, "stdout", buffer.getvalue()))
        self._stack.enter_context(contextlib.redirect_stdout(buffer))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def replay(self, *, drop_ort: bool = False) -> None:
        """Write the captured text back where it was going (without ORT's lines if ``drop_ort``)."""
        out, err = self.stdout, self.stderr
        if drop_ort:
            out, err = strip_ort_noise(out), strip_ort_noise(err)
        if out:
            sys.stdout.write(out)
        if err:
            sys.stderr.write(err)
            sys.stderr.flush()
