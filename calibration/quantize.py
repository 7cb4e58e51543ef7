"""INT8 models from an exported FP32 backbone, with ONNX Runtime's quantization tools, on the CPU.

Four modes, because the fastest INT8 form depends on the backbone and on where it runs
(the measurements behind each default are in ``docs/int8_tensorrt.md``):

``static``
    Static Q/DQ (``quantize_static``): uint8 activations, int8 weights, one scale per tensor;
    activation ranges come from calibration images. ONNX Runtime's fastest static form on x86
    (u8 x s8 is the VNNI / VPMADDUBSW instruction shape).
``static-pc``
    Static Q/DQ with int8 activations and per-channel int8 weights: more accurate weights, but
    ONNX Runtime's CPU kernels for s8 x s8 are slower.
``dynamic``
    ``quantize_dynamic`` of the MatMuls: int8 weights, activation scales computed per batch at run
    time. No calibration images are needed. Fastest for ViTs on the CPU; it leaves convolutions
    in FP32, so it does nothing for a CNN.
``trt``
    The Q/DQ form TensorRT's explicit quantization wants: symmetric int8 activations and weights
    (zero point 0), per-channel weights, Q/DQ only on the inputs of Conv/MatMul/Gemm. Meant for
    ``musc-edge export --format engine --precision int8``, not for ONNX Runtime on the CPU.

Only Conv, MatMul and Gemm are quantized in every mode: they hold nearly all the FLOPs, while
quantizing LayerNormalization, Softmax or the residual Adds costs accuracy and buys no speed
(and TensorRT keeps them in higher precision anyway).

The output keeps the input's musc-edge metadata (``musc_edge.*`` ONNX metadata_props) plus a
``musc_edge.quantization`` entry saying how it was made, so the runtime loads it like any model.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from musc_edge.errors import InputError, ModelError
from musc_edge.meta import PREFIX, ModelMeta

from .reader import ImageFolderReader

log = logging.getLogger(__name__)

MODES = ("static", "static-pc", "dynamic", "trt")
METHODS = ("minmax", "entropy", "percentile")
#: The op types we quantize (see the module docstring).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
#: ONNX ops that mark a graph as already quantized.
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "QLinearConv", "QLinearMatMul"}
QUANT_PROP = PREFIX + "quantization"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: a validated combination of mode, calibration method and options.

    mode: one of :data:`MODES`. method: one of :data:`METHODS` for the static modes, None for
    ``dynamic``. num: calibration images. batch: images per calibration batch. cache: a JSON
    file of activation ranges to reuse (static modes only).
    """

    mode: str = "static"
    method: str | None = "minmax"
    num: int = 64
    batch: int = 8
    cache: Path | None = None

    @property
    def calibrated(self) -> bool:
        return self.mode != "dynamic"


def make_config(mode: str = "static", method: str | None = None, *, num: int = 64, batch: int = 8,
                cache: str | Path | None = None) -> QuantConfig:
    """Validate the combination up front (as ``quantize_static`` does) and fill the defaults.

    ``method`` None means minmax for the static modes. Refused: unknown names, a calibration
    method or cache with ``dynamic`` (it has no calibration), counts below 1.
    """
    mode = (mode or "").strip().lower()
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if method is not None:
        method = method.strip().lower()
        if method not in METHODS:
            raise InputError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    if mode == "dynamic":
        if method is not None:
            raise InputError(f"--method {method} has no effect with --mode dynamic (dynamic quantization computes "
                             "activation scales at run time, without calibration); drop --method or use --mode static")
        if cache is not None:
            raise InputError("--cache has no effect with --mode dynamic (no calibration ranges); drop --cache")
    elif method is None:
        method = "minmax"
    if num < 1 or batch < 1:
        raise InputError(f"--num and --batch must be at least 1, got {num} and {batch}")
    return QuantConfig(mode=mode, method=method, num=num, batch=batch, cache=Path(cache) if cache else None)


def default_mode(meta: ModelMeta) -> str:
    """The CPU mode we measured best for this backbone family (docs/int8_tensorrt.md).

    ViTs: ``dynamic``: ViT-B/16 at batch 8 ran 2.0x FP32 (static 1.5x, static-pc 1.6x) at the
    same cosine (>= 0.984 on every output) on our AVX2 CPU.
    CNNs: ``static-pc``: the least inaccurate mode for EfficientNet-Lite0 (per-channel weights),
    though on the MTD sample it still lost 0.028 image AUROC (``static``: 0.031), above the
    issue's 0.01, and it brings no speed on a CPU without VNNI: for CNNs on such a CPU keep FP32
    (docs/int8_tensorrt.md); ``dynamic`` quantizes no convolution at all.
    """
    return "dynamic" if meta.backbone.startswith("vit") else "static-pc"


@dataclass(frozen=True)
class QuantResult:
    """What :func:`quantize_model` wrote and how."""

    path: Path
    config: QuantConfig
    meta: ModelMeta
    calibration_images: tuple[Path, ...] = field(default=())

    def describe(self) -> dict:
        d = asdict(self.config)
        d["cache"] = str(self.config.cache) if self.config.cache else None
        d["calibration_images"] = len(self.calibration_images)
        return d


# ------------------------------------------------------------------------------------------- checks
def load_fp32_model(path: str | Path) -> tuple[onnx.ModelProto, ModelMeta]:
    """Load an exported FP32 model and its metadata; refuse anything else with one line."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; export one with `musc-edge export`")
    if path.suffix.lower() != ".onnx":
        raise ModelError(f"{path.name} is not an .onnx model; calibration starts from the FP32 ONNX export "
                         "(`musc-edge export --format onnx`)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError, ... for non-models
        raise ModelError(f"{path} is not a readable ONNX model ({type(e).__name__}); re-export it") from None
    props = {p.key: p.value for p in model.metadata_props}
    meta = ModelMeta.from_props(props, source=str(path))
    found = sorted({n.op_type for n in model.graph.node} & QUANT_OPS)
    if found or QUANT_PROP in props:
        raise ModelError(f"{path.name} is already quantized ({', '.join(found) or 'musc_edge.quantization'} "
                         "present); calibrate the FP32 model from `musc-edge export`")
    return model, meta


def check_output_path(model: Path, out: Path) -> None:
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out} must end in .onnx (for example {model.with_suffix('.int8.onnx').name})")
    if out.resolve() == model.resolve():
        raise InputError(f"--out {out} would overwrite the FP32 model; choose another name such as "
                         f"{model.with_suffix('.int8.onnx').name}")


# ---------------------------------------------------------------------------------------- quantize
def quantize_model(model_path: str | Path, out_path: str | Path, config: QuantConfig,
                   calibration_images: Sequence[Path] = ()) -> QuantResult:
    """Write an INT8 version of ``model_path`` to ``out_path`` as ``config`` says.

    ``calibration_images`` feed the static modes (see :func:`~.reader.split_images`); they are
    decoded and preprocessed like the runtime does (``reader.ImageFolderReader``).
    """
    model_path, out_path = Path(model_path), Path(out_path)
    _, meta = load_fp32_model(model_path)
    check_output_path(model_path, out_path)
    if config.calibrated and not calibration_images and not (config.cache and config.cache.is_file()):
        raise InputError("static quantization needs calibration images (--images DIR) or an existing --cache")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    used: tuple[Path, ...] = ()
    with tempfile.TemporaryDirectory(prefix="musc-edge-quant-") as tmp:
        prepared = _prepare(model_path, Path(tmp) / "prepared.onnx")
        if config.mode == "dynamic":
            _quantize_dynamic(prepared, out_path)
        else:
            # ORT's histogram collectors (entropy, percentile) stack the batches they see, so every
            # batch must have the same shape: feed those one image at a time
            per_call = config.batch if config.method == "minmax" else 1
            reader = ImageFolderReader(calibration_images, meta, batch_size=per_call)
            _quantize_static(prepared, out_path, reader, config)
            used = tuple(reader.used)
    result = QuantResult(path=out_path, config=config, meta=meta, calibration_images=used)
    copy_metadata(model_path, out_path, result.describe())
    return result


def _prepare(src: Path, dst: Path) -> Path:
    """ONNX Runtime's recommended pre-processing: shape inference and graph clean-up.

    Symbolic shape inference fails on some exported ViT graphs (a Reshape with a computed shape),
    so we use ONNX shape inference only; the quantizer needs nothing more.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    except Exception as e:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph
        log.warning("quantization pre-processing failed (%s: %s); quantizing the graph as exported",
                    type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
        return src
    return dst


def _quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=False)


def _quantize_static(src: Path, dst: Path, reader: ImageFolderReader, config: QuantConfig) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method or "minmax"]
    kwargs: dict = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                        weight_type=QuantType.QInt8, calibrate_method=method, calibration_providers=["CPUExecutionProvider"])
    if config.mode == "static":
        kwargs.update(activation_type=QuantType.QUInt8, per_channel=False)
    elif config.mode == "static-pc":
        kwargs.update(activation_type=QuantType.QInt8, per_channel=True)
    else:  # trt: symmetric int8 everywhere (TensorRT supports zero point 0 only)
        kwargs.update(activation_type=QuantType.QInt8, per_channel=True,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                     # Q/DQ on the inputs of Conv/MatMul/Gemm only, as TensorRT's
                                     # explicit-quantization rules (and ModelOpt) place them
                                     "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS)})
    if config.cache is not None:
        config.cache.parent.mkdir(parents=True, exist_ok=True)
        kwargs["calibration_cache_path"] = str(config.cache)
    try:
        quantize_static(str(src), str(dst), reader, **kwargs)
    except ValueError as e:
        text = str(e).splitlines()[0] if str(e) else "invalid arguments"
        if "cache" in text.lower():  # a cache made with another method: ORT refuses it
            raise InputError(f"calibration cache {config.cache}: {text}") from None
        raise


def copy_metadata(src: Path, dst: Path, quantization: dict) -> None:
    """Put ``src``'s musc-edge metadata (and how it was quantized) on ``dst``.

    ONNX Runtime's quantizers rebuild the model and may drop ``metadata_props``; the runtime
    refuses a model without them, so we restore them explicitly.
    """
    source = onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    keep = {p.key: p.value for p in source.metadata_props if p.key.startswith(PREFIX)}
    keep[QUANT_PROP] = json.dumps(quantization, sort_keys=True)
    del target.metadata_props[:]
    for k, v in keep.items():
        entry = target.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(target, str(dst))


def quantization_info(path: str | Path) -> dict | None:
    """The ``musc_edge.quantization`` entry of a model (None for an FP32 model)."""
    model = onnx.load(str(path), load_external_data=False)
    for p in model.metadata_props:
        if p.key == QUANT_PROP:
            return json.loads(p.value)
    return None
