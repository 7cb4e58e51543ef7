"""Click options shared by several commands, defined once so they mean the same everywhere."""

from __future__ import annotations

from pathlib import Path

import click

from musc_edge.core.errors import InputError
from musc_edge.core.params import DEFAULT_K, DEFAULT_R


def parse_int_list(text: str, name: str) -> tuple[int, ...]:
    """Parse '1,3,5' into (1, 3, 5); a clear error names the flag otherwise."""
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise InputError(f"{name} expects comma-separated integers such as 1,3,5, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise InputError(f"{name} expects positive integers such as 1,3,5, got {text!r}")
    return values


def _int_list(name: str):
    def convert(ctx: click.Context, param: click.Parameter, value: str | None):
        return None if value is None else parse_int_list(value, name)

    return convert


def model_flag(help: str = "Exported model: FILE.onnx (ONNX Runtime) or FILE.engine (TensorRT)."):
    """``--model``: one definition; a command that takes only some model kinds says so in ``help``."""
    return click.option("--model", "model_path", required=True,
                        type=click.Path(dir_okay=False, path_type=Path), help=help)


model_option = model_flag()
device_option = click.option(
    "--device", default="auto", show_default=True,
    help="auto | cpu | cuda | tensorrt (ONNX Runtime providers; auto = TensorRT > CUDA > CPU). cuda or "
         "tensorrt that ONNX Runtime cannot start (no driver/CUDA/cuDNN) is an error; auto warns and falls back.")
batch_option = click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 1024),
                            help="Images per backbone batch.")
r_option = click.option("--r", "r_list", default=",".join(map(str, DEFAULT_R)), show_default=True,
                        callback=_int_list("--r"),
                        help="LNAMD aggregation degrees.")
k_option = click.option("--k", "k_list", default=",".join(map(str, DEFAULT_K)), show_default=True,
                        callback=_int_list("--k"),
                        help="RsCIN neighbourhood sizes (1,8,9 for VisA-like sets).")
def parse_match_radius(text: str | None) -> int | None:
    """``global`` (or unset) -> None, MuSc's nearest patch anywhere; ``P`` -> an integer radius >= 0."""
    if text is None or text.strip().lower() == "global":
        return None
    try:
        radius = int(text)
    except ValueError:
        raise InputError(f"--match-radius expects global or an integer >= 0 (grid cells), got {text!r}") from None
    if radius < 0:
        raise InputError(f"--match-radius expects global or an integer >= 0 (grid cells), got {text!r}")
    return radius


match_radius_option = click.option(
    "--match-radius", "match_radius", default="global", show_default=True,
    callback=lambda ctx, param, value: parse_match_radius(value),
    help="Positional matching for aligned parts: search each patch's nearest patch only within P grid "
         "cells of its own position in the other images (0: the same cell). global: anywhere (MuSc).")
out_option = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                          help="Output folder (created if missing).")
heatmaps_option = click.option("--heatmaps", is_flag=True, help="Write heatmap overlays at the original size.")


def _size(ctx: click.Context, param: click.Parameter, value: str | None):
    from musc_edge.core.memory import parse_size

    return None if value is None else parse_size(value)


mem_budget_option = click.option(
    "--mem-budget", "mem_budget", default=None, metavar="SIZE", callback=_size,
    help="Memory the rolling pool may take (8GiB, 512MiB; a plain number is GiB) [default: half of the "
         "memory available]. A --window over it is refused with the largest one that fits.")


def _file_size(ctx: click.Context, param: click.Parameter, value: str | None):
    from musc_edge.core.memory import parse_size

    if value is None:
        return None
    try:
        return parse_size(value)
    except InputError:
        raise InputError(f"--max-file-size expects a size such as 256MiB or 1GiB, got {value!r}") from None


max_file_size_option = click.option(
    "--max-file-size", "max_file_bytes", default=None, metavar="SIZE", callback=_file_size,
    help="Largest image file that is read (256MiB, 1GiB) [default: 256MiB, or MUSC_EDGE_MAX_FILE_BYTES]. A larger "
         "file, like one without an image signature in its first bytes, is skipped with its reason before it is "
         "read into memory.")


def layout_options(f):
    """``--layout`` and anomalib Folder's ``--normal-dir/--abnormal-dir/--mask-dir``."""
    from musc_edge.datasets import LAYOUTS

    f = click.option("--mask-dir", "mask_dir", default=None, metavar="DIR",
                     help="--layout folder: the masks (<stem>.png or <stem>_mask.png), relative to DIR.")(f)
    f = click.option("--abnormal-dir", "abnormal_dir", default=None, metavar="DIR",
                     help="--layout folder: the defective images, relative to DIR.")(f)
    f = click.option("--normal-dir", "normal_dir", default=None, metavar="DIR",
                     help="--layout folder: the good images, relative to DIR.")(f)
    f = click.option("--layout", default="auto", show_default=True, type=click.Choice(["auto", *LAYOUTS]),
                     help="Dataset layout of DIR: " + "; ".join(f"{n}: {l.summary}" for n, l in LAYOUTS.items())
                          + ". auto detects visa, loco, mvtec, then flat (folder when --normal-dir is given).")(f)
    return f


score_device_option = click.option(
    "--score-device", "score_device", default="cpu", show_default=True, type=click.Choice(["cpu", "cuda", "auto"]),
    help="Where MuSc's mutual scoring runs (LNAMD, MSM, RsCIN): cpu (numpy) or cuda (CuPy, the [cuda] extra); "
         "auto uses the GPU when CuPy finds one. --device chooses where the backbone runs.")
precision_option = click.option(
    "--precision", default="exact", show_default=True, type=click.Choice(["exact", "fast"]),
    help="exact: FP32 products, the CPU's numbers. fast (GPU only): FP16 tensor-core products choose each "
         "nearest patch, its distance is still FP32 (docs/scorer.md has the measured difference).")


threshold_file_option = click.option(
    "--threshold-file", "threshold_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="threshold.json from `musc-edge threshold`: its value is the threshold on raw_score (not with "
         "--threshold), and each result gets normalised_score (0.5 at the threshold; docs/line.md).")


def read_threshold_file(path: Path | None, threshold: float | None):
    """``--threshold-file`` read and checked against ``--threshold``: the Threshold, or None."""
    if path is None:
        return None
    if threshold is not None:
        raise InputError("give --threshold T or --threshold-file FILE, not both (the file holds the threshold)")
    from musc_edge.core.threshold import read_threshold

    return read_threshold(path)


# --- input geometry (docs/runtime.md, "Input geometry") ------------------------------------------
resize_option = click.option(
    "--resize", default="squash", show_default=True, type=click.Choice(["squash", "pad"]),
    help="How an image (or tile) becomes the model's square input: squash (MuSc: aspect not kept) or pad "
         "(aspect kept, padded with the normalisation mean; the padding gets no score and is cropped from the maps).")


def _tiles(ctx: click.Context, param: click.Parameter, value: str | None):
    from musc_edge.runtime.geometry import parse_tiles

    return None if value is None else parse_tiles(value)


tiles_option = click.option(
    "--tiles", default=None, metavar="RxC[:OVERLAP]", callback=_tiles,
    help="Cut each image into R x C tiles, each at the model's size (large images keep their detail); OVERLAP "
         "is a fraction 0..0.5 of a tile's side (2x2:0.1). Maps are stitched at the original size (overlaps "
         "averaged); the image score is the max over its tiles. The tiles' pool must fit --mem-budget.")
tile_match_option = click.option(
    "--tile-match", "tile_match", default=None, type=click.Choice(["aligned", "any"]),
    help="With --tiles: aligned (default; a tile is scored against the same tile position of the other images) "
         "or any (against every tile of the other images: one pool of N*R*C tiles).")
