"""Benchmark of musc_edge.core.metrics on a category-sized pixel set; prints one JSON object.

Default: 500 random-blob masks of 224 x 224 (25 M pixels), float32 maps. Times, in seconds (best of
``--repeat`` runs, measured side by side in this one process):

* ``ours``: each pixel metric as a caller gets it alone (pooling + one sort + the metric), the
  shared stages (``pool``: checks + 8-connected labelling, ``rank``: the sort), and the full
  ``pixel_metrics`` call (all four metrics, one sort shared);
* ``baseline_per_threshold_aupro``: the spec's AUPRO as a loop over the 200 thresholds, each
  one vectorised over all images (the authors' loop, which also relabels every region at every
  threshold, is slower still);
* ``sklearn``: ``roc_auc_score``, ``average_precision_score`` and ``precision_recall_curve``
  (F1-max) on the flattened pixels, as the authors' evaluation calls them, and the largest
  absolute difference between their values and ours.

Run: ``python benchmarks/bench_metrics.py [--n 500] [--size 224] [--repeat 3] [--no-sklearn]
[--dtype float32|float64] [--no-baseline]`` (about a minute with both comparisons at the default size on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np

from musc_edge.core import metrics as M


def blob_masks_and_maps(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Half the images hold 1-3 random ellipses; maps are noise plus a bump inside the blobs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    maps = rng.normal(size=(n, size, size)).astype(np.float32)
    for i in range(n):
        if rng.random() < 0.5:
            continue
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(3, size / 6, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        maps[i] += masks[i] * np.float32(rng.uniform(0.5, 3.0))
    return masks, maps


def per_threshold_aupro(masks: np.ndarray, maps: np.ndarray, steps: int = 200, max_fpr: float = 0.3) -> float:
    """Baseline: the spec's loop over thresholds, each one vectorised over the whole image set.

    Already far faster than the authors' loop (which relabels regions at every threshold); it
    shows what one pass over every pixel per threshold costs.
    """
    import cv2

    region = np.zeros(masks.shape, np.int64)
    n_regions = 0
    for i, mask in enumerate(masks):
        n, lab = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        region[i] = np.where(lab > 0, lab + n_regions, 0)
        n_regions += n - 1
    area = np.bincount(region.ravel(), minlength=n_regions + 1)[1:]
    normal = ~masks
    n_normal = normal.sum()
    lo, hi = float(maps.min()), float(maps.max())
    pros, fprs = [], []
    for th in np.arange(lo, hi, (hi - lo) / steps):
        binary = maps > th
        found = np.bincount(region[binary], minlength=n_regions + 1)[1:]
        pros.append(np.mean(found / area))
        fprs.append((binary & normal).sum() / n_normal)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < max_fpr
    f = (fprs[keep] - fprs[keep].min()) / (fprs[keep].max() - fprs[keep].min())
    return float(-np.trapezoid(pros[keep], f))


def best_of(repeat: int, fn):
    times, value = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return min(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="number of masks")
    parser.add_argument("--size", type=int, default=224, help="mask side in pixels")
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (best is reported)")
    parser.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn comparison")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                        help="map dtype (the scorer's upsampled maps are float64)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the per-threshold AUPRO baseline")
    args = parser.parse_args()

    masks, maps = blob_masks_and_maps(args.n, args.size)
    maps = maps.astype(args.dtype, copy=False)
    r = args.repeat
    t_pool, pooled = best_of(r, lambda: M._pool_pixels(masks, maps, regions=True))
    t_rank, counts = best_of(r, lambda: M.rank_counts(pooled.scores, pooled.positive_scores))
    t_auroc, auroc = best_of(r, lambda: M._auroc(counts))
    t_ap, ap = best_of(r, lambda: M._average_precision(counts))
    t_f1, f1 = best_of(r, lambda: M._f1_max(counts))
    t_pro, pro = best_of(r, lambda: M._aupro_from(pooled, counts, 200, 0.3))
    t_all, result = best_of(r, lambda: M.pixel_metrics(masks, maps))
    t_aupro_alone, _ = best_of(r, lambda: M.aupro(masks, maps))
    t_no_pro, _ = best_of(r, lambda: M.pixel_metrics(masks, maps, pro=False))

    out = {
        "benchmark": "pixel metrics",
        "images": args.n, "size": [args.size, args.size], "pixels": int(masks.size),
        "anomalous_pixels": int(masks.sum()), "regions": pooled.n_regions, "map_dtype": str(maps.dtype),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__},
        "repeat": r,
        "ours_s": {
            "pixel_metrics_all_four": round(t_all, 3),
            "pixel_metrics_without_aupro": round(t_no_pro, 3),
            "aupro_alone": round(t_aupro_alone, 3),
            "stage_pool_and_label": round(t_pool, 3),
            "stage_sort_rank_counts": round(t_rank, 3),
            "stage_auroc": round(t_auroc, 4),
            "stage_ap": round(t_ap, 4),
            "stage_f1_max": round(t_f1, 4),
            "stage_aupro": round(t_pro, 4),
        },
        "values": {"auroc": auroc, "ap": ap, "f1_max": f1, "aupro": pro},
    }
    assert result == out["values"], (result, out["values"])

    if not args.no_sklearn:
        from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

        y, s = masks.ravel(), maps.ravel()
        t_sk_auroc, sk_auroc = best_of(1, lambda: roc_auc_score(y, s))
        t_sk_ap, sk_ap = best_of(1, lambda: average_precision_score(y, s))

        def sk_f1():
            p, rec, _ = precision_recall_curve(y, s)
            with np.errstate(invalid="ignore", divide="ignore"):
                f = 2 * p * rec / (p + rec)
            return float(np.max(f[np.isfinite(f)]))

        t_sk_f1, sk_f1_max = best_of(1, sk_f1)
        out["sklearn_s"] = {"auroc": round(t_sk_auroc, 3), "ap": round(t_sk_ap, 3), "f1_max": round(t_sk_f1, 3),
                            "three_together": round(t_sk_auroc + t_sk_ap + t_sk_f1, 3)}
        out["max_abs_diff_vs_sklearn"] = max(abs(auroc - sk_auroc), abs(ap - sk_ap), abs(f1 - sk_f1_max))
        out["speedup_auroc_ap_f1"] = round((t_sk_auroc + t_sk_ap + t_sk_f1) / t_no_pro, 1)
    if not args.no_baseline:
        t_base, base = best_of(1, lambda: per_threshold_aupro(masks, maps))
        out["baseline_per_threshold_aupro_s"] = round(t_base, 3)
        out["aupro_abs_diff_vs_baseline"] = abs(base - pro)
        out["speedup_aupro_alone_vs_baseline"] = round(t_base / t_aupro_alone, 1)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
