"""Detection quality of backbones on MTD: image AUROC, pixel AUROC and AUPRO, with seconds per image.

    python benchmarks/bench_quality.py --subset 120                     # Lite0/1/2 at their sizes, default taps
    python benchmarks/bench_quality.py --backbones efficientnet_lite1 --sizes 224,240,256 --taps default,16
    python benchmarks/bench_quality.py --score-device cuda              # all 444 images, MuSc on a GPU (CuPy)

Every configuration (backbone x tapped layers x image size) is exported to a temporary ONNX file
with the library's exporter (``musc_edge.export.onnx.export_onnx``, the same path and parity check
as ``musc-edge export``), its features are extracted by the runtime (``load_model`` +
``iter_features``: the preprocessing the metadata prescribes), the pool is scored by batch MuSc
(``score_tokens``, MUSC_SPEC 2-5) and evaluated by ``musc_edge.datasets.evaluation.evaluate``
(MUSC_SPEC 6), exactly what ``musc-edge score`` does on a folder.

``--taps`` items: ``default`` (the registry entry's layers), strides joined by ``+`` for a CNN
(``16``, ``8+16``, ``8+16+32``: the last stage ending at each stride, so the same choice means the
same depth in every EfficientNet-Lite size), or ``L`` and 1-indexed layers (``L3+4+5``, any
backbone). ``--sizes`` items: a side in pixels or ``native`` (the entry's own size).

``--match-radius`` items (``global``, ``0``, ``2``...) score the same features once each
(positional matching, docs/scorer.md); ``--resize squash,pad`` extracts and scores each input
geometry as ``musc-edge score --resize`` does, and ``--tiles 2x2:0.1`` (with ``--tile-match``)
as ``score --tiles`` does (docs/runtime.md "Input geometry").

``--subset N`` scores a fixed, stratified random subset (each defect type keeps its share of the
444 images; ``--seed``) because batch MuSc costs O(N^2): a 120-image pool at a 28x28 grid takes
about a minute on two CPU cores, all 444 several minutes per configuration. ``--pick spaced``
takes the evenly spaced subset of ``tests/integration/test_score_real_models.py`` instead.

Prints one JSON object: per configuration the metrics, the grid and token widths, seconds per
image for features (decode + preprocess + backbone, wall) and for scoring (MuSc over the pool,
whose per-image cost grows with N), and the export time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MTD = Path(os.environ.get("MUSC_EDGE_SHARED", REPO.parent / "shared")) / "data" / "mtd" / "magnetic_tile"
LITES = "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2"


@dataclass(frozen=True)
class Config:
    """One measured configuration: a backbone, its tapped layers (as asked and as resolved), a side."""

    backbone: str
    taps: str
    layers: tuple[int, ...]
    image_size: int


def parse_taps(spec, text: str) -> tuple[int, ...]:
    """Layers of one ``--taps`` item (see the module docstring), validated against the backbone."""
    from musc_edge.core.errors import InputError
    from musc_edge.export import backbones

    text = text.strip()
    if text == "default":
        return spec.layers
    try:
        if text.startswith("L"):
            return backbones.resolve_layers(spec, tuple(int(t) for t in text[1:].split("+")))
        strides = [int(t) for t in text.split("+")]
    except ValueError:
        raise InputError(f"--taps {text!r}: use default, strides like 8+16, or layers like L3+5") from None
    if spec.family != "efficientnet":
        raise InputError(f"--taps {text}: stride taps are for EfficientNet backbones; for {spec.name} name the "
                         "layers (L3+6+9+12)")
    from musc_edge.export.efficientnet import ARCH_STAGES, last_stage_at_stride

    stages = ARCH_STAGES[spec.arch]
    return backbones.resolve_layers(spec, tuple(last_stage_at_stride(s, stages) for s in strides))


def configs(backbone_names: str, sizes: str, taps: str) -> list[Config]:
    """Every backbone x taps x size asked for, each validated before any export runs."""
    from musc_edge.export import backbones

    out = []
    for name in (n.strip() for n in backbone_names.split(",") if n.strip()):
        spec = backbones.get_spec(name)
        for tap in (t.strip() for t in taps.split(",") if t.strip()):
            layers = parse_taps(spec, tap)
            for size in (s.strip() for s in sizes.split(",") if s.strip()):
                side = None if size == "native" else int(size)
                out.append(Config(name, tap, layers, backbones.resolve_image_size(spec, side)))
    return out


def pick_subset(samples: list, n: int, rule: str, seed: int) -> list:
    """A fixed subset of ``n`` samples in which every defect type keeps its share (stratified).

    ``random``: a seeded draw within each type; ``spaced``: evenly spaced in name order per type
    (the integration test's rule). ``n`` <= 0 or >= the pool: everything.
    """
    if n <= 0 or n >= len(samples):
        return list(samples)
    rng = np.random.default_rng(seed)
    types = sorted({s.defect_type for s in samples})
    chosen = []
    for t in types:
        group = sorted((s for s in samples if s.defect_type == t), key=lambda s: s.rel)
        k = max(1, round(n * len(group) / len(samples)))
        if rule == "spaced":
            index = np.linspace(0, len(group) - 1, k).astype(int)
        else:
            index = np.sort(rng.choice(len(group), size=k, replace=False))
        chosen += [group[int(i)] for i in index]
    return chosen


def export_config(cfg: Config, workdir: Path) -> tuple[Path, float, float]:
    """The configuration's ONNX file through the library's exporter (pretrained weights), its seconds
    and its parity figure (max abs diff torch vs ONNX Runtime over all outputs)."""
    from musc_edge.export import backbones
    from musc_edge.export.onnx import export_onnx
    from musc_edge.export.weights import resolve_weights

    spec = backbones.get_spec(cfg.backbone)
    t = time.perf_counter()
    built = backbones.builder_for(spec)(spec, resolve_weights(spec, None), cfg.image_size, cfg.layers)
    layers = "-".join(map(str, cfg.layers))
    result = export_onnx(built, workdir / f"{cfg.backbone}_{cfg.image_size}_l{layers}.onnx")
    return result.path, time.perf_counter() - t, max(result.max_abs_diff.values())


def extract(model: Path, samples: list, device: str, batch: int, threads: int, resize: str = "squash",
            tiles: str | None = None) -> dict:
    """Tokens, embeddings, original sizes (and with ``--resize pad`` or ``--tiles`` each image's
    views) of ``samples`` from the runtime, with timings."""
    from musc_edge.runtime.geometry import InputGeometry, TileSpec, parse_tiles
    from musc_edge.runtime.model import load_model
    from musc_edge.runtime.pipeline import iter_features

    opts = {"threads": threads} if threads else {}
    geometry = InputGeometry(resize, parse_tiles(tiles) if tiles else TileSpec())
    geometry = None if geometry.is_default else geometry
    tokens: list[list[np.ndarray]] = []
    embeddings, sizes, paths, views = [], [], [], []
    infer_s = 0.0
    with load_model(model, device, **opts) as extractor:
        t = time.perf_counter()
        for b in iter_features([s.path for s in samples], extractor, batch, geometry=geometry):
            views += list(b.views)
            if b.skipped:
                raise RuntimeError(f"unreadable image {b.skipped[0][0]}: {b.skipped[0][1]}")
            if b.features is None:
                continue
            tokens.append(list(b.features.tokens))
            embeddings.append(b.features.embedding)
            sizes += list(b.sizes)
            paths += list(b.paths)
            infer_s += b.infer_s
        wall = time.perf_counter() - t
        meta, backend = extractor.meta, extractor.description
    if paths != [s.path for s in samples]:
        raise RuntimeError("the runtime returned the images out of order")
    layers = [np.concatenate([t[i] for t in tokens]) for i in range(len(tokens[0]))]
    return {"tokens": layers, "embedding": np.concatenate(embeddings), "sizes": sizes, "meta": meta,
            "backend": backend, "wall_s": wall, "infer_s": infer_s, "views": views, "geometry": geometry}


def run_config(cfg: Config, samples: list, workdir: Path, args: argparse.Namespace) -> list[dict]:
    """Export and extract one configuration, then score and evaluate it at every ``--match-radius``;
    the rows of the output JSON (the features are extracted once for all radii)."""
    model, export_s, parity = export_config(cfg, workdir)
    rows = []
    geometries = [(r.strip(), t.strip() or None) for r in args.resize.split(",") if r.strip()
                  for t in (args.tiles.split(",") if args.tiles else [""])]
    for resize, tiles in geometries:
        feats = extract(model, samples, args.device, args.batch, args.threads, resize, tiles)
        for radius in parse_radii(args.match_radius):
            row = score_config(cfg, samples, feats, args, radius)
            row.update(resize=resize, tiles=tiles, tile_match=args.tile_match if tiles else None,
                       export_s=round(export_s, 2), parity_max_abs_diff=float(f"{parity:.3g}"))
            print("bench_quality: " + json.dumps({k: row[k] for k in (
                "backbone", "layers", "image_size", "resize", "tiles", "match_radius", "image_auroc", "pixel_auroc",
                "aupro", "score_s_per_image")}), file=sys.stderr, flush=True)
            rows.append(row)
        del feats
    model.unlink()
    return rows


def parse_radii(text: str) -> list[int | None]:
    """``--match-radius`` items: ``global`` or integers >= 0."""
    from musc_edge.cli.options import parse_match_radius

    return [parse_match_radius(t) for t in text.split(",") if t.strip()]


def score_config(cfg: Config, samples: list, feats: dict, args: argparse.Namespace, radius: int | None) -> dict:
    """Batch MuSc on extracted features (one match radius), evaluated; one row of the output."""
    from musc_edge.core.params import MuscParams
    from musc_edge.core.scorer import score_tokens
    from musc_edge.datasets.evaluation import evaluate

    params = MuscParams(match_radius=radius)
    t = time.perf_counter()
    full_maps = None
    if feats["geometry"] is None:
        scores = score_tokens(feats["tokens"], feats["embedding"], device=args.score_device, params=params)
    else:  # what `score --resize pad` runs: pad cells out of the image score, maps cropped
        from musc_edge.core.device import resolve_device
        from musc_edge.score.geometry import GeometryPool

        pool = GeometryPool(feats["meta"], len(samples), feats["geometry"], args.tile_match, params,
                            device=resolve_device(args.score_device, "exact"))
        pool.add(feats["tokens"], feats["embedding"], views=[tuple(v) for v in feats["views"]])
        scores = pool.finish()
        full_maps = pool.maps.sequence(feats["sizes"])
    score_s = time.perf_counter() - t
    t = time.perf_counter()
    warnings: list[str] = []
    metrics = evaluate(samples, feats["sizes"], scores, warnings, maps=full_maps) or {}
    eval_s = time.perf_counter() - t
    n, meta = len(samples), feats["meta"]
    image, pixel = metrics.get("image") or {}, metrics.get("pixel") or {}
    return {
        "backbone": cfg.backbone, "taps": cfg.taps, "layers": list(cfg.layers), "image_size": cfg.image_size,
        "match_radius": radius, "grid": meta.grid, "token_dims": list(meta.token_dims), "images": n,
        "image_auroc": _r(image.get("auroc")), "pixel_auroc": _r(pixel.get("auroc")), "aupro": _r(pixel.get("aupro")),
        "image_ap": _r(image.get("ap")), "image_f1_max": _r(image.get("f1_max")), "pixel_ap": _r(pixel.get("ap")),
        "features_s_per_image": round(feats["wall_s"] / n, 4), "backbone_s_per_image": round(feats["infer_s"] / n, 4),
        "score_s_per_image": round(score_s / n, 4), "score_s": round(score_s, 2), "eval_s": round(eval_s, 2),
        "backend": feats["backend"], "undefined": metrics.get("undefined", {}),
        "warnings": warnings,
    }


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 4)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default=LITES, help=f"comma-separated registry names [{LITES}]")
    p.add_argument("--sizes", default="native", help="comma-separated sides in px, or native [native]")
    p.add_argument("--taps", default="default", help="comma-separated: default, strides 8+16, layers L3+5 [default]")
    p.add_argument("--data", type=Path, default=MTD, help="an MVTec-style category with ground_truth/ [MTD]")
    p.add_argument("--subset", type=int, default=0, help="score a stratified subset of N images (0: all)")
    p.add_argument("--pick", choices=("random", "spaced"), default="random", help="subset rule [random]")
    p.add_argument("--seed", type=int, default=0, help="seed of --pick random [0]")
    p.add_argument("--device", default="cpu", help="feature extraction device (musc-edge --device) [cpu]")
    p.add_argument("--score-device", default="cpu", choices=("cpu", "cuda", "auto"), help="MuSc device [cpu]")
    p.add_argument("--resize", default="squash", help="comma-separated: squash, pad (score --resize) [squash]")
    p.add_argument("--tiles", default="", help="comma-separated RxC[:overlap] (score --tiles); empty: none []")
    p.add_argument("--tile-match", default="aligned", choices=("aligned", "any"), help="with --tiles [aligned]")
    p.add_argument("--match-radius", default="global",
                   help="comma-separated: global, or P (positional matching, MuscParams.match_radius) [global]")
    p.add_argument("--batch", type=int, default=8, help="feature batch size [8]")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0: all cores) [0]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from musc_edge.datasets import discover

    todo = configs(args.backbones, args.sizes, args.taps)
    dataset = discover(args.data, "auto")
    samples = pick_subset(list(dataset.samples), args.subset, args.pick, args.seed)
    out: dict = {
        "benchmark": "bench_quality", "command": " ".join(["python", "benchmarks/bench_quality.py", *(argv or sys.argv[1:])]),
        "data": {"root": str(args.data), "layout": dataset.layout, "pool": len(dataset.samples), "images": len(samples),
                 "defective": sum(s.label == 1 for s in samples),
                 "subset": {"n": args.subset, "pick": args.pick, "seed": args.seed} if args.subset else None},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_1m_start": os.getloadavg()[0]},
        "settings": {"device": args.device, "score_device": args.score_device, "batch": args.batch,
                     "threads": args.threads},
        "results": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench_quality_") as tmp:
        for cfg in todo:
            print(f"bench_quality: {cfg.backbone} @ {cfg.image_size}, layers {cfg.layers} on {len(samples)} images",
                  file=sys.stderr, flush=True)
            out["results"] += run_config(cfg, samples, Path(tmp), args)
    out["machine"]["load_avg_1m_end"] = os.getloadavg()[0]
    json.dump(out, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
