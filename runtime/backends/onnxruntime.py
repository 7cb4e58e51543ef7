"""ONNX Runtime backend: device names mapped to execution providers, a session tuned for speed.

``--device`` means the same for every command (``musc_edge/options.py``):
``auto`` = TensorRT > CUDA > CPU among the providers this ONNX Runtime build has; ``cpu``,
``cuda`` and ``tensorrt`` ask for one, with the slower ones behind it as fallbacks for operators
the fast one cannot run. An explicit choice that this build lacks is a :class:`DeviceError` that
lists what is available (``pip install 'musc-edge[gpu]'`` brings CUDA and TensorRT). onnxruntime-gpu
lists CUDA and TensorRT even where the driver, CUDA or cuDNN is missing, and then runs on the CPU
without raising; ``open_session(..., device=...)`` checks the providers the session really got
(``ort_fallback.check_providers``): an explicit choice that did not load is a DeviceError, ``auto``
logs one warning and runs on what loaded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.core.errors import DeviceError, ModelError
from musc_edge.core.meta import ModelMeta

from .base import Backend
from .ort_fallback import CPU, CUDA, TENSORRT, OrtOutput, check_providers

log = logging.getLogger(__name__)
_warned: set[str] = set()

#: Device name -> providers in order of preference (the first one must be available).
DEVICE_PROVIDERS: dict[str, tuple[str, ...]] = {
    "cpu": (CPU,),
    "cuda": (CUDA, CPU),
    "tensorrt": (TENSORRT, CUDA, CPU),
}
DEVICES = ("auto",) + tuple(DEVICE_PROVIDERS)


#: ONNX Runtime is an extra, not a dependency: the CPU and GPU builds are different packages that
#: install into one ``onnxruntime`` folder, so depending on either would clobber the other (on a
#: Jetson, NVIDIA's own ``onnxruntime-gpu`` wheel).
ORT_INSTALL_HINT = ("pip install 'musc-edge[cpu]' (onnxruntime), or 'musc-edge[gpu]' (onnxruntime-gpu) on an "
                    "NVIDIA machine; on a Jetson, NVIDIA's onnxruntime-gpu wheel for its JetPack")
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                     "ort-nightly", "ort-nightly-gpu")
_clash_checked = False


def import_onnxruntime():
    """``onnxruntime``, or a one-line DeviceError saying which extra installs it.

    The first call also warns when more than one ONNX Runtime package is installed: they share
    the ``onnxruntime`` folder, so whichever was installed last has overwritten parts of the
    other (typically: onnxruntime-gpu without its CUDA provider, or a broken import).
    """
    global _clash_checked
    try:
        import onnxruntime as ort
    except ImportError as e:
        present = installed_ort_packages()
        if present:  # installed, but the import fails: typically two packages overwrote each other
            raise DeviceError(f"ONNX Runtime is installed ({', '.join(present)}) but cannot be imported ({e}); "
                              f"reinstall exactly one: {_keep_one(present)}") from None
        raise DeviceError(f"ONNX Runtime is not installed ({e.name or e} is not importable): {ORT_INSTALL_HINT}") from None
    if not _clash_checked:
        _clash_checked = True
        clash = installed_ort_packages()
        if len(clash) > 1:
            log.warning("%s are all installed and overwrite each other's files in one 'onnxruntime' folder; keep "
                        "one: %s", ", ".join(clash), _keep_one(clash))
    return ort


def _keep_one(packages: Sequence[str]) -> str:
    """The commands that leave one ONNX Runtime package (the GPU one if it was among them)."""
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in packages else packages[0]
    return f"pip uninstall -y {' '.join(packages)} && pip install {keep}"


def installed_ort_packages(names: Sequence[str] = ORT_DISTRIBUTIONS) -> list[str]:
    """Which of the ONNX Runtime distributions ``names`` are installed (by package metadata)."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def default_trt_cache_dir() -> Path:
    """Where the TensorRT EP keeps built engines: the user cache, never the working directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "musc-edge" / "trt"


def resolve_providers(device: str, available: Sequence[str], *, trt_cache_dir: str | Path | None = None,
                      trt_fp16: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Map a device name onto ONNX Runtime ``(provider, options)`` pairs, best first.

    Pure function of ``available`` (``onnxruntime.get_available_providers()``) so it can be tested
    without a GPU.
    """
    name = (device or "auto").strip().lower()
    if name == "gpu":
        name = "cuda"
    if name not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        wanted = next((p for p in (TENSORRT, CUDA, CPU) if p in available), None)
        if wanted is None:
            raise DeviceError(f"this ONNX Runtime has none of TensorRT, CUDA, CPU providers "
                              f"(available: {', '.join(available) or 'none'})")
        chain = DEVICE_PROVIDERS[{TENSORRT: "tensorrt", CUDA: "cuda", CPU: "cpu"}[wanted]]
    else:
        chain = DEVICE_PROVIDERS[name]
        if chain[0] not in available:
            usable = [d for d, c in DEVICE_PROVIDERS.items() if c[0] in available]
            raise DeviceError(f"device {name!r} needs {chain[0]}, which this ONNX Runtime lacks "
                              f"(available devices: auto, {', '.join(usable)}; providers: "
                              f"{', '.join(available)}); install onnxruntime-gpu or pick another --device")
    providers: list[tuple[str, dict[str, Any]]] = []
    for p in chain:
        if p not in available:
            continue
        options: dict[str, Any] = {}
        if p == TENSORRT:
            cache = Path(trt_cache_dir) if trt_cache_dir else default_trt_cache_dir()
            options = {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                       "trt_fp16_enable": bool(trt_fp16)}
        providers.append((p, options))
    return providers


def session_options(threads: int | None = None, config: Mapping[str, str] | None = None):
    """Session options tuned for CPU speed: full graph optimisation, sequential execution.

    ``config`` adds ONNX Runtime session config entries (e.g. ``session.intra_op.allow_spinning``
    = ``"0"``). What was measured for ViT-B/16 on CPU (docs/export.md, "Benchmark"): the matrix
    products take ~90% of the run, so ORT's other knobs (spinning, denormals as zero, the fused
    com.microsoft Attention op) change images/s by less than the noise; the defaults stay.
    """
    ort = import_onnxruntime()

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.intra_op_num_threads = int(threads or 0)  # 0 = one per physical core
    so.inter_op_num_threads = 1
    so.log_severity_level = 3  # errors only: keep stderr for our progress bar
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def open_session(path: str | Path, providers: Sequence[tuple[str, dict[str, Any]]] = ((CPU, {}),),
                 threads: int | None = None, optimize: bool = True, config: Mapping[str, str] | None = None,
                 device: str | None = None):
    """``onnxruntime.InferenceSession`` for a file, with a one-line ModelError if it is no model.

    This is the session every command (``score``, ``watch``, ``calibrate``) runs on, and the one
    ``benchmarks/bench_backbone.py`` times as mode ``ort``. With ``device`` (the ``--device`` that
    chose ``providers``), a GPU provider that ONNX Runtime could not start is a DeviceError for an
    explicit device and one logged warning for ``auto``, in place of ORT's own stderr/stdout lines.
    """
    ort = import_onnxruntime()

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; export one with `musc-edge export`")
    so = session_options(threads, config)
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for _, options in providers:
        if "trt_engine_cache_path" in options:
            Path(options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
    names = [p for p, _ in providers]
    session, error = None, None
    # Only a GPU provider makes ORT print while it falls back; a CPU session is created untouched.
    with OrtOutput(enabled=device is not None and any(p != CPU for p in names)) as output:
        try:
            session = ort.InferenceSession(str(path), sess_options=so, providers=names,
                                           provider_options=[o for _, o in providers])
        except Exception as e:  # ORT raises its own Fail/InvalidProtobuf/... classes
            error = e
    if session is None:
        output.replay()
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"ONNX Runtime could not load {path} on {', '.join(names)} "
                         f"({reason[:200]}); is it an ONNX model from `musc-edge export`?") from None
    if device is None:
        return session
    try:
        warning = check_providers(device, names, session.get_providers(), ort_log=output.text,
                                  ort_version=ort.__version__)
    except DeviceError:
        _log_ort_output(output)
        raise
    if warning is None:
        output.replay()
        return session
    _log_ort_output(output)
    if warning not in _warned:  # one warning per process, however many sessions fall back alike
        _warned.add(warning)
        log.warning("%s", warning)
    return session


def _log_ort_output(output: OrtOutput) -> None:
    """ORT's raw fallback lines at debug level (-vv), everything else back where it was going."""
    lines = [line for line in output.text.splitlines() if line.strip()]
    if lines:
        log.debug("ONNX Runtime said while creating the session:\n%s", "\n".join(lines))
    output.replay(drop_ort=True)


class OnnxRuntimeBackend(Backend):
    """A model run by ONNX Runtime on the providers that ``device`` maps to."""

    def __init__(self, path: str | Path, meta: ModelMeta, session) -> None:
        super().__init__(meta)
        self.path = Path(path)
        self.session = session
        self.providers = tuple(session.get_providers())
        self.description = f"onnxruntime {_ort_version()}: {', '.join(self.providers)}"

    def run(self, batch: np.ndarray) -> Mapping[str, np.ndarray]:
        names = list(self.meta.output_names)
        values = self.session.run(names, {self.meta.input_name: batch})
        return dict(zip(names, values))

    def close(self) -> None:
        self.session = None
        super().close()


def _ort_version() -> str:
    ort = import_onnxruntime()

    return ort.__version__
