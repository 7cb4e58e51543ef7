"""Build a TensorRT engine from an exported ONNX backbone (TensorRT 10 and 11).

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``, ``INT8``,
``OBEY_PRECISION_CONSTRAINTS``) and the implicit INT8 calibrators. We therefore build the same
way on both versions: the precision lives *in the ONNX graph* and the network is strongly typed
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` on 10; always on in 11):

``fp16``
    The graph is converted to FP16 before the build (ONNX Runtime's ``float16`` converter, I/O
    kept FP32), except the ops that need range or accumulation precision, which stay FP32:
    LayerNormalization, Softmax and the reductions/divisions of decomposed norms and of the
    embedding's L2 normalisation (:data:`FP32_OPS`).
``int8``
    Explicit quantization: a graph with Q/DQ nodes. An ONNX file that already has them (from
    ``musc-edge calibrate --mode trt`` or ModelOpt) is built as is; otherwise ``calib_dir``
    images calibrate it here, by default (``quantizer="auto"`` or ``"ort"``) with our ONNX Runtime
    ``trt`` mode (symmetric int8 Q/DQ on Conv/MatMul/Gemm inputs only; everything else, LayerNorm
    and Softmax included, stays FP32), or with ``quantizer="modelopt"`` by NVIDIA ModelOpt's ONNX
    PTQ (it places Q/DQ by TensorRT's rules; the rest is cast to FP16 except :data:`FP32_OPS`).
    ``auto`` is our mode because it was the more accurate of the two where both were measured
    (EfficientNet-Lite0, Q/DQ simulated on the CPU: cosine 0.978 / 0.967 / 0.912 against
    ModelOpt 0.47's 0.936 / 0.894 / 0.844; docs/int8_tensorrt.md); no engine has been compared yet.
``fp32``
    The graph as exported (a reference engine for parity checks).

Every engine has one optimization profile, batch 1..``max_batch`` (optimum at ``max_batch``), a
persistent timing cache (kernel timings reused across builds, so a rebuild takes seconds, not
minutes) and a JSON sidecar ``<engine>.json`` with the model metadata plus the TensorRT and CUDA
versions, which the runner checks (``musc_edge.runtime.backends.tensorrt``).
"""

from __future__ import annotations

import datetime as _dt
import heapq
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from musc_edge.core.errors import DeviceError, InputError, ModelError
from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.meta import ModelMeta
from musc_edge.runtime.backends.tensorrt import (SIDECAR_VERSION_KEY, cuda_call, cuda_info, import_cudart,
                                                 import_tensorrt, version_tuple, write_sidecar)

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8")
QUANTIZERS = ("auto", "modelopt", "ort")
ENGINE_SUFFIXES = (".engine", ".plan", ".trt")
#: Ops kept in FP32 in an FP16 engine (see the module docstring).
FP32_OPS = ("LayerNormalization", "Softmax", "ReduceMean", "ReduceL2", "ReduceSumSquare", "Pow", "Sqrt",
            "Reciprocal", "Div", "Erf")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
DEFAULT_CALIB_IMAGES = 64


def default_timing_cache() -> Path:
    """``$XDG_CACHE_HOME/musc-edge/trt/timing.cache``: the user cache, never the working directory."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "musc-edge" / "trt" / "timing.cache"


# ------------------------------------------------------------------------------------ argument checks
def check_build_args(onnx_path: Path, engine_path: Path, precision: str, calib_dir: Path | None, max_batch: int,
                     has_qdq: bool, quantizer: str = "auto") -> None:
    """Refuse a combination that cannot give the engine asked for, before TensorRT is touched."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if quantizer not in QUANTIZERS:
        raise InputError(f"unknown quantizer {quantizer!r}; choose one of {', '.join(QUANTIZERS)}")
    if not 1 <= int(max_batch) <= 1024:
        raise InputError(f"--max-batch must be between 1 and 1024, got {max_batch}")
    if engine_path.suffix.lower() not in ENGINE_SUFFIXES:
        raise InputError(f"engine file {engine_path.name} must end in {', '.join(ENGINE_SUFFIXES)} so the runtime "
                         "recognises it")
    if engine_path.resolve() == onnx_path.resolve():
        raise InputError("the engine path must differ from the ONNX model's")
    if calib_dir is not None and precision != "int8":
        raise InputError("--calib is for INT8 calibration: add --precision int8")
    if precision == "int8" and not has_qdq and calib_dir is None:
        raise InputError(f"{onnx_path.name} has no Q/DQ nodes: INT8 needs calibration images (--calib DIR), or a "
                         "Q/DQ model from `musc-edge calibrate --mode trt`")
    if precision == "int8" and has_qdq and calib_dir is not None:
        raise InputError(f"{onnx_path.name} is already quantized (Q/DQ); drop --calib, or pass the FP32 model")
    if precision != "int8" and has_qdq:
        raise InputError(f"{onnx_path.name} is an INT8 Q/DQ model, which a strongly typed network builds in INT8 "
                         "whatever the flag: use --precision int8, or pass the FP32 model")


def network_flags(trt: Any) -> int:
    """Network creation flags: STRONGLY_TYPED on TensorRT 10 (strong typing is always on in 11)."""
    major = version_tuple(trt.__version__)[:1] or (0,)
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if major[0] >= 11 or flag is None:
        if major[0] < 10:
            raise ModelError(f"TensorRT {trt.__version__} is too old: musc-edge builds strongly typed networks "
                             "(TensorRT >= 10)")
        return 0
    return 1 << int(flag)


def profile_shapes(meta: ModelMeta, max_batch: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes of the one optimization profile: batch 1..max_batch."""
    s = meta.image_size
    return (1, 3, s, s), (max_batch, 3, s, s), (max_batch, 3, s, s)


# ------------------------------------------------------------------------------------ graph precision
def has_qdq(onnx_path: Path) -> bool:
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type in QDQ_OPS for n in model.graph.node)


def sort_nodes(graph: Any) -> None:
    """Put ``graph``'s nodes in topological order, in place (stable: ready nodes keep their order).

    ONNX requires it (``onnx.checker``), and converters that append nodes break it. A node whose
    input nobody produces (an outer-scope name) counts as ready; a cycle is a ModelError.
    """
    nodes = list(graph.node)
    producer = {out: i for i, n in enumerate(nodes) for out in n.output if out}
    waiting = [sum(1 for name in set(n.input) if name in producer) for n in nodes]
    users: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in set(n.input):
            if name in producer:
                users.setdefault(producer[name], []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in users.get(i, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ModelError("the graph has a cycle; re-export the model")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def to_fp16(src: Path, dst: Path) -> Path:
    """FP16 copy of the graph for a strongly typed build; :data:`FP32_OPS` and the I/O stay FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from musc_edge.calibration.quantize import name_nodes

    model = onnx.load(str(src))
    name_nodes(model)  # older converters name their Casts after the node: unnamed nodes collide
    converted = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(FP32_OPS))
    sort_nodes(converted.graph)  # the converter appends its Casts at the end
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as e:
        first = (str(e).strip().splitlines() or ["invalid graph"])[0][:200]
        raise ModelError(f"the FP16 conversion of {src.name} is not a valid ONNX graph ({first}); "
                         "build with --precision fp32, or update onnxruntime") from None
    onnx.save(converted, str(dst))
    return dst


def calibration_batch(calib_dir: Path, meta: ModelMeta, num: int = DEFAULT_CALIB_IMAGES) -> tuple[np.ndarray, list[Path]]:
    """Up to ``num`` preprocessed images of ``calib_dir`` (spread over the folder), for ModelOpt."""
    from musc_edge.calibration.reader import MIN_CALIBRATION_IMAGES, load_batch
    from musc_edge.datasets import discover

    paths = [s.path for s in discover(calib_dir, "auto").samples]
    if len(paths) < MIN_CALIBRATION_IMAGES:
        raise InputError(f"--calib {calib_dir} has {len(paths)} images; INT8 calibration needs at least "
                         f"{MIN_CALIBRATION_IMAGES} (64 or more is typical)")
    pick = np.linspace(0, len(paths) - 1, min(num, len(paths))).round().astype(int)
    batch, used = load_batch([paths[i] for i in sorted(set(pick))], meta)
    if len(used) < MIN_CALIBRATION_IMAGES:
        raise InputError(f"only {len(used)} images of {calib_dir} could be read; INT8 calibration needs at least "
                         f"{MIN_CALIBRATION_IMAGES}")
    return batch, used


def quantize_for_tensorrt(src: Path, dst: Path, meta: ModelMeta, calib_dir: Path, quantizer: str = "auto",
                          num: int = DEFAULT_CALIB_IMAGES) -> str:
    """Write a Q/DQ model for TensorRT from ``calib_dir`` images; return which quantizer made it."""
    if quantizer == "modelopt":
        try:
            from modelopt.onnx.quantization import quantize as modelopt_quantize
        except ImportError:
            raise InputError("--quantizer modelopt needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]'") from None
        batch, _ = calibration_batch(calib_dir, meta, num)
        _run_modelopt(modelopt_quantize, src, dst, {meta.input_name: batch})
        return "modelopt"
    from musc_edge.calibration.quantize import make_config, quantize_model
    from musc_edge.calibration.reader import split_images

    n_images = len(discover_images(calib_dir))
    split = split_images(calib_dir, max(4, min(num, n_images - 2)), holdout=2)
    quantize_model(src, dst, make_config("trt", "minmax", num=len(split.calibration)), split.calibration)
    return "onnxruntime-trt"


def modelopt_calibration_eps() -> list[str]:
    """ModelOpt's calibration execution providers: CUDA first where a GPU is present, else the CPU only.

    ModelOpt's default (``cpu, cuda:0, trt``) puts the CPU first, so a GPU machine would calibrate
    on the CPU. ``onnxruntime-gpu``, which ModelOpt installs, lists the CUDA provider even with no GPU
    or CUDA libraries, so ORT's list alone is not enough: cuda-python (the engine build's own
    dependency; no torch here) must also see a device. TensorRT's provider is left out: it would
    first build an engine of the calibration graph (every tensor an output); ModelOpt adds it by
    itself for a model with custom ops.
    """
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and _cuda_device_present():
        return ["cuda:0", "cpu"]
    return ["cpu"]


def _cuda_device_present() -> bool:
    try:
        return int(cuda_call(import_cudart().cudaGetDeviceCount(), "cudaGetDeviceCount")) > 0
    except (DeviceError, RuntimeError, OSError):  # no cuda-python, no driver or no GPU
        return False


def _run_modelopt(modelopt_quantize: Any, src: Path, dst: Path, calibration_data: dict[str, np.ndarray]) -> None:
    """Run ModelOpt's INT8 PTQ on ``src`` into ``dst``; any failure becomes one :class:`ModelError` line.

    ModelOpt writes its intermediate models (``<name>_opset19.onnx``, ``<name>_named.onnx``, ...) next
    to its input, and copies the input's whole folder elsewhere when that folder is read-only, so it
    is given a link to ``src`` in a temporary folder instead. Non-quantized ops are cast to FP16 as
    in the fp16 build, except :data:`FP32_OPS` (ModelOpt's own default casts LayerNorm and Softmax
    too). Note: ModelOpt monkeypatches ONNX Runtime's calibrators for the rest of the process, so
    our ``ort`` quantizer (or ``musc-edge calibrate``) must not run after it in the same process.
    """
    with tempfile.TemporaryDirectory(prefix="musc-edge-modelopt-") as tmp:
        link = Path(tmp) / (src.stem + ".onnx")  # ModelOpt asserts an .onnx or .pb name
        link.symlink_to(src.resolve())
        for name in _external_data_files(src):
            extra = Path(tmp) / name
            extra.parent.mkdir(parents=True, exist_ok=True)
            extra.symlink_to((src.parent / name).resolve())
        try:
            modelopt_quantize(str(link), quantize_mode="int8", calibration_data=calibration_data,
                              calibration_method="entropy", calibration_eps=modelopt_calibration_eps(),
                              high_precision_dtype="fp16", op_types_to_exclude_fp16=list(FP32_OPS),
                              output_path=str(dst), log_level="WARNING")
        except Exception as e:  # ModelOpt raises AssertionError, ValueError, RuntimeError, ORT's errors...
            log.debug("ModelOpt failed", exc_info=True)
            detail = (str(e).strip().splitlines() or [""])[0][:300] or _failing_line(e)
            raise ModelError(f"ModelOpt could not quantize {src.name}: {type(e).__name__}: {detail} "
                             "(--quantizer ort uses ONNX Runtime's trt mode instead)") from None
    if not dst.is_file() or not has_qdq(dst):
        raise ModelError(f"ModelOpt placed no Q/DQ nodes in {src.name}: nothing in it to build in INT8")


def _failing_line(e: BaseException) -> str:
    """Where ``e`` was raised, for an exception without a message (ModelOpt's bare ``assert``s)."""
    import traceback

    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return "no message"
    last = frames[-1]
    return f"`{(last.line or '').strip()}` at {Path(last.filename).name}:{last.lineno}"


def _external_data_files(model_path: Path) -> list[str]:
    """The external-data files ``model_path`` names (relative to its folder), so a link to it still loads."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    names = {entry.value for init in model.graph.initializer
             if init.data_location == onnx.TensorProto.EXTERNAL
             for entry in init.external_data if entry.key == "location"}
    return sorted(names)


def discover_images(folder: Path) -> list[Path]:
    from musc_edge.datasets import discover

    return [s.path for s in discover(folder, "auto").samples]


# ----------------------------------------------------------------------------------------- build
def build_engine(onnx_path: str | Path, engine_path: str | Path, meta: ModelMeta, precision: str = "fp16",
                 calib_dir: str | Path | None = None, max_batch: int = 8, *, timing_cache: str | Path | None = None,
                 quantizer: str = "auto", num_calib: int = DEFAULT_CALIB_IMAGES,
                 workspace_gib: float | None = None) -> Path:
    """Build ``engine_path`` (and its ``.json`` sidecar) from ``onnx_path``; return the engine path.

    precision: fp16 | int8 | fp32 (see the module docstring). calib_dir: line images for INT8
    when the ONNX file has no Q/DQ nodes. max_batch: the profile's largest batch.
    timing_cache: kernel timing cache file (default :func:`default_timing_cache`), read if it
    exists and written back after the build. quantizer: auto | modelopt | ort for INT8
    calibration here. workspace_gib: builder scratch memory limit (default: TensorRT's).
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    calib = Path(calib_dir) if calib_dir is not None else None
    precision = (precision or "").lower()
    if not onnx_path.is_file():
        raise ModelError(f"ONNX model not found: {onnx_path}; export it with `musc-edge export`")
    qdq = has_qdq(onnx_path)
    check_build_args(onnx_path, engine_path, precision, calib, max_batch, qdq, quantizer)
    trt = import_tensorrt()
    cudart = import_cudart()
    cache_path = Path(timing_cache) if timing_cache else default_timing_cache()
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    cuda = cuda_info(cudart)  # before the build, which takes minutes: no GPU or driver fails here, at once
    with tempfile.TemporaryDirectory(prefix="musc-edge-trt-") as tmp:
        graph, how = onnx_path, "as exported"
        if precision == "fp16":
            graph, how = to_fp16(onnx_path, Path(tmp) / "fp16.onnx"), "onnxruntime float16 converter"
        elif precision == "int8" and not qdq:
            graph = Path(tmp) / "qdq.onnx"
            how = quantize_for_tensorrt(onnx_path, graph, meta, calib, quantizer, num_calib)  # type: ignore[arg-type]
        elif precision == "int8":
            how = "Q/DQ model as given"
        plan = _build(trt, graph, meta, max_batch, cache_path, workspace_gib)
    facts = build_facts(trt.__version__, precision, max_batch, how, onnx_path, cache_path)
    facts.update(cuda)
    atomic_write_bytes(engine_path, plan)
    write_sidecar(engine_path, meta, facts)
    log.info("built %s (%s, batch 1..%d, TensorRT %s)", engine_path, precision, max_batch, trt.__version__)
    return engine_path


def build_facts(trt_version: str, precision: str, max_batch: int, how: str, onnx_path: Path,
                cache_path: Path) -> dict[str, Any]:
    """The sidecar's build entries (besides the model metadata and the CUDA facts)."""
    return {
        SIDECAR_VERSION_KEY: trt_version,
        "precision": precision,
        "precision_source": how,
        "strongly_typed": True,
        "max_batch": int(max_batch),
        "source_onnx": onnx_path.name,
        "timing_cache": str(cache_path),
        "built_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _build(trt: Any, graph: Path, meta: ModelMeta, max_batch: int, cache_path: Path,
           workspace_gib: float | None) -> bytes:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph)):
        errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
        raise ModelError(f"TensorRT cannot parse {graph.name}: {errors[:400]}")
    config = builder.create_builder_config()
    if workspace_gib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(meta.input_name, *profile_shapes(meta, max_batch))
    config.add_optimization_profile(profile)
    _load_timing_cache(config, cache_path)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ModelError(f"TensorRT failed to build an engine from {graph.name}; see the TensorRT log above")
    _save_timing_cache(config.get_timing_cache(), cache_path)  # now holds this build's timings too
    return bytes(plan)


def _load_timing_cache(config: Any, path: Path) -> None:
    """Attach the timing cache at ``path`` (or a new one); a cache from elsewhere is replaced."""
    data = b""
    if path.is_file():
        data = path.read_bytes()
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s was made by another TensorRT or GPU; starting a new one", path)
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)


def _save_timing_cache(cache: Any, path: Path) -> None:
    atomic_write_bytes(path, bytes(cache.serialize()))  # a unique temporary name: builds may run side by side
