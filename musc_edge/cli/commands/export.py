"""``musc-edge export``: a registered backbone -> ONNX (and optionally a TensorRT engine).

This module only parses flags and calls :mod:`musc_edge.export`; torch and open_clip are imported
when a model is built, so ``musc-edge export --list`` and flag errors stay fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from musc_edge.core.errors import DeviceError, InputError, MuscEdgeError
from musc_edge.cli.commands import missing_modules
from musc_edge.export import backbones
from musc_edge.cli.options import parse_int_list

RANDOM_WARNING = ("warning: --weights random: this model has random weights, so every score computed "
                  "with it means nothing (use it only to test the pipeline)")


def _print_backbones() -> None:
    for name in backbones.names():
        spec = backbones.get_spec(name)
        layers = ",".join(map(str, spec.layers))
        click.echo(f"{name:<20} {spec.image_size:>4}px  layers {layers:<12} weights {spec.weights:<9} {spec.summary}")


def _list_callback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        _print_backbones()
        ctx.exit(0)


@click.command(name="export")
@click.option("--backbone", default="vit_b16", show_default=True,
              help="Registered backbone (see --list): vit_b16, vit_b32, vit_l14, vit_l14_336, efficientnet_lite0, "
                   "efficientnet_lite1, efficientnet_lite2.")
@click.option("--weights", default=None,
              help="openai (CLIP) / imagenet (efficientnet_lite0/1/2): the backbone's pretrained weights [default]; "
                   "PATH: a local checkpoint (recorded as sha256:<hex>); random: random init (smoke tests only).")
@click.option("--image-size", "image_size", type=int, default=None,
              help="Square input side S (default: the backbone's); position embeddings are resized bicubically.")
@click.option("--layers", default=None,
              help="Tapped blocks (ViT) or stages (CNN), 1-indexed, e.g. 3,6,9,12. Blocks after the last are pruned.")
@click.option("--full-embedding", "full_embedding", is_flag=True,
              help="Keep the blocks after the last tapped layer so the embedding stays CLIP's own "
                   "(only matters when the last tapped layer is not the last block).")
@click.option("--opset", default=17, show_default=True, type=click.IntRange(17), help="ONNX opset (>= 17).")
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output FILE.onnx [default: ./<backbone>_<S>.onnx]; with --from-onnx, the FILE.engine "
                   "[default: beside the ONNX file].")
@click.option("--format", "fmt", type=click.Choice(["onnx", "engine"]), default="onnx", show_default=True,
              help="engine: also build a TensorRT engine next to the ONNX file (needs musc-edge[trt] and a GPU).")
@click.option("--precision", type=click.Choice(["fp16", "int8"]), default=None,
              help="TensorRT engine precision (--format engine) [default: fp16].")
@click.option("--calib", "calib_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of line images for INT8 calibration (--format engine --precision int8).")
@click.option("--max-batch", "max_batch", type=click.IntRange(1, 1024), default=None,
              help="Largest batch of the TensorRT optimisation profile (--format engine) [default: 8].")
@click.option("--quantizer", type=click.Choice(["ort", "modelopt"]), default=None,
              help="Who calibrates --precision int8 --calib: ort (our `calibrate --mode trt`) or modelopt "
                   "(NVIDIA ModelOpt ONNX PTQ, if installed) [default: ort].")
@click.option("--from-onnx", "from_onnx", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Build the engine from this exported (or `calibrate --mode trt`) FILE.onnx instead of exporting "
                   "again: how to build on the target GPU/Jetson, which needs no torch (--format engine).")
@click.option("--list", "list_", is_flag=True, is_eager=True, expose_value=False, callback=_list_callback,
              help="List the registered backbones and exit.")
def export(backbone: str, weights: str | None, image_size: int | None, layers: str | None, full_embedding: bool,
           opset: int, out: Path | None, fmt: str, precision: str | None, calib_dir: Path | None,
           max_batch: int | None, quantizer: str | None, from_onnx: Path | None) -> None:
    """Export a backbone to ONNX with musc-edge metadata, and check it against torch.

    The graph takes `image` (B, 3, S, S) float32, normalised, any batch B, and returns
    `tokens_0`..`tokens_{k-1}` (B, 1 + G*G, C), one per tapped layer, and `embedding` (B, D).
    After writing, torch and ONNX Runtime are compared on a batch of 2 and the export fails above
    1e-3 max abs difference. `--format engine` then builds a TensorRT engine from the ONNX file;
    `--format engine --from-onnx FILE.onnx` builds one from a file exported earlier (engines are
    tied to the GPU and TensorRT that build them, so build them on the target machine).
    """
    if quantizer is not None and calib_dir is None:
        raise InputError("--quantizer chooses who calibrates --calib images: add --precision int8 --calib DIR")
    if from_onnx is not None:
        _engine_from_onnx(from_onnx, out, fmt, precision, calib_dir, max_batch, quantizer or "auto",
                          export_flags={"--weights": weights, "--image-size": image_size, "--layers": layers,
                                        "--full-embedding": full_embedding or None})
        return
    spec = backbones.get_spec(backbone)
    if fmt != "engine" and (precision or calib_dir or max_batch):
        raise InputError("--precision, --calib and --max-batch apply to TensorRT engines: add --format engine")
    if precision != "int8" and calib_dir is not None:
        raise InputError("--calib is for INT8 calibration: add --precision int8")
    layer_tuple = backbones.resolve_layers(spec, None if layers is None else parse_int_list(layers, "--layers"))
    size = backbones.resolve_image_size(spec, image_size)
    out = out or Path(f"{spec.name}_{size}.onnx")
    if out.suffix.lower() != ".onnx":
        raise InputError(f"--out {out} must end in .onnx")

    _require_export_stack(spec.family)
    from musc_edge.export.onnx import export_onnx
    from musc_edge.export.weights import resolve_weights

    choice = resolve_weights(spec, weights)
    if choice.is_random:
        click.echo(RANDOM_WARNING, err=True)
    built = backbones.builder_for(spec)(spec, choice, size, layer_tuple, keep_all_blocks=full_embedding)
    result = export_onnx(built, out, opset=opset)
    for name, diff in result.max_abs_diff.items():
        click.echo(f"parity torch vs onnxruntime (batch 2): {name:<10} max abs diff {diff:.2e}")
    meta = result.meta
    click.echo(f"wrote {result.path}: {meta.backbone}, weights {meta.weights}, {meta.image_size}px, "
               f"grid {meta.grid}x{meta.grid}, layers {','.join(map(str, meta.layers))}, "
               f"embedding from block {built.embedding_layer} of {spec.num_blocks}")
    if fmt == "engine":
        engine = _build_engine(result.path, meta, precision or "fp16", calib_dir, max_batch or 8,
                               quantizer=quantizer or "auto")
        click.echo(f"wrote {engine}")


def _require_export_stack(family: str) -> None:
    """One line naming the extra when torch / onnx / open_clip are missing (not a traceback)."""
    needed = ["torch", "onnx", "onnxruntime"] + (["open_clip"] if family == "clip" else [])
    missing = missing_modules(*needed)
    if missing:
        extras = "cpu,export" if "onnxruntime" in missing else "export"  # ORT: [cpu] or [gpu], never both
        raise MuscEdgeError(f"`musc-edge export` needs {', '.join(missing)}, not installed here: "
                            f"pip install 'musc-edge[{extras}]' on the export workstation")


def _engine_from_onnx(onnx_path: Path, out: Path | None, fmt: str, precision: str | None, calib_dir: Path | None,
                      max_batch: int | None, quantizer: str, export_flags: dict[str, object]) -> None:
    """``--from-onnx``: an engine from an existing musc-edge ONNX file, without torch."""
    from musc_edge.runtime.model import read_meta, warn_if_random

    if fmt != "engine":
        raise InputError("--from-onnx builds a TensorRT engine: add --format engine")
    given = [flag for flag, value in export_flags.items() if value is not None]
    ctx = click.get_current_context()
    for flag, param in (("--opset", "opset"), ("--backbone", "backbone")):
        if ctx.get_parameter_source(param) is click.core.ParameterSource.COMMANDLINE:
            given.insert(0, flag)
    if given:
        raise InputError(f"{', '.join(given)} shape a new export; with --from-onnx the ONNX file already fixes them")
    if onnx_path.suffix.lower() != ".onnx" or not onnx_path.is_file():
        raise InputError(f"--from-onnx {onnx_path}: not an existing .onnx file")
    if out is not None and out.suffix.lower() == ".onnx":
        raise InputError(f"--out {out}: with --from-onnx, --out names the engine (FILE.engine)")
    _require_engine_stack()
    meta = read_meta(onnx_path)  # one-line ModelError for a file without musc-edge metadata
    warn_if_random(meta, onnx_path)
    if precision is None:
        from musc_edge.export.tensorrt import has_qdq

        precision = "int8" if has_qdq(onnx_path) else "fp16"  # a calibrated Q/DQ model is INT8 by construction
    engine = _build_engine(onnx_path, meta, precision, calib_dir, max_batch or 8, engine_path=out,
                           quantizer=quantizer)
    click.echo(f"wrote {engine} ({precision}, batch 1..{max_batch or 8})")


def _build_engine(onnx_path: Path, meta, precision: str, calib_dir: Path | None, max_batch: int,
                  engine_path: Path | None = None, quantizer: str = "auto") -> Path:
    """Hand the ONNX file to the TensorRT builder (docs/int8_tensorrt.md), imported only here."""
    try:
        from musc_edge.export.tensorrt import build_engine

        engine_path = engine_path or onnx_path.with_suffix(".engine")
        result = build_engine(onnx_path, engine_path, meta, precision=precision, calib_dir=calib_dir,
                              max_batch=max_batch, quantizer=quantizer)
    except ImportError as e:  # onnx or onnxruntime, which the export path has not checked
        raise _engine_stack_error([e.name or str(e)]) from None
    return Path(result) if isinstance(result, (str, Path)) else engine_path


def _require_engine_stack() -> None:
    """One line naming every package an engine build on this machine lacks, before any work."""
    from musc_edge.export import tensorrt as trt_build

    missing = []
    for name, importer in (("tensorrt", trt_build.import_tensorrt), ("cuda-python", trt_build.import_cudart)):
        try:
            importer()
        except DeviceError:
            missing.append(name)
    missing += [{"onnxruntime": "onnxruntime-gpu"}.get(m, m) for m in missing_modules("onnx", "onnxruntime")]
    if missing:
        raise _engine_stack_error(missing)


def _engine_stack_error(missing: list[str]) -> DeviceError:
    return DeviceError(f"building a TensorRT engine needs {', '.join(missing)}, not installed here: "
                       "pip install 'musc-edge[gpu,trt]' on the NVIDIA machine, or use --format onnx")
