#!/usr/bin/env python
"""What ``--precision fast`` changes against ``exact``, measured on real data (MTD, MUSC_SPEC 6).

Extracts the features of every image of a data set once (ONNX Runtime on the CPU), scores the
whole pool on the GPU in both precisions (and optionally on the CPU), and prints one JSON object:
image and pixel AUROC of each, their differences, the largest difference between the two runs'
patch maps, and the seconds each scoring took. ``fast`` ships only if image AUROC moves by at
most 0.002 (``fast_within_0.002``).

    python benchmarks/bench_precision.py --model effnet.onnx --data ../shared/data/mtd/magnetic_tile
    python benchmarks/bench_precision.py ... --devices cpu          # the CPU alone (exact only)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from musc_edge.core.device import resolve_device
from musc_edge.core.errors import MuscEdgeError
from musc_edge.core.scorer import score_tokens
from musc_edge.datasets import discover
from musc_edge.datasets.evaluation import evaluate
from musc_edge.runtime.model import load_model
from musc_edge.runtime.pipeline import iter_features


def features(model: Path, data: Path, batch: int):
    dataset = discover(data)
    by_path = {s.path: s for s in dataset.samples}
    tokens, emb, samples, sizes = None, [], [], []
    t = time.perf_counter()
    with load_model(model, "cpu") as m:
        for b in iter_features([s.path for s in dataset.samples], m, batch, workers=4):
            if b.features is None:
                continue
            if tokens is None:
                tokens = [[] for _ in b.features.tokens]
            for layer, x in enumerate(b.features.tokens):
                tokens[layer].append(np.asarray(x, np.float16))  # as `musc-edge score` keeps them
            emb.append(b.features.embedding)
            samples += [by_path[p] for p in b.paths]
            sizes += list(b.sizes)
    return [np.concatenate(t) for t in tokens], np.concatenate(emb), samples, sizes, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--devices", default="cuda", help="cuda (exact and fast), cpu, or cuda,cpu")
    args = ap.parse_args()
    try:
        plan = [(name, precision) for name in args.devices.split(",")
                for precision in (("exact", "fast") if name == "cuda" else ("exact",))]
        devices = {key: resolve_device(*key) for key in plan}  # no GPU: one line before minutes of features
        tokens, emb, samples, sizes, feat_s = features(args.model, args.data, args.batch)
        runs = {}
        for name, precision in plan:
            dev = devices[(name, precision)]
            score_tokens([t[:8] for t in tokens], emb[:8], device=dev)  # warm-up: kernels, cuBLAS handles
            t = time.perf_counter()
            scores = score_tokens(tokens, emb, device=dev)
            seconds = time.perf_counter() - t
            metrics = evaluate(samples, sizes, scores, [])
            runs[f"{name}_{precision}"] = {
                "device": dev.name, **dev.info, "score_s": round(seconds, 3),
                "ms_per_image": round(1000 * seconds / len(samples), 2),
                "image_auroc": metrics["image"]["auroc"], "pixel_auroc": (metrics["pixel"] or {}).get("auroc"),
                "aupro": (metrics["pixel"] or {}).get("aupro"), "_maps": scores.patch_maps}
    except MuscEdgeError as e:
        raise SystemExit(f"error: {e}") from None
    out = {"benchmark": "precision", "data": str(args.data), "images": len(samples), "model": str(args.model),
           "features_s": round(feat_s, 2), "runs": {}}
    maps = {key: r.pop("_maps") for key, r in runs.items()}
    base = maps.get("cuda_exact", maps.get("cpu_exact"))
    for key, r in runs.items():
        r["max_abs_map_diff_vs_exact"] = float(np.abs(maps[key] - base).max())
        out["runs"][key] = r
    if "cuda_fast" in runs and "cuda_exact" in runs:
        f, e = out["runs"]["cuda_fast"], out["runs"]["cuda_exact"]
        out["fast_minus_exact"] = {k: f[k] - e[k] for k in ("image_auroc", "pixel_auroc", "aupro")
                                   if f[k] is not None and e[k] is not None}
        out["fast_within_0.002"] = abs(out["fast_minus_exact"]["image_auroc"]) <= 0.002
    if "cpu_exact" in maps and "cuda_exact" in maps:
        out["cuda_exact_vs_cpu_max_abs_map_diff"] = float(np.abs(maps["cuda_exact"] - maps["cpu_exact"]).max())
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
