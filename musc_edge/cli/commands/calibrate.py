"""``musc-edge calibrate``: an INT8 model from line images, with an FP32-vs-INT8 report."""

from __future__ import annotations

from pathlib import Path

import click

from musc_edge.core.errors import MuscEdgeError
from musc_edge.cli.options import batch_option, model_flag, score_device_option


@click.command(name="calibrate")
@model_flag("FP32 ONNX model from `musc-edge export` (FILE.onnx; engines are built from it, not calibrated).")
@click.option("--images", "images", required=True, type=click.Path(path_type=Path),
              help="Folder of line images (flat, or an MVTec-style category with test/ and ground_truth/).")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="INT8 model to write, e.g. model.int8.onnx (the report goes to model.int8.report.json).")
@click.option("--mode", type=click.Choice(["static", "static-pc", "static-cnn", "dynamic", "trt"]), default=None,
              help="static: u8 activations, s8 weights per tensor; static-pc: s8 activations, per-channel "
                   "weights; static-cnn: the ReLU6-CNN recipe (u8 activations, per-channel weights, ReLU6 "
                   "ranges, 7-bit dense weights, stem and first depthwise conv in FP32); dynamic: MatMul "
                   "weights only, no calibration; trt: symmetric Q/DQ for TensorRT. Default: dynamic for "
                   "ViTs, static-cnn for CNNs (EfficientNet-Lite0: image AUROC within 0.01 of FP32 on "
                   "the MTD subset); see docs/int8_tensorrt.md.")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default=None,
              help="Calibration method for the static modes [default: minmax].")
@click.option("--num", default=64, show_default=True, type=int, help="Calibration images.")
@click.option("--holdout", default=16, show_default=True, type=int,
              help="Held-out images (never calibrated on) for the cosine comparison.")
@batch_option
@click.option("--cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="JSON cache of activation ranges: reused when it exists, written otherwise.")
@click.option("--no-report", is_flag=True, help="Skip the FP32-vs-INT8 report.")
@click.option("--no-musc", is_flag=True, help="Report without the MuSc AUROC comparison (faster).")
@click.option("--threads", default=0, show_default=True, type=click.IntRange(0, 256),
              help="ONNX Runtime threads for the report's comparison (0 = all cores).")
@score_device_option
def calibrate(model_path: Path, images: Path, out_path: Path, mode: str | None, method: str | None, num: int,
              holdout: int, batch: int, cache: Path | None, no_report: bool, no_musc: bool, threads: int,
              score_device: str) -> None:
    """Build an INT8 model from a folder of line images and report what it costs.

    Quantizes the FP32 ONNX model with ONNX Runtime on the CPU, keeping its musc-edge metadata,
    then compares FP32 and INT8 on held-out images: per-output cosine similarity, file size,
    speed, and (when the folder has labels/masks) image and pixel AUROC through the full MuSc
    pipeline. The report is written next to the INT8 model: --out x.int8.onnx -> x.int8.report.json.

    Example: musc-edge calibrate --model vit_b16.onnx --images line/ --out vit_b16.int8.onnx
    """
    from musc_edge.cli.commands import missing_modules

    missing = missing_modules("onnx", "onnxruntime")
    if missing:  # name both at once: [calib] alone brings onnx, not ONNX Runtime
        raise MuscEdgeError(f"`musc-edge calibrate` needs {' and '.join(missing)}, not installed here: pip install "
                            "'musc-edge[cpu,calib]' (or [gpu,calib])")
    try:
        from musc_edge.calibration.calibrate import calibrate_folder
    except ImportError as e:  # a module below onnx/onnxruntime (checked above) is broken or missing
        raise MuscEdgeError(f"`musc-edge calibrate` needs the module {e.name or str(e)!r}, which is not "
                            "installed: pip install 'musc-edge[cpu,calib]' (or [gpu,calib])") from None

    run = calibrate_folder(model_path, images, out_path, mode=mode, method=method, num=num, holdout=holdout,
                           batch=batch, cache=cache, report=not no_report, musc=not no_musc,
                           threads=threads or None, score_device=score_device)
    cfg = run.result.config
    how = (f"{cfg.method}, {len(run.result.calibration_images)} calibration images" if cfg.calibrated
           else "no calibration: activation scales are computed at run time")
    click.echo(f"wrote {run.result.path} ({cfg.mode}, {how})")
    if run.report is not None:
        click.echo(format_report(run.report))
        click.echo(f"report: {run.report_path}")


def format_report(report: dict) -> str:
    """A few lines a person reads: cosine, size, speed, AUROC drop."""
    lines = ["  cosine (min over held-out images): " + ", ".join(
        f"{k} {v['min']:.4f}" for k, v in report["cosine"].items())]
    s = report["speed"]
    speed = (f"speed: skipped ({s['skipped']})" if "skipped" in s else
             f"speed {s['int8_images_per_s']:.2f} vs {s['fp32_images_per_s']:.2f} images/s "
             f"({s['ratio']:.2f}x) at batch {s['batch']}")
    lines.append(f"  size {report['int8_model']['bytes'] / 2**20:.1f} MiB ({report['size_ratio']:.2f}x FP32); {speed}")
    if report.get("execution", {}).get("int8_arithmetic") == "simulated":
        lines.append("  INT8 side evaluated as simulated quantization (TensorRT's arithmetic), not ORT's CPU int8 kernels")
    m = report["musc"]
    if "skipped" in m:
        lines.append(f"  MuSc metrics: skipped ({m['skipped']})")
    else:
        for key in ("image", "pixel"):
            a = (m["fp32"] or {}).get(key) or {}
            b = (m["int8"] or {}).get(key) or {}
            if a.get("auroc") is not None and b.get("auroc") is not None:
                lines.append(f"  {key} AUROC FP32 {a['auroc']:.4f}  INT8 {b['auroc']:.4f}  "
                             f"(drop {a['auroc'] - b['auroc']:+.4f}, {m['images']} images)")
    return "\n".join(lines)
