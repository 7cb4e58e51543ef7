"""Repeated defects: plain MuSc against consistent-anomaly exclusion on a set built from MTD.

    python benchmarks/bench_repeated.py                                   # exports Lite0 twice, ~25 min on 2 cores
    python benchmarks/bench_repeated.py --model lite0.onnx --mtd-model lite0_l5.onnx --out runs/repeated
    python benchmarks/bench_repeated.py --model lite0.onnx --rates '' --mtd-model lite0.onnx --mtd-subset 120

The set (deterministic, ``--seed``): ``--pool`` good MTD images (``test/good``, a seeded draw) and
``--ordinary`` ordinary defective ones (a seeded draw stratified over the defect types, rounded per
type, so 10 gives 9; the source image's type is left out, since MTD photographs each defect under
several exposures and the source's twins would join the pool), all
resized to ``--side`` x ``--side`` (bilinear) so that "the same place" is defined. One defect
(``--defect TYPE/STEM``, by default the dark blowhole ``blowhole/exp1_num_36290``, 0.6% of the image) is cut with
its mask from its image (resized the same way, mask nearest-neighbour) and pasted, pixel for pixel,
at the same place into the first 10%, 20% and 30% of the good images (nested: the 20% set holds the
10% set's images). Each rate is written as an MVTec-style category, so ``musc-edge score`` reads it:

    <out>/rate_<pct>/magnetic_tile/test/good/*.png           the good images left untouched
    <out>/rate_<pct>/magnetic_tile/test/repeated/*.png       the pasted ones
    <out>/rate_<pct>/magnetic_tile/test/<type>/*.png         the ordinary defective images
    <out>/rate_<pct>/magnetic_tile/ground_truth/<type>/<stem>_mask.png

Features come from the runtime (``load_model`` + ``iter_features``, the metadata's preprocessing),
scoring from ``musc_edge.core.scorer.score_tokens`` (plain) and
``musc_edge.core.consistent.score_tokens_consistent`` (the option), metrics from
``musc_edge.datasets.evaluation.evaluate`` (MUSC_SPEC 6), RsCIN on in both, as ``musc-edge score``.
Per rate: image AUROC / AP and pixel AUROC / AUPRO of both, the image AUROC of the pasted images
alone against the good ones, and what the option excluded (pairs, groups, how many of the pasted
images it found).

Plain MTD (``--mtd-model``; ``none`` skips it): the same two scorers on MTD itself, all 444 images
(``--mtd-subset 0``) or a stratified subset (``--mtd-subset N``, ``--seed``; each defect type keeps
its share, the rule of ``benchmarks/bench_quality.py``). Batch MuSc costs O(N^2 L^2): all 444 images
at the 28 x 28 grid take about 30 min on a 2-core CPU, so for all of them pass a model tapped at the
stride-16 stage only (``musc-edge export --backbone efficientnet_lite0 --layers 5``: a 14 x 14 grid;
``--mtd-model export``, the default, exports that).
The JSON's ``mtd.image_auroc_delta`` (option minus plain) must be >= -0.005.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("MUSC_EDGE_SHARED", REPO.parent / "shared")) / "data" / "mtd" / "magnetic_tile"
RATES = (0.1, 0.2, 0.3)
DEFAULT_DEFECT = "blowhole/exp1_num_36290"
CATEGORY = "magnetic_tile"


def _bench_quality():
    """benchmarks/bench_quality.py as a module (its extraction and subset rule, not copied)."""
    spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).with_name("bench_quality.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_quality", module)  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _read_gray(path: Path, side: int, *, mask: bool = False) -> np.ndarray:
    import cv2

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise RuntimeError(f"cannot read {path}")
    if mask:
        return cv2.resize(image, (side, side), interpolation=cv2.INTER_NEAREST) > 127
    return cv2.resize(image, (side, side), interpolation=cv2.INTER_LINEAR)


def _write_png(path: Path, image: np.ndarray) -> None:
    import cv2

    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image):
        raise RuntimeError(f"cannot write {path}")


def choose_images(mtd: Path, pool: int, ordinary: int, defect: str,
                  seed: int) -> tuple[list[Path], list[tuple[str, Path]]]:
    """The good images (a seeded draw of ``pool``) and the ordinary defective ones (``ordinary``,
    stratified over the defect types other than the pasted defect's, seeded), both in name order."""
    rng = np.random.default_rng(seed)
    goods = sorted((mtd / "test" / "good").glob("*.jpg"))
    if pool > len(goods):
        raise SystemExit(f"--pool {pool}: MTD has {len(goods)} good images")
    chosen = [goods[i] for i in np.sort(rng.choice(len(goods), size=pool, replace=False))]
    source_type = defect.split("/")[0]
    types = sorted(p.name for p in (mtd / "test").iterdir() if p.is_dir() and p.name not in ("good", source_type))
    groups = {t: sorted((mtd / "test" / t).glob("*.jpg")) for t in types}
    total = sum(len(g) for g in groups.values())
    picks: list[tuple[str, Path]] = []
    for t in types:
        k = min(len(groups[t]), max(1, round(ordinary * len(groups[t]) / total))) if ordinary else 0
        picks += [(t, groups[t][int(i)]) for i in np.sort(rng.choice(len(groups[t]), size=k, replace=False))]
    return chosen, picks


def build_sets(out: Path, *, mtd: Path = MTD, pool: int = 100, ordinary: int = 10, defect: str = DEFAULT_DEFECT,
               side: int = 224, rates: tuple[float, ...] = RATES, seed: int = 0) -> dict:
    """Write one MVTec-style category per rate under ``out`` (see the module docstring); return
    what was built: per rate its root and the pasted image count, and the defect's mask area."""
    d_type, d_stem = defect.split("/")
    source = _read_gray(mtd / "test" / d_type / f"{d_stem}.jpg", side)
    cut = _read_gray(mtd / "ground_truth" / d_type / f"{d_stem}_mask.png", side, mask=True)
    if not cut.any():
        raise SystemExit(f"--defect {defect}: its mask is empty at {side} x {side}")
    goods, ordinary_picks = choose_images(mtd, pool, ordinary, defect, seed)
    order = np.random.default_rng(seed + 1).permutation(len(goods))  # which goods get the defect, nested
    mask_png = cut.astype(np.uint8) * 255
    sets = {}
    for rate in rates:
        k = int(round(rate * len(goods)))
        pasted = set(int(i) for i in order[:k])
        root = out / f"rate_{round(rate * 100):02d}" / CATEGORY
        if root.exists():
            shutil.rmtree(root)
        for i, path in enumerate(goods):
            image = _read_gray(path, side)
            if i in pasted:
                image = np.where(cut, source, image)
                _write_png(root / "test" / "repeated" / f"{path.stem}.png", image)
                _write_png(root / "ground_truth" / "repeated" / f"{path.stem}_mask.png", mask_png)
            else:
                _write_png(root / "test" / "good" / f"{path.stem}.png", image)
        for t, path in ordinary_picks:
            _write_png(root / "test" / t / f"{path.stem}.png", _read_gray(path, side))
            mask = _read_gray(mtd / "ground_truth" / t / f"{path.stem}_mask.png", side, mask=True)
            _write_png(root / "ground_truth" / t / f"{path.stem}_mask.png", mask.astype(np.uint8) * 255)
        sets[rate] = {"root": str(root), "pasted": k, "good": len(goods) - k, "ordinary": len(ordinary_picks)}
    return {"defect": defect, "mask_area": round(float(cut.mean()), 4), "side": side, "pool": pool,
            "ordinary_types": sorted({t for t, _ in ordinary_picks}), "sets": sets}


def _r(value) -> float | None:
    return None if value is None else round(float(value), 4)


def _metrics(samples: list, sizes: list, scores) -> dict:
    """Image and pixel figures of one scoring (MUSC_SPEC 6), plus the pasted images alone."""
    from musc_edge.core.metrics import image_metrics
    from musc_edge.datasets.evaluation import evaluate

    warnings: list[str] = []
    m = evaluate(samples, sizes, scores, warnings) or {}
    image, pixel = m.get("image") or {}, m.get("pixel") or {}
    out = {"image_auroc": _r(image.get("auroc")), "image_ap": _r(image.get("ap")),
           "pixel_auroc": _r(pixel.get("auroc")), "aupro": _r(pixel.get("aupro"))}
    pasted = [i for i, s in enumerate(samples) if s.defect_type in ("repeated", "good")]
    if any(samples[i].defect_type == "repeated" for i in pasted):
        labels = np.array([int(samples[i].defect_type == "repeated") for i in pasted])
        out["image_auroc_repeated_vs_good"] = _r(image_metrics(labels, scores.image_scores[pasted])["auroc"])
    return out


def compare(samples: list, feats: dict, args: argparse.Namespace, params) -> dict:
    """Plain MuSc and the option (each ``--burnout``) on one pool: metrics, what was excluded, seconds."""
    from musc_edge.core.consistent import ConsistentOptions, distance_table, exclusions_from_table
    from musc_edge.core.lnamd import lnamd
    from musc_edge.core.scorer import score_tokens

    tokens, emb = feats["tokens"], feats["embedding"]
    t = time.perf_counter()
    plain = score_tokens(tokens, emb, params=params, device=args.score_device)
    row = {"images": len(samples), "plain": _metrics(samples, feats["sizes"], plain),
           "plain_score_s": round(time.perf_counter() - t, 1), "option": {}}
    t = time.perf_counter()
    base = ConsistentOptions(layer=args.layer, r=args.r)
    table = distance_table(lnamd(tokens[base.layer], base.r))
    row["search_table_s"] = round(time.perf_counter() - t, 1)
    repeated = {i for i, s in enumerate(samples) if s.defect_type == "repeated"}
    done: dict[bytes, dict] = {}
    for burnout in args.burnout:
        options = ConsistentOptions(layer=args.layer, r=args.r, burnout=burnout)
        t = time.perf_counter()
        exclude, groups = exclusions_from_table(table, params.interval, options)
        search_s = time.perf_counter() - t
        key = np.packbits(exclude).tobytes()
        if not exclude.any():
            metrics, score_s = row["plain"], 0.0  # nothing excluded: the plain scores, bit for bit
        elif key in done:
            metrics, score_s = done[key], 0.0
        else:
            t = time.perf_counter()
            scores = score_tokens(tokens, emb, params=params, device=args.score_device, exclude=exclude)
            score_s = time.perf_counter() - t
            metrics = done[key] = _metrics(samples, feats["sizes"], scores)
        found = {v for g in groups for v in g}
        row["option"][f"burnout_{burnout:g}"] = {
            **metrics,
            "groups": [len(g) for g in groups], "excluded_pairs": int(exclude.sum()),
            "grouped_images": sorted(samples[v].rel for v in found - repeated) if len(found - repeated) <= 20
            else f"{len(found - repeated)} images",
            "repeated_found": f"{len(found & repeated)}/{len(repeated)}" if repeated else None,
            "search_s": round(search_s, 1), "score_s": round(score_s, 1),
        }
    return row


def _model(path: str, layers: tuple[int, ...] | None, workdir: Path) -> Path:
    """``path``, or (``export``) EfficientNet-Lite0 at 224 px exported into ``workdir`` (needs torch)."""
    if path != "export":
        return Path(path)
    from musc_edge.export import backbones

    bq = _bench_quality()
    spec = backbones.get_spec("efficientnet_lite0")
    cfg = bq.Config("efficientnet_lite0", "default", layers or spec.layers, 224)
    return bq.export_config(cfg, workdir)[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="export",
                   help="ONNX model for the repeated sets, or export (Lite0, default taps) [export]")
    p.add_argument("--mtd-model", default="export",
                   help="ONNX model for plain MTD, export (Lite0 tapped at stage 5 only: 14 x 14), or none [export]")
    p.add_argument("--mtd-subset", type=int, default=0,
                   help="plain MTD: a stratified subset of N images (0: all 444) [0]")
    p.add_argument("--out", type=Path, default=None, help="write the sets here (kept) instead of a temporary folder")
    p.add_argument("--data", type=Path, default=MTD, help="the MTD category [../shared/data/mtd/magnetic_tile]")
    p.add_argument("--pool", type=int, default=100, help="good images in the pool [100]")
    p.add_argument("--ordinary", type=int, default=10, help="ordinary defective images added [10]")
    p.add_argument("--defect", default=DEFAULT_DEFECT, help=f"TYPE/STEM of the pasted defect [{DEFAULT_DEFECT}]")
    p.add_argument("--rates", default="10,20,30", help="percent of the good images that get the defect [10,20,30]")
    p.add_argument("--side", type=int, default=224, help="side the images are resized to [224]")
    p.add_argument("--seed", type=int, default=0, help="seed of every draw [0]")
    p.add_argument("--burnout", default="2,2.5",
                   help="comma list of ConsistentOptions.burnout values to report [2,2.5]")
    p.add_argument("--layer", type=int, default=-1, help="tapped layer index of the search [-1: the last]")
    p.add_argument("--r", type=int, default=3, help="LNAMD degree of the search [3]")
    p.add_argument("--score-device", default="cpu", choices=("cpu", "cuda", "auto"), help="MuSc device [cpu]")
    p.add_argument("--batch", type=int, default=8, help="feature batch size [8]")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores) [0]")
    args = p.parse_args(argv)
    args.burnout = [float(v) for v in args.burnout.split(",") if v.strip()]
    args.rates = tuple(float(v) / 100 for v in args.rates.split(",") if v.strip())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from musc_edge.core.params import DEFAULT_PARAMS
    from musc_edge.datasets import discover

    bq = _bench_quality()
    out: dict = {
        "benchmark": "bench_repeated",
        "command": " ".join(["python", "benchmarks/bench_repeated.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m_start": os.getloadavg()[0]},
        "settings": {"burnout": args.burnout, "layer": args.layer, "r": args.r, "score_device": args.score_device,
                     "params": DEFAULT_PARAMS.to_dict()},
    }
    with tempfile.TemporaryDirectory(prefix="bench_repeated_") as tmp:
        work = Path(tmp)
        root = args.out if args.out is not None else work / "sets"
        built = build_sets(root, mtd=args.data, pool=args.pool, ordinary=args.ordinary, defect=args.defect,
                           side=args.side, rates=args.rates, seed=args.seed)
        model = _model(args.model, None, work) if built["sets"] else None
        out["set"] = {k: v for k, v in built.items() if k != "sets"}
        out["model"] = str(model) if args.model != "export" else "efficientnet_lite0 @ 224, default taps (exported)"
        out["repeated"] = {}
        for rate, info in built["sets"].items():
            samples = list(discover(info["root"], "auto").samples)
            print(f"bench_repeated: rate {rate:.0%}, {len(samples)} images", file=sys.stderr, flush=True)
            feats = bq.extract(model, samples, "cpu", args.batch, args.threads)
            out["repeated"][f"{round(rate * 100)}%"] = {**{k: v for k, v in info.items() if k != "root"},
                                                        **compare(samples, feats, args, DEFAULT_PARAMS)}
        if args.mtd_model != "none":
            mtd_model = _model(args.mtd_model, (5,), work)
            samples = bq.pick_subset(list(discover(args.data, "auto").samples), args.mtd_subset, "random", args.seed)
            print(f"bench_repeated: plain MTD, {len(samples)} images", file=sys.stderr, flush=True)
            feats = bq.extract(mtd_model, samples, "cpu", args.batch, args.threads)
            row = compare(samples, feats, args, DEFAULT_PARAMS)
            row["model"] = (str(mtd_model) if args.mtd_model != "export"
                            else "efficientnet_lite0 @ 224, layers 5 (exported)")
            row["grid"] = feats["meta"].grid
            row["subset"] = {"n": args.mtd_subset, "pick": "random", "seed": args.seed} if args.mtd_subset else None
            for key, option in row["option"].items():
                if option["image_auroc"] is not None and row["plain"]["image_auroc"] is not None:
                    option["image_auroc_delta"] = round(option["image_auroc"] - row["plain"]["image_auroc"], 4)
            out["mtd"] = row
    out["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
