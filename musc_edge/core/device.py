"""Where the scoring runs: numpy on the CPU, or CuPy on an NVIDIA GPU (``--score-device``).

The algorithm (LNAMD, the pair kernel, MSM's interval means, the map mean, RsCIN) is written
against the Python array API, so the device is only a choice of array library: a
:class:`ScoreDevice` uploads inputs into it and brings the final maps and scores back. CuPy is
imported only when a GPU is asked for (extra ``[cuda]``: ``cupy-cuda12x``, or ``cupy-cuda13x``
for CUDA 13; on a Jetson, CuPy's JetPack build).

Precision (``exact`` promises the CPU's numbers): cuBLAS may run float32 products on TF32 tensor
cores, which keep 10 mantissa bits. CuPy does so only when ``CUPY_TF32`` is set; for ``exact``
we also pin its float32 compute type to plain FP32, and refuse to start when
``NVIDIA_TF32_OVERRIDE`` (which forces TF32 under every library) asks for TF32. ``fast`` makes
the product that *chooses* each nearest patch an FP16 tensor-core product (FP32 accumulation);
the chosen patch's distance is still recomputed in FP32 (:mod:`musc_edge.core.pairs`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

import array_api_compat.numpy
import numpy as np

from .errors import DeviceError, InputError

log = logging.getLogger(__name__)

SCORE_DEVICES = ("cpu", "cuda", "auto")
PRECISIONS = ("exact", "fast")
CUDA_HINT = ("pip install 'musc-edge[cuda]' (cupy-cuda12x; cupy-cuda13x for a CUDA 13 driver; on a Jetson, "
             "CuPy's JetPack wheel)")


@dataclass(frozen=True)
class ScoreDevice:
    """An array library to score in.

    name: ``cpu`` or ``cuda:N``. xp: its array API namespace (``array_api_compat.numpy`` or
    ``array_api_compat.cupy``, so the same calls work on numpy 1.x too). lib: the library itself
    (numpy or cupy), for what the standard has no word for (device memory, copies to the host).
    """

    name: str
    xp: Any
    lib: Any
    precision: str = "exact"
    info: dict = field(default_factory=dict, compare=False)

    @property
    def is_gpu(self) -> bool:
        return self.name != "cpu"

    def asarray(self, x: Any, dtype: Any = None) -> Any:
        """``x`` in this device's memory (one upload from the host; no copy if it is there already)."""
        return self.xp.asarray(x, dtype=dtype)

    def to_host(self, x: Any) -> np.ndarray:
        """A numpy copy of a device array (a numpy array is returned as it is)."""
        if isinstance(x, np.ndarray) or not self.is_gpu:
            return np.asarray(x)
        return self.lib.asnumpy(x)

    def free_bytes(self) -> int | None:
        """Free device memory (GPU), or None on the CPU (the host budget applies there)."""
        if not self.is_gpu:
            return None
        free, _total = self.lib.cuda.runtime.memGetInfo()
        return int(free)

    def synchronize(self) -> None:
        if self.is_gpu:
            self.lib.cuda.get_current_stream().synchronize()


CPU = ScoreDevice("cpu", array_api_compat.numpy, np)


def _import_cupy() -> Any:
    try:
        import cupy
    except ImportError as e:
        raise DeviceError(f"--score-device cuda needs CuPy, which is not installed ({e}): {CUDA_HINT}") from None
    return cupy


def _cuda_device(precision: str) -> ScoreDevice:
    cupy = _import_cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError, or a missing libcudart/driver
        raise DeviceError(f"--score-device cuda: CuPy {cupy.__version__} is installed but found no usable GPU "
                          f"({type(e).__name__}: {e}); check the NVIDIA driver (nvidia-smi) and that the CuPy "
                          f"wheel matches its CUDA major ({CUDA_HINT})") from None
    if count < 1:
        raise DeviceError(f"--score-device cuda: CuPy {cupy.__version__} sees no GPU (device count 0)")
    if precision == "exact":
        _pin_fp32(cupy)
    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    info = {"gpu": name, "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
            "compute_capability": dev.compute_capability, "tf32": os.environ.get("CUPY_TF32", "0")}
    import array_api_compat.cupy as xp_cupy

    return ScoreDevice(f"cuda:{dev.id}", xp_cupy, cupy, precision, info)


def _pin_fp32(cupy: Any) -> None:
    """Plain FP32 products for ``exact`` (no TF32), whatever the environment says."""
    override = os.environ.get("NVIDIA_TF32_OVERRIDE")
    if override not in (None, "", "0"):
        raise DeviceError(f"NVIDIA_TF32_OVERRIDE={override} forces TF32 products, which --precision exact "
                          "cannot give the CPU's numbers with; unset it or use --precision fast")
    try:
        from cupy._core import _routines_linalg as linalg

        linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_FP32)
    except (ImportError, AttributeError) as e:  # a CuPy without the knob: CUPY_TF32 is then all there is
        if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
            raise DeviceError(f"CUPY_TF32 is set and this CuPy cannot be told to use FP32 products ({e}); "
                              "unset CUPY_TF32 for --precision exact") from None


def resolve_device(name: str | ScoreDevice | None = "cpu", precision: str = "exact") -> ScoreDevice:
    """The :class:`ScoreDevice` for ``--score-device`` (``cpu``, ``cuda``, ``auto``) and ``--precision``.

    ``cuda`` without CuPy or without a usable GPU is a :class:`DeviceError` naming what is missing;
    ``auto`` uses the GPU when CuPy finds one and otherwise the CPU, with one warning.
    ``fast`` needs the GPU: its FP16 products only pay on tensor cores.
    """
    if isinstance(name, ScoreDevice):
        return name
    name = (name or "cpu").lower()
    if name not in SCORE_DEVICES:
        raise InputError(f"--score-device must be one of {', '.join(SCORE_DEVICES)}, got {name!r}")
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if name == "cpu":
        if precision == "fast":
            raise InputError("--precision fast needs --score-device cuda (FP16 tensor-core products); "
                             "the CPU scores exactly")
        return CPU
    if name == "cuda":
        return _cuda_device(precision)
    try:
        return _cuda_device(precision)
    except DeviceError as e:
        if precision == "fast":
            raise
        log.warning("--score-device auto: scoring on the CPU (%s)", e)
        return CPU
