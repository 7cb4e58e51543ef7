"""``musc-edge watch``: score each new image in a folder against a rolling pool."""

from __future__ import annotations

from pathlib import Path

import click

from musc_edge.cli.options import (device_option, heatmaps_option, k_option, max_file_size_option, mem_budget_option,
                                   model_option, out_option, precision_option, r_option, score_device_option)


@click.command(name="watch")
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@model_option
@out_option
@click.option("--window", "window", default=32, show_default=True, type=click.IntRange(1),
              help="Stream images in the rolling pool (W); each new image costs W pair products. Its memory "
                   "grows with W^2 and is checked against --mem-budget before anything is allocated.")
@mem_budget_option
@click.option("--delay", default=0, show_default=True, type=click.IntRange(0),
              help="Report an image once D newer images have arrived (0: at once; D < W).")
@click.option("--min-pool", "min_pool", default=None, type=click.IntRange(2),
              help="Report nothing until the pool (references included) holds this many images "
                   "[default: 8, or the pool's size if smaller].")
@click.option("--reference", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Folder of known-good images that seed the pool and never leave it.")
@click.option("--threshold", type=float, default=None,
              help="Add verdict 'anomalous' when raw_score >= T, else 'good' (raw: comparable across windows).")
@heatmaps_option
@click.option("--keep-heatmaps", "keep_heatmaps", default=None, type=click.IntRange(1), metavar="N",
              help="With --heatmaps: keep only the newest N overlays (older ones are deleted) [default: keep all; "
                   "they grow with every image].")
@click.option("--poll", is_flag=True, help="Poll the folder instead of inotify (network mounts).")
@click.option("--poll-interval", "poll_interval", default=1.0, show_default=True, type=click.FloatRange(0.05),
              help="Seconds between scans with --poll.")
@click.option("--new-only", "new_only", is_flag=True,
              help="Ignore files older than the first start (by mtime); default: score them too.")
@click.option("--recursive", is_flag=True, help="Also watch sub-folders.")
@click.option("--stable", "stable_s", default=0.5, show_default=True, type=click.FloatRange(0.0),
              help="Seconds a file's size and mtime must stay unchanged before it is read.")
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1, 1024),
              help="Largest backbone batch when a backlog of files is ready at once.")
@max_file_size_option
@r_option
@k_option
@device_option
@score_device_option
@precision_option
def watch(folder: Path, model_path: Path, out_dir: Path, window: int, delay: int, min_pool: int | None,
          reference: Path | None, threshold: float | None, heatmaps: bool, keep_heatmaps: int | None, poll: bool,
          poll_interval: float, new_only: bool, recursive: bool, stable_s: float, batch: int,
          max_file_bytes: int | None, r_list: tuple[int, ...], k_list: tuple[int, ...], device: str,
          mem_budget: int | None, score_device: str, precision: str) -> None:
    """Watch FOLDER and score each new image as it lands.

    One JSON line per image is appended to OUT/results.jsonl (flushed and fsynced); the pool and a
    journal live in OUT/state/, so after a crash a restart reports every image exactly once.
    SIGINT/SIGTERM finish the current image and exit 0.
    """
    from musc_edge.core.params import MuscParams
    from musc_edge.runtime.model import load_model
    from musc_edge.watch.daemon import WatchConfig, WatchDaemon

    config = WatchConfig(folder=folder, out_dir=out_dir, window=window, delay=delay, min_pool=min_pool,
                         reference=reference, threshold=threshold, heatmaps=heatmaps, keep_heatmaps=keep_heatmaps,
                         poll=poll, max_file_bytes=max_file_bytes,
                         poll_interval_s=poll_interval, new_only=new_only, recursive=recursive,
                         stable_s=stable_s, batch=batch, params=MuscParams.of(r_list, None, k_list),
                         mem_budget_bytes=mem_budget, score_device=score_device, precision=precision)
    with load_model(model_path, device) as model:
        summary = _run(WatchDaemon(config, model), out_dir)
    copies = f", {summary.copies} exact copies not scored" if summary.copies else ""
    click.echo(f"stopped: {summary.scored} images scored, {summary.reported} reported, "
               f"{summary.skipped} skipped{copies}", err=True)


def _run(daemon, out_dir: Path):
    """Run the daemon. A full disk while it runs only pauses it (docs/watch.md, "What happens when");
    one before its state is even open (no room for state/) is a one-line error."""
    from musc_edge.core.errors import StateError
    from musc_edge.watch.daemon import DISK_FULL

    try:
        return daemon.run()
    except OSError as e:
        if e.errno not in DISK_FULL:
            raise
        raise StateError(f"no space left on the disk of {out_dir} ({e.filename or e.strerror}): free some space "
                         "there and start again; nothing is lost") from None
