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
``static-cnn``
    The recipe for ReLU6 CNNs (EfficientNet-Lite, MobileNet), from a per-layer sensitivity
    analysis of EfficientNet-Lite0 on MTD (docs/int8_tensorrt.md, :func:`cnn_plan`): uint8
    activations and per-channel int8 weights (the fast u8 x s8 kernels); Clip/Relu quantized
    too, so a convolution's output gets the ReLU6 range [0, 6] instead of its raw range (up to
    +-100: only ~8 of 256 levels would land in [0, 6]); 7-bit weights on the non-depthwise
    convolutions, whose u8 x s8 GEMM saturates int16 (VPMADDUBSW) on x86 without VNNI; the
    convolutions before the first residual connection (stem, blocks 0 and 1) left in FP32; and
    bias correction (:mod:`.bias`): each convolution's bias cancels the mean shift its rounded
    weights cause, which otherwise compounds through the layers and survives the embedding's
    global pool (EfficientNet-Lite0's embedding: cosine min 0.91-0.94 -> 0.997).
``dynamic``
    ``quantize_dynamic`` of the MatMuls: int8 weights, activation scales computed per batch at run
    time. No calibration images are needed. Fastest for ViTs on the CPU; it leaves convolutions
    in FP32, so it does nothing for a CNN.
``trt``
    The Q/DQ form TensorRT's explicit quantization wants: symmetric int8 activations and weights
    (zero point 0), per-channel weights, Q/DQ only on the inputs of Conv/MatMul/Gemm, biases left
    in float (TensorRT does not take ORT's int32-quantized biases). Meant for
    ``musc-edge export --format engine --precision int8``, not for ONNX Runtime on the CPU.

Only Conv, MatMul and Gemm are quantized in every mode (plus Clip/Relu in ``static-cnn``, which
ONNX Runtime folds into the convolution's output range): they hold nearly all the FLOPs, while
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

from musc_edge.core.errors import InputError, ModelError
from musc_edge.core.meta import PREFIX, ModelMeta

from .bias import bias_corrected_model
from .reader import ImageFolderReader

log = logging.getLogger(__name__)

MODES = ("static", "static-pc", "static-cnn", "dynamic", "trt")
METHODS = ("minmax", "entropy", "percentile")
#: The op types we quantize (see the module docstring).
QUANTIZED_OPS = ("Conv", "MatMul", "Gemm")
#: Activations ``static-cnn`` quantizes as well, so their input range becomes their output range.
CLIPPING_OPS = ("Clip", "Relu")
#: ONNX ops that mark a graph as already quantized.
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger",
             "QLinearConv", "QLinearMatMul"}
QUANT_PROP = PREFIX + "quantization"


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: a validated combination of mode, calibration method and options.

    mode: one of :data:`MODES`. method: one of :data:`METHODS` for the static modes, None for
    ``dynamic``. num: calibration images. batch: images per calibration batch. cache: a JSON
    file of activation ranges to reuse (static modes only). bias_correction: correct the
    quantized convolutions' biases for their weight rounding (:mod:`.bias`; static modes only).
    """

    mode: str = "static"
    method: str | None = "minmax"
    num: int = 64
    batch: int = 8
    cache: Path | None = None
    bias_correction: bool = False

    @property
    def calibrated(self) -> bool:
        return self.mode != "dynamic"


def make_config(mode: str = "static", method: str | None = None, *, num: int = 64, batch: int = 8,
                cache: str | Path | None = None, bias_correction: bool | None = None) -> QuantConfig:
    """Validate the combination up front (as ``quantize_static`` does) and fill the defaults.

    ``method`` None means minmax for the static modes; ``bias_correction`` None means on for
    ``static-cnn`` (part of its recipe), off for the other modes. Refused: unknown names, a
    calibration method, cache or bias correction with ``dynamic`` (it has no calibration),
    counts below 1.
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
        if bias_correction:
            raise InputError("bias correction needs calibration images, which --mode dynamic does not use; "
                             "use a static mode")
    elif method is None:
        method = "minmax"
    if num < 1 or batch < 1:
        raise InputError(f"--num and --batch must be at least 1, got {num} and {batch}")
    if bias_correction is None:
        bias_correction = mode == "static-cnn"
    return QuantConfig(mode=mode, method=method, num=num, batch=batch, cache=Path(cache) if cache else None,
                       bias_correction=bool(bias_correction))


#: ``ModelMeta.family`` -> the CPU mode we measured best for it (see :func:`default_mode`).
DEFAULT_MODES: dict[str, str] = {"vit": "dynamic", "cnn": "static-cnn"}


def default_mode(meta: ModelMeta) -> str:
    """The CPU mode we measured best for the model's family (docs/int8_tensorrt.md).

    Chosen by ``meta.family``, never the backbone's name, so a new ViT (DINO, ...) gets the ViT
    recipe by what it is, not by what it is called.

    ViTs: ``dynamic``: ViT-B/16 at batch 8 ran 2.0x FP32 (static 1.5x, static-pc 1.6x) at the
    same cosine (>= 0.984 on every output) on our AVX2 CPU.
    CNNs: ``static-cnn``: on EfficientNet-Lite0 and the 120-image MTD subset its image AUROC
    was 0.854 against FP32's 0.855 (issue floor: a drop of at most 0.01) with every output's
    cosine >= 0.997 on images it was not calibrated on, at 1.4x FP32 images/s, where
    ``static-pc`` lost 0.017 at no speed-up; ``dynamic`` quantizes no convolution at all.
    """
    return DEFAULT_MODES[meta.family]


@dataclass(frozen=True)
class CnnPlan:
    """Which convolutions ``static-cnn`` keeps in FP32 and which weights it quantizes to 7 bits.

    float_convs: node names left unquantized. reduced_weights: weight initializers quantized
    with ``reduce_range`` (7-bit) because their convolution runs as a u8 x s8 GEMM.
    """

    float_convs: tuple[str, ...]
    reduced_weights: tuple[str, ...]


def _is_depthwise(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> bool:
    """A grouped convolution with one input channel per group (weight shape (C, 1, kh, kw))."""
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    shape = shapes.get(node.input[1]) if len(node.input) > 1 else None
    return group > 1 and shape is not None and len(shape) == 4 and shape[1] == 1


#: Ops that read only a tensor's shape: a tensor they read is not a fork of the data path.
SHAPE_OPS = frozenset({"Shape", "Size"})


def _first_fork(model: onnx.ModelProto) -> int | None:
    """Index of the node whose output is the first tensor two or more compute nodes read.

    That is where the data path first splits: the start of the first residual connection in a
    MobileNet/EfficientNet/ResNet (or the first tapped layer). None when nothing splits before
    the last node, or when the graph input itself is read twice.
    """
    inits = {i.name for i in model.graph.initializer}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in SHAPE_OPS:
            continue
        for t in set(n.input):
            if t and t not in inits:
                readers[t] = readers.get(t, 0) + 1
    for i, n in enumerate(model.graph.node):
        if any(readers.get(t, 0) > 1 for t in n.output):
            return i
    return None


def cnn_plan(model: onnx.ModelProto) -> CnnPlan:
    """The ``static-cnn`` plan for a CNN graph (pure: reads the graph, changes nothing).

    Rule, from excluding convolutions on EfficientNet-Lite0 (cosine of every output against FP32
    on held-out MTD images, int8 kernels; docs/int8_tensorrt.md): the convolutions *up to the
    first fork of the data path* stay FP32, i.e. the chain from the stem to the start of the
    first residual connection. In a MobileNet/EfficientNet that is the stem and the first two
    blocks (Lite0: 6 convolutions, blocks 0 and 1, neither has a skip path); in a ResNet the stem.
    Their rounding is inherited by every later layer, and they are where it hurt most: excluding
    one convolution at a time, the first block's depthwise conv moved the tokens' cosine 0.972 ->
    0.984 and the stem 0.984 -> 0.991; quantizing one at a time (the rest FP32), blocks 0 and 1's
    projections cost the embedding the most (0.005 and 0.004, no later conv above 0.0025). With
    bias correction (:mod:`.bias`), keeping blocks 0 and 1 too raised the embedding's minimum
    over 64 held-out images from 0.978-0.983 to 0.997, for about 3% of the speed: they are 13%
    of Lite0's MACs (4% with the stem and block 0's depthwise alone).
    Without a fork (a plain chain), the convolutions before the second dense one stay FP32.

    Every other non-depthwise convolution gets 7-bit weights: ONNX Runtime runs u8 x s8 convs as
    a GEMM that, on x86 without AVX-512 VNNI, sums pairs of u8 x s8 products in int16
    (VPMADDUBSW) and saturates with 8-bit weights (255 * 127 * 2 > 32767); with that saturation
    the tokens' cosine fell from 0.987 (simulated) to 0.94 (run). Depthwise kernels accumulate
    in int32, so they keep 8 bits (7 bits there cost 0.02 cosine).
    """
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    nodes = list(model.graph.node)
    convs = [n for n in nodes if n.op_type == "Conv"]
    fork = _first_fork(model)
    float_convs: list[str] = []
    if fork is not None and any(n.op_type == "Conv" for n in nodes[:fork + 1]):
        float_convs = [n.name for n in nodes[:fork + 1] if n.op_type == "Conv"]
    else:
        dense_seen = 0
        for n in convs:
            if not _is_depthwise(n, shapes):
                dense_seen += 1
                if dense_seen == 2:
                    break
            float_convs.append(n.name)
    keep = set(float_convs)
    if any(not name for name in keep):
        log.warning("an unnamed convolution cannot be kept in FP32; it is quantized like the others")
    reduced = tuple(n.input[1] for n in convs
                    if n.name not in keep and len(n.input) > 1 and n.input[1] in shapes and not _is_depthwise(n, shapes))
    return CnnPlan(float_convs=tuple(name for name in float_convs if name), reduced_weights=reduced)


@dataclass(frozen=True)
class QuantResult:
    """What :func:`quantize_model` wrote and how."""

    path: Path
    config: QuantConfig
    meta: ModelMeta
    calibration_images: tuple[Path, ...] = field(default=())
    #: nodes left in FP32 on purpose (``static-cnn``: :func:`cnn_plan`)
    float_nodes: tuple[str, ...] = field(default=())
    #: convolutions whose bias was corrected for their weight rounding (:mod:`.bias`)
    bias_corrected: tuple[str, ...] = field(default=())

    def describe(self) -> dict:
        d = asdict(self.config)
        d["cache"] = str(self.config.cache) if self.config.cache else None
        d["calibration_images"] = len(self.calibration_images)
        if self.float_nodes:
            d["float_nodes"] = list(self.float_nodes)
        if self.config.bias_correction:
            d["bias_corrected_convs"] = len(self.bias_corrected)
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
    float_convs: tuple[str, ...] = ()
    corrected: tuple[str, ...] = ()
    with tempfile.TemporaryDirectory(prefix="musc-edge-quant-") as tmp:
        prepared = _prepare(model_path, Path(tmp) / "prepared.onnx")
        if config.mode == "static-cnn":  # cnn_plan excludes convolutions by node name
            prepared = _name_nodes(prepared, Path(tmp) / "named.onnx")
        if config.mode == "dynamic":
            _quantize_dynamic(prepared, out_path)
        else:
            # ORT's histogram collectors (entropy, percentile) stack the batches they see, so every
            # batch must have the same shape: feed those one image at a time
            per_call = config.batch if config.method == "minmax" else 1
            reader = ImageFolderReader(calibration_images, meta, batch_size=per_call)
            float_convs, corrected = _quantize_static(prepared, out_path, reader, config, Path(tmp))
            used = tuple(reader.used)
    result = QuantResult(path=out_path, config=config, meta=meta, calibration_images=used, float_nodes=float_convs,
                         bias_corrected=corrected)
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


def name_nodes(model: onnx.ModelProto) -> bool:
    """Give every unnamed node of ``model`` a unique name, in place; True if any was renamed.

    ONNX Runtime's quantizer excludes nodes by name, and older releases of its float16 converter
    (1.24) name the Cast nodes they insert after the node, so unnamed nodes collide there.
    """
    taken = {n.name for n in model.graph.node if n.name}
    if len(taken) == len(model.graph.node):
        return False
    for i, n in enumerate(model.graph.node):
        if not n.name:
            name = f"{n.op_type}_{i}"
            while name in taken:
                name += "_"
            n.name = name
            taken.add(name)
    return True


def _name_nodes(src: Path, dst: Path) -> Path:
    """``src``, or a copy at ``dst`` with every node named (:func:`name_nodes`)."""
    model = onnx.load(str(src))
    if not name_nodes(model):
        return src
    onnx.save(model, str(dst))
    return dst


def _quantize_dynamic(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                     per_channel=False)


def _quantize_static(src: Path, dst: Path, reader: ImageFolderReader, config: QuantConfig,
                     workdir: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Run ``quantize_static`` as ``config`` says; return the convolutions kept in FP32 and the
    bias-corrected ones.

    With bias correction it runs twice: once to learn how the weights round, then on the FP32
    model with corrected biases, with the first run's activation ranges (through the
    calibration cache, a temporary one without ``--cache``), so both see the same ranges.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType

    float_convs: tuple[str, ...] = ()
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method or "minmax"]
    kwargs: dict = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=list(QUANTIZED_OPS),
                        weight_type=QuantType.QInt8, calibrate_method=method, calibration_providers=["CPUExecutionProvider"])
    if config.mode == "static":
        kwargs.update(activation_type=QuantType.QUInt8, per_channel=False)
    elif config.mode == "static-pc":
        kwargs.update(activation_type=QuantType.QInt8, per_channel=True)
    elif config.mode == "static-cnn":  # see cnn_plan
        plan = cnn_plan(onnx.load(str(src), load_external_data=False))
        kwargs.update(activation_type=QuantType.QUInt8, per_channel=True,
                      op_types_to_quantize=list(QUANTIZED_OPS + CLIPPING_OPS), nodes_to_exclude=list(plan.float_convs),
                      extra_options={"TensorQuantOverrides": {w: [{"axis": 0, "reduce_range": True}]
                                                              for w in plan.reduced_weights}})
        float_convs = plan.float_convs
    else:  # trt: symmetric int8 everywhere (TensorRT supports zero point 0 only)
        kwargs.update(activation_type=QuantType.QInt8, per_channel=True,
                      extra_options={"ActivationSymmetric": True, "WeightSymmetric": True,
                                     # Q/DQ on the inputs of Conv/MatMul/Gemm only, as TensorRT's
                                     # explicit-quantization rules (and ModelOpt) place them
                                     "OpTypesToExcludeOutputQuantization": list(QUANTIZED_OPS),
                                     # biases stay float: TensorRT's parser takes DequantizeLinear
                                     # of int8 (and fp8/int4), not ORT's int32 bias, and fuses
                                     # the float bias itself
                                     "QuantizeBias": False})
    cache = config.cache
    if cache is None and config.bias_correction:
        cache = workdir / "ranges.json"
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        kwargs["calibration_cache_path"] = str(cache)
    _run_quantize_static(src, dst, reader, kwargs, cache)
    corrected: tuple[str, ...] = ()
    if config.bias_correction:
        if not reader.paths:
            log.warning("bias correction needs the calibration images and none were given (ranges from --cache "
                        "only); the biases are left uncorrected")
        else:
            fixed, corrected = bias_corrected_model(src, dst, reader.paths, reader.meta,
                                                    workdir / "bias_corrected.onnx", config.batch)
            _run_quantize_static(fixed, dst, None, kwargs, cache)  # the ranges of the first run, from the cache
    return float_convs, corrected


def _run_quantize_static(src: Path, dst: Path, reader: ImageFolderReader | None, kwargs: dict,
                         cache: Path | None) -> None:
    """``quantize_static``, with its cache errors turned into one-line input errors."""
    from onnxruntime.quantization import quantize_static

    try:
        quantize_static(str(src), str(dst), reader, **kwargs)
    except ValueError as e:
        text = str(e).splitlines()[0] if str(e) else "invalid arguments"
        if "cache" in text.lower():  # a cache made with another method: ORT refuses it
            raise InputError(f"calibration cache {cache}: {text}") from None
        if isinstance(e, (json.JSONDecodeError, UnicodeDecodeError)):  # ORT json.load()s an existing cache
            raise InputError(f"calibration cache {cache} is not a readable JSON cache ({text}); "
                             "delete it to recalibrate, or pass another --cache") from None
        raise


def copy_metadata(src: Path, dst: Path, quantization: dict) -> None:
    """Put ``src``'s musc-edge metadata (and how it was quantized) on ``dst``.

    ONNX Runtime's quantizers rebuild the model and may drop ``metadata_props``; the runtime
    refuses a model without them, so we restore them explicitly. The ``ModelMeta`` keys are
    rewritten in the current schema, so an INT8 model made from an older export records its
    family (docs/export.md "Metadata"); the extra keys (``arch``, ...) are copied as they are.
    """
    source = onnx.load(str(src), load_external_data=False)
    target = onnx.load(str(dst))
    keep = {p.key: p.value for p in source.metadata_props if p.key.startswith(PREFIX)}
    keep.update(ModelMeta.from_props(keep, source=str(src)).to_props())
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
