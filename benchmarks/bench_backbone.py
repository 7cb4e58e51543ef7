"""Backbone throughput: torch eager against ONNX Runtime (CPU), side by side in one process.

    python benchmarks/bench_backbone.py                      # ViT-B/16 @ 224, batch 1 and 8
    python benchmarks/bench_backbone.py --modes torch,ort --batches 8 --repeats 5
    python benchmarks/bench_backbone.py --modes torch,ort,ort-attention    # + ORT's fused Attention op
    python benchmarks/bench_backbone.py --backbone efficientnet_lite0
    python benchmarks/bench_backbone.py --modes ort,int8-static,int8-static-pc,int8-dynamic --batches 8

Prints one JSON object: images/s per (mode, batch), the ratio of every mode to ``torch`` at each
batch, and the issue-3 floor (ONNX Runtime >= 1.5x torch at batch 8). Random weights are used for
CLIP ViTs (speed does not depend on them); the model is exported with the project's own exporter
into a temporary folder unless ``--onnx FILE`` names one.

Modes are plain functions registered in :data:`MODES`: ``make(ctx) -> run(batch_array)``. To add
one (INT8, another provider), write such a function, decorate it with ``@mode("name")`` and pass
``--modes torch,ort,name``. Runs of all modes are interleaved round by round so that load from other
processes hits every mode alike; the median run time is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

Runner = Callable[[np.ndarray], object]
MODES: dict[str, Callable[["BenchContext"], Runner]] = {}
#: The floor (README, Benchmarks): ONNX Runtime must reach this multiple of torch eager's images/s at batch 8.
FLOOR = {"mode": "ort", "baseline": "torch", "batch": 8, "min_ratio": 1.5}


def mode(name: str):
    """Register ``make(ctx) -> runner`` as benchmark mode ``name``."""
    def deco(fn: Callable[["BenchContext"], Runner]) -> Callable[["BenchContext"], Runner]:
        MODES[name] = fn
        return fn
    return deco


@dataclass
class BenchContext:
    """What mode factories get: the built torch backbone, the FP32 ONNX file, threads, scratch dir."""

    backbone: str
    image_size: int
    threads: int
    workdir: Path
    onnx_path: Path | None = None
    _built: object = None
    extra: dict = field(default_factory=dict)

    @property
    def built(self):
        """The torch backbone (random weights for CLIP, packaged weights for EfficientNet)."""
        if self._built is None:
            from musc_edge.export import backbones
            from musc_edge.export.weights import resolve_weights

            spec = backbones.get_spec(self.backbone)
            weights = "random" if spec.family == "clip" else None
            self._built = backbones.builder_for(spec)(spec, resolve_weights(spec, weights), self.image_size,
                                                      spec.layers)
        return self._built

    def fp32_onnx(self) -> Path:
        """The FP32 ONNX model: ``--onnx`` or exported once with musc-edge's exporter."""
        if self.onnx_path is None:
            from musc_edge.export.onnx import export_onnx

            self.onnx_path = export_onnx(self.built, self.workdir / f"{self.backbone}_{self.image_size}.onnx").path
        return self.onnx_path


def ort_session(path: Path, threads: int, spin: bool = True):
    """The runtime's own CPU session (what `musc-edge score --device cpu` runs on).

    ``spin=False`` (``--passive``) only adds ``session.intra_op.allow_spinning=0``.
    """
    from musc_edge.runtime.backends.onnxruntime import open_session

    return open_session(path, threads=threads, config=None if spin else {"session.intra_op.allow_spinning": "0"})


@mode("torch")
def torch_eager(ctx: BenchContext) -> Runner:
    """torch eager as a user runs it: inference mode, same thread count as ONNX Runtime."""
    import torch

    torch.set_num_threads(ctx.threads)
    module = ctx.built.module

    def run(x: np.ndarray):
        with torch.inference_mode():
            return module(torch.from_numpy(x))
    return run


@mode("ort")
def ort_cpu(ctx: BenchContext) -> Runner:
    """ONNX Runtime CPU on the exported FP32 graph, through the runtime's session (score's config)."""
    sess = ort_session(ctx.fp32_onnx(), ctx.threads, spin=not ctx.extra.get("passive", False))
    name = sess.get_inputs()[0].name

    def run(x: np.ndarray):
        return sess.run(None, {name: x})
    return run


def _split_qkv_attention(self, x):
    """ExportBlock attention with separate q/k/v projections, in the subgraph pattern that
    onnxruntime.transformers' CLIP fusion turns into com.microsoft Attention (same arithmetic)."""
    import torch

    c, h, d, n = self.heads * self.head_dim, self.heads, self.head_dim, self.tokens
    w, b = self.in_proj_weight, self.in_proj_bias
    lin = torch.nn.functional.linear
    q = lin(x, w[:c], b[:c]).reshape(-1, n, h, d).transpose(1, 2)
    k = lin(x, w[c:2 * c], b[c:2 * c]).reshape(-1, n, h, d).permute(0, 2, 3, 1)
    v = lin(x, w[2 * c:], b[2 * c:]).reshape(-1, n, h, d).transpose(1, 2)
    a = torch.softmax((q @ k) * self.scale, dim=-1)
    return self.out_proj((a @ v).transpose(1, 2).reshape(-1, n, c))


@mode("ort-attention")
def ort_fused_attention(ctx: BenchContext) -> Runner:
    """Experiment (not used by the runtime): CLIP ViT exported with split q/k/v, then
    onnxruntime.transformers.optimizer(model_type="clip") fuses each block's attention into one
    com.microsoft Attention op (and SkipLayerNormalization); run with the runtime's session."""
    from unittest import mock

    from musc_edge.export.clip import ExportBlock
    from musc_edge.export.onnx import export_onnx
    from onnxruntime.transformers import optimizer

    if ctx.built.spec.family != "clip":
        raise SystemExit("mode ort-attention needs a CLIP ViT backbone")
    plain = ctx.workdir / "split_qkv.onnx"
    with mock.patch.object(ExportBlock, "attention", _split_qkv_attention):
        export_onnx(ctx.built, plain)
    blk = ctx.built.export_module.blocks[0]
    opt = optimizer.optimize_model(str(plain), model_type="clip", num_heads=blk.heads,
                                   hidden_size=blk.heads * blk.head_dim, opt_level=0, use_gpu=False)
    fused = opt.get_fused_operator_statistics()
    out = ctx.workdir / "split_qkv.ort_fused.onnx"
    opt.save_model_to_file(str(out))
    sess = ort_session(out, ctx.threads, spin=not ctx.extra.get("passive", False))
    name = sess.get_inputs()[0].name
    import torch

    x = np.random.default_rng(1).standard_normal((2, 3, ctx.image_size, ctx.image_size), dtype=np.float32)
    with torch.inference_mode():
        ref = [t.numpy() for t in ctx.built.module(torch.from_numpy(x))]
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(ref, sess.run(None, {name: x})))
    ctx.extra.setdefault("notes", {})["ort-attention"] = {
        "fused_ops": {k: v for k, v in fused.items() if v}, "max_abs_diff_to_torch": diff}

    def run(x: np.ndarray):
        return sess.run(None, {name: x})
    return run


# INT8 modes (docs/int8_tensorrt.md): each quantizes the FP32 export with `musc-edge calibrate`'s library
# function, calibrated on good images of the shipped MTD sample (speed does not depend on which).
# Accuracy (cosine, MuSc AUROC) of the same modes: benchmarks/bench_int8.py.
INT8_CALIB = Path(__file__).resolve().parents[1] / "examples" / "mtd_sample" / "magnetic_tile" / "test" / "good"


def _int8_mode(quant_mode: str) -> Callable[[BenchContext], Runner]:
    def make(ctx: BenchContext) -> Runner:
        from musc_edge.calibration.quantize import make_config, quantize_model

        images = sorted(INT8_CALIB.glob("*.jpg"))[:16]
        out = ctx.workdir / f"{ctx.backbone}.{quant_mode}.int8.onnx"
        quantize_model(ctx.fp32_onnx(), out, make_config(quant_mode, num=len(images)), images)
        sess = ort_session(out, ctx.threads)
        name = sess.get_inputs()[0].name

        def run(x: np.ndarray):
            return sess.run(None, {name: x})
        return run
    make.__doc__ = f"ONNX Runtime CPU on the INT8 model of `musc-edge calibrate --mode {quant_mode}`."
    return make


for _quant_mode in ("static", "static-pc", "dynamic"):
    mode(f"int8-{_quant_mode}")(_int8_mode(_quant_mode))


def measure(runners: dict[str, Runner], batch: int, size: int, repeats: int, warmup: int,
            budget_s: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall and process-CPU seconds per run of every runner, interleaved round by round (stops
    early past ``budget_s``). CPU seconds show work done, robust to other processes' load; they
    include spin-waiting of idle worker threads."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    for run in runners.values():
        for _ in range(warmup):
            run(x)
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpu: dict[str, list[float]] = {name: [] for name in runners}
    start = time.perf_counter()
    for i in range(repeats):
        for name, run in runners.items():
            t0, c0 = time.perf_counter(), time.process_time()
            run(x)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return times, cpu


def environment(threads: int) -> dict:
    import onnxruntime
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
            "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_b16")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    p.add_argument("--modes", default="torch,ort", help=f"comma-separated, from: {', '.join(MODES)}")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="intra-op threads for every mode")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode and batch")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--budget", type=float, default=120.0, help="seconds of timed runs per batch size, at most")
    p.add_argument("--onnx", type=Path, default=None, help="use this FP32 ONNX file instead of exporting")
    p.add_argument("--passive", action="store_true",
                   help="idle worker threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE for torch, "
                        "allow_spinning=0 for ONNX Runtime): fairer on a machine shared with other jobs")
    args = p.parse_args(argv)
    if args.passive:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch's OpenMP starts: before any torch import

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {', '.join(unknown)}; known: {', '.join(MODES)}")
    batches = [int(b) for b in args.batches.split(",")]

    from musc_edge.export import backbones

    spec = backbones.get_spec(args.backbone)
    size = args.image_size or spec.image_size
    with tempfile.TemporaryDirectory(prefix="bench_backbone_") as tmp:
        ctx = BenchContext(args.backbone, size, args.threads, Path(tmp), args.onnx, extra={"passive": args.passive})
        t0 = time.perf_counter()
        runners = {m: MODES[m](ctx) for m in modes}
        setup_s = time.perf_counter() - t0
        results, ratios = [], {}
        for batch in batches:
            times, cpu = measure(runners, batch, size, args.repeats, args.warmup, args.budget)
            per_mode = {}
            for m, ts in times.items():
                med = statistics.median(ts)
                per_mode[m] = batch / med
                results.append({"mode": m, "batch": batch, "images_per_s": round(batch / med, 3),
                                "ms_per_batch_median": round(1e3 * med, 1), "ms_per_batch_min": round(1e3 * min(ts), 1),
                                "cpu_s_per_image_median": round(statistics.median(cpu[m]) / batch, 3),
                                "runs": len(ts)})
            if "torch" in per_mode:
                for m, ips in per_mode.items():
                    if m != "torch":
                        ratios[f"{m}/torch@{batch}"] = round(ips / per_mode["torch"], 3)
            if "ort" in per_mode:  # INT8 against the FP32 graph on the same runtime
                for m, ips in per_mode.items():
                    if m.startswith("int8-"):
                        ratios[f"{m}/ort@{batch}"] = round(ips / per_mode["ort"], 3)

    key = f"{FLOOR['mode']}/{FLOOR['baseline']}@{FLOOR['batch']}"
    report = {
        "benchmark": "bench_backbone", "backbone": args.backbone, "image_size": size,
        "weights": "random" if spec.family == "clip" else spec.weights, "setup_s": round(setup_s, 1),
        "passive_threads": args.passive,
        "ort_session": "musc_edge.runtime.backends.onnxruntime.open_session (ORT_ENABLE_ALL, sequential, "
                       f"{args.threads} intra-op threads{', no spinning' if args.passive else ''})",
        "environment": environment(args.threads), "results": results, "ratios": ratios,
        **({"notes": ctx.extra["notes"]} if ctx.extra.get("notes") else {}),
        "floor": {**FLOOR, "measured": ratios.get(key),
                  "pass": None if key not in ratios else ratios[key] >= FLOOR["min_ratio"]},
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
