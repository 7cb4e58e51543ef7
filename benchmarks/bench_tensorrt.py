"""TensorRT engine runner against ONNX Runtime's CUDA provider, side by side on one GPU.

    python benchmarks/bench_tensorrt.py --backbone vit_b16 --batches 1,8 --precisions fp16,int8 [--quantizer modelopt]

Exports the backbone (random weights for CLIP ViTs: speed does not depend on them), builds one
engine per precision with ``musc_edge.export.tensorrt.build_engine`` (INT8 calibrated on the MTD
sample), and times every model interleaved round by round, median per model. Prints one JSON
object: images/s per (model, batch), ratio to the CUDA provider, and the per-output cosine of
each engine against ONNX Runtime. Needs tensorrt, cuda-python and onnxruntime-gpu; exits 2 with
a one-line reason where they or a GPU are missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "mtd_sample" / "magnetic_tile"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default="vit_b16")
    p.add_argument("--onnx", type=Path, default=None)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--precisions", default="fp16,int8")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quantizer", choices=("ort", "modelopt"), default="ort",
                   help="who calibrates the int8 engine (export/tensorrt.py: quantize_for_tensorrt)")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]

    from musc_edge.core.errors import MuscEdgeError

    try:
        return _run(args, batches)
    except MuscEdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, batches: list[int]) -> int:
    import onnxruntime as ort

    from musc_edge.calibration.reader import load_batch
    from musc_edge.calibration.report import cosine_per_image
    from musc_edge.export.tensorrt import build_engine
    from musc_edge.runtime.backends.tensorrt import cuda_info, import_tensorrt
    from musc_edge.runtime.model import load_model, read_meta

    trt = import_tensorrt()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        print("error: onnxruntime has no CUDAExecutionProvider: pip install 'musc-edge[gpu]'", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench_trt_") as tmp:
        onnx_path = args.onnx
        if onnx_path is None:
            sys.path.insert(0, str(REPO / "benchmarks"))
            from bench_int8 import export_fp32

            onnx_path = export_fp32(args.backbone, Path(tmp))
        meta = read_meta(onnx_path)
        models = {"ort-cuda": load_model(onnx_path, "cuda")}
        build_s = {}
        for prec in [x for x in args.precisions.split(",") if x]:
            t = time.perf_counter()
            engine = build_engine(onnx_path, Path(tmp) / f"{prec}.engine", meta, precision=prec,
                                  calib_dir=SAMPLE if prec == "int8" else None, max_batch=max(batches),
                                  quantizer=args.quantizer)
            build_s[prec] = round(time.perf_counter() - t, 1)
            models[f"trt-{prec}"] = load_model(engine)
        paths = sorted((SAMPLE / "test").rglob("*.jpg"))
        results, cosine = [], {}
        for b in batches:
            x, _ = load_batch(paths[:b], meta)
            ref = None
            for name, m in models.items():
                out = m(x)
                if name == "ort-cuda":
                    ref = out
                elif b == max(batches):
                    pairs = zip(list(ref.tokens) + [ref.embedding], list(out.tokens) + [out.embedding])
                    cosine[name] = [round(float(cosine_per_image(a, c).min()), 5) for a, c in pairs]
            times: dict[str, list[float]] = {k: [] for k in models}
            for _ in range(args.repeats):
                for name, m in models.items():
                    t = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t)
            base = statistics.median(times["ort-cuda"])
            for name, ts in times.items():
                med = statistics.median(ts)
                results.append({"model": name, "batch": b, "images_per_s": round(b / med, 2),
                                "ratio_to_ort_cuda": round(base / med, 3)})
        for m in models.values():
            m.close()
    out = {"benchmark": "bench_tensorrt", "backbone": args.backbone, "tensorrt": trt.__version__,
           "int8_quantizer": args.quantizer,
           **cuda_info(), "build_s": build_s, "results": results, "cosine_min_vs_ort": cosine}
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
