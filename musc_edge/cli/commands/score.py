"""``musc-edge score``: score a folder of images offline with MuSc."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import click

from musc_edge.cli.options import (batch_option, device_option, heatmaps_option, k_option, match_radius_option, layout_options,
                                   max_file_size_option, mem_budget_option, model_option, out_option,
                                   precision_option, r_option,
                                   read_threshold_file, resize_option, score_device_option, threshold_file_option,
                                   tile_match_option, tiles_option)

if TYPE_CHECKING:
    from musc_edge.runtime.geometry import TileSpec


def _heatmap_scale(ctx: click.Context, param: click.Parameter, value: str) -> str | tuple[float, float]:
    """``run`` or ``LO,HI`` (two finite numbers, LO < HI), checked where the flag enters."""
    from musc_edge.core.errors import InputError

    if value.strip().lower() == "run":
        return "run"
    try:
        lo, hi = (float(v) for v in value.split(","))
    except ValueError:
        raise InputError(f"--heatmap-scale expects run or LO,HI (two numbers such as 0.5,1.0), got {value!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise InputError(f"--heatmap-scale LO,HI needs finite numbers with LO < HI, got {value!r}")
    return lo, hi


@click.command(name="score")
@click.argument("data_dir", metavar="DIR", type=click.Path(path_type=Path))
@model_option
@out_option
@batch_option
@r_option
@k_option
@match_radius_option
@click.option("--gt", default="auto", show_default=True, metavar="auto|none|MASKDIR",
              help="Ground truth: auto (the layout's own labels and masks), none, or a folder of "
                   "<stem>_mask.png masks (flat and mvtec layouts).")
@layout_options
@heatmaps_option
@click.option("--heatmap-scale", "heatmap_scale", default="run", show_default=True, metavar="run|LO,HI",
              callback=_heatmap_scale,
              help="Colour scale of the heatmaps: run (blue..red spans this run's maps; compare within the run "
                   "only) or fixed values LO,HI, e.g. 0.5,1.0 (compare across runs and days; values outside are "
                   "clipped). Every panel shows its scale on a colour bar.")
@click.option("--threshold", type=float, default=None, metavar="T",
              help="Anomalous when the raw score (the map's maximum) is >= T, as in watch: adds a verdict "
                   "column to scores.csv, and the verdict and the contour of the map at T to the heatmaps.")
@threshold_file_option
@device_option
@score_device_option
@precision_option
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64),
              help="Threads decoding images ahead of the model.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--window", type=click.IntRange(2), default=None, metavar="W",
              help="Score as a stream with bounded memory: each image against a rolling window of W images "
                   "centred on it (W/2 newer), O(N*W) instead of O(N^2) pair products; at most W images' "
                   "features are held. A folder of at most W images gets the batch scores.")
@click.option("--order", type=click.Choice(["name", "mtime"]), default="name", show_default=True,
              help="Order of the stream for --window: file name, or modification time (production order). "
                   "MVTec-style categories list images by defect type, the worst order for a window (a "
                   "repeated defect matches itself). Batch scores do not depend on it; rows follow it.")
@click.option("--reference", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              metavar="DIR", help="With --window: known-good images that seed every window and are never "
                                  "scored, so a defect repeated through a window still stands out.")
@resize_option
@tiles_option
@tile_match_option
@click.option("--repeated-defects", type=click.Choice(["keep", "filter"]), default="keep", show_default=True,
              help="filter: find groups of images that share a repeated defect (the same flaw at the same place "
                   "in several parts, which MuSc would call normal) and take them out of each other's scoring "
                   "(batch mode; docs/scorer.md 'Repeated defects'). keep: MuSc as published.")
@mem_budget_option
@max_file_size_option
def score(data_dir: Path, model_path: Path, out_dir: Path, batch: int, r_list: tuple[int, ...],
          k_list: tuple[int, ...], match_radius: int | None, gt: str, heatmaps: bool, heatmap_scale: str | tuple[float, float],
          threshold: float | None, threshold_file: Path | None, device: str, score_device: str, precision: str,
          workers: int, quiet: bool,
          window: int | None, order: str, reference: Path | None, layout: str, normal_dir: str | None,
          abnormal_dir: str | None, mask_dir: str | None, resize: str, tiles: TileSpec | None, tile_match: str | None,
          repeated_defects: str, mem_budget: int | None, max_file_bytes: int | None) -> None:
    """Score every image of DIR against the others (MuSc, zero-shot) and write the results.

    DIR is a flat folder of images (jpg/png/bmp/tiff), an MVTec AD category (DIR/test/<type>/,
    DIR/ground_truth/<type>/<stem>_mask.png; `good` images are normal), an MVTec LOCO AD category,
    a VisA object (DIR with ../split_csv/1cls.csv) or anomalib's Folder layout (--layout folder
    --normal-dir good --abnormal-dir bad --mask-dir masks).
    Writes OUT/scores.csv, OUT/run.json, OUT/metrics.json (when ground truth exists) and, with
    --heatmaps, OUT/maps/<type>/<stem>.png overlays at the original image size and
    OUT/panels/<type>/<stem>.png for a person: original and overlay side by side, scores, verdict
    (--threshold) and a colour bar.

    Without --window every image's features are kept (float16) and scored in one pool; --window W
    streams the folder (in --order) through a rolling window and keeps only each image's map.
    Batch scoring grows as N^2; when it would take more than about 10 minutes, score says so
    before it starts and suggests --window.

    Input geometry (batch mode): --resize pad keeps the aspect ratio (padding masked out of the
    scores and maps); --tiles RxC[:OVERLAP] scores each image as R x C tiles at the model's size,
    against the same tile of the other images (--tile-match aligned) or any of their tiles (any).

    \b
    Examples:
      musc-edge score data/magnetic_tile --model effnet.onnx --out results --heatmaps
      musc-edge score /data/line1 --model effnet.onnx --out results --window 64 --order mtime
      musc-edge score /data/boards --model effnet.onnx --out results --tiles 2x3:0.1 --resize pad
    """
    from musc_edge.core.errors import InputError
    from musc_edge.core.params import MuscParams
    from musc_edge.score.folder import ScoreSettings, score_folder

    if tile_match is not None and tiles is None:
        raise InputError("--tile-match needs --tiles RxC: without tiles each image is one input")
    threshold_info = read_threshold_file(threshold_file, threshold)
    if threshold_info is not None:
        threshold = threshold_info.value

    settings = ScoreSettings(batch_size=batch, params=MuscParams.of(r_list, None, k_list, match_radius), gt=gt, heatmaps=heatmaps,
                             device=device, workers=workers, progress=not quiet, window=window, order=order,
                             reference=reference, layout=layout, normal_dir=normal_dir, abnormal_dir=abnormal_dir,
                             mask_dir=mask_dir, mem_budget_bytes=mem_budget, score_device=score_device,
                             precision=precision, threshold=threshold, heatmap_scale=heatmap_scale,
                             max_file_bytes=max_file_bytes, resize=resize, tiles=tiles,
                             tile_match=tile_match or "aligned", repeated_defects=repeated_defects)
    result = score_folder(data_dir, model_path, out_dir, settings)
    if threshold_info is not None:
        _add_normalised(result.out_dir, threshold_info, threshold_file)
    click.echo(format_summary(result.run, result.metrics, result.out_dir, result.files))


def _add_normalised(out_dir: Path, threshold_info, threshold_file: Path) -> None:
    """--threshold-file: a ``normalised_score`` column after ``raw_score`` in scores.csv, and the
    threshold used (value, scale, the file) in run.json."""
    import csv
    import json

    from musc_edge.core.threshold import normalised_score
    from musc_edge.outputs import write_csv, write_json

    path = Path(out_dir) / "scores.csv"
    with open(path, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    header, rows = table[0], table[1:]
    i = header.index("raw_score") + 1
    header.insert(i, "normalised_score")
    for row in rows:
        row.insert(i, float(normalised_score(float(row[i - 1]), threshold_info)))
        row[i - 1] = float(row[i - 1])
    write_csv(path, header, rows)
    run_path = Path(out_dir) / "run.json"
    if run_path.exists():
        run = json.loads(run_path.read_text(encoding="utf-8"))
        run["threshold_file"] = {"path": str(threshold_file), "value": threshold_info.value,
                                 "scale": threshold_info.scale, "score": threshold_info.score,
                                 "method": threshold_info.method}
        write_json(run_path, run)


def format_summary(run: dict, metrics: dict | None, out_dir: Path, files: dict[str, str]) -> str:
    """A short table of what was done, how long it took and how well it scored."""
    counts, t = run["counts"], run["timings_s"]
    meta = run["model"]["meta"]
    lines = [f"scored {counts['scored']} of {counts['found']} images ({counts['skipped']} skipped), layout "
             f"{run['layout']}, with {meta['backbone']} @ {meta['image_size']} on {run['model']['backend']}; "
             f"MuSc on {run['settings']['score_device']} ({run['settings']['precision']})"]
    if run["model"]["random_weights"]:
        lines.append("WARNING: random-weights model: these scores mean nothing")
    rate = run.get("images_per_s_features")
    lines.append(f"  {'stage':<10}{'seconds':>9}")
    lines.append(f"  {'features':<10}{t.get('features_wall_s', 0):>9.2f}" + (f"   ({rate} images/s)" if rate else ""))
    for key, label in (("score_s", "score"), ("heatmaps_s", "heatmaps"), ("metrics_s", "metrics"),
                       ("total_s", "total")):
        if key in t and (key != "metrics_s" or metrics):  # no metrics row without ground truth
            lines.append(f"  {label:<10}{t[key]:>9.2f}")
    if metrics:
        image, pixel = metrics.get("image") or {}, metrics.get("pixel") or {}
        lines.append(f"  {'metric':<10}{'image':>9}{'pixel':>9}")
        for key in ("auroc", "ap", "f1_max", "aupro"):
            lines.append(f"  {key:<10}{_fmt(image.get(key)):>9}{_fmt(pixel.get(key)):>9}")
    lines.append(f"results in {out_dir}: " + ", ".join(Path(v).name + ("/" if k in ("maps", "panels") else "")
                                                   for k, v in files.items()))
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
