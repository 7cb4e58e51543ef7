"""``musc-edge threshold``: a threshold (and the normalised score's scale) from a scored run."""

from __future__ import annotations

from pathlib import Path

import click


def _rate(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not 0 < value < 1:
        raise click.BadParameter(f"expected a rate between 0 and 1 (0.01 is 1 %), got {value}")
    return value


@click.command(name="threshold")
@click.argument("out_dir", metavar="OUTDIR", type=click.Path(file_okay=False, exists=True, path_type=Path))
@click.option("--target-fpr", "target_fpr", type=float, default=None, callback=_rate, metavar="RATE",
              help="False-alarm rate: the share of good parts that may be called anomalous, from the good "
                   "images' score distribution (label 0, or every image of a run of known-good parts).")
@click.option("--target-frr", "target_frr", type=float, default=None, callback=_rate, metavar="RATE",
              help="False-reject rate measured on a labelled run (scores.csv with good and anomalous labels): "
                   "the lowest threshold rejecting at most RATE of the good parts; reports the defect recall.")
@click.option("--score", "score", type=click.Choice(["raw_score", "image_score"]), default="raw_score",
              show_default=True,
              help="Score column. raw_score is comparable across pools; image_score (RsCIN) is min-max "
                   "normalised within each pool (MUSC_SPEC 5), so a fixed threshold on it is not.")
@click.option("--out", "out_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the threshold JSON [default: OUTDIR/threshold.json].")
def threshold(out_dir: Path, target_fpr: float | None, target_frr: float | None, score: str,
              out_file: Path | None) -> None:
    """Compute a threshold from OUTDIR of `musc-edge score` (scores.csv) or `watch` (results.jsonl).

    With labels (score on a labelled set): F1-optimal, or --target-frr. Without: the images are
    taken as known-good parts; give --target-fpr. Writes a small JSON (value, scale of the
    normalised score, the rates it reaches) that `watch --threshold-file` reads. docs/line.md.
    """
    from musc_edge.core.threshold import calibrate, load_scores, write_threshold

    run = load_scores(out_dir, score)
    if run.labels is None:
        click.echo(f"no labels in {run.source}: taking all {run.scores.size} images as known-good parts", err=True)
    if score == "image_score":
        click.echo("warning: image_score is relative to its pool (RsCIN, MUSC_SPEC 5); a fixed threshold on it "
                   "moves with the pool. raw_score is the one to threshold", err=True)
    th = calibrate(run, target_fpr=target_fpr, target_frr=target_frr)
    path = out_file if out_file is not None else out_dir / "threshold.json"
    write_threshold(path, th)
    target = "" if th.target is None else f" {th.target:g}"
    click.echo(f"threshold {th.value:.6g} on {th.score} ({th.method}{target}, {th.basis}; "
               f"{th.n_good} good, {th.n_anomalous} anomalous images)")
    for key in ("false_reject_rate", "recall", "precision", "f1"):
        if key in th.measured:
            click.echo(f"  {key:<18} {th.measured[key]:.4f}")
    if th.basis == "gumbel-fit":
        click.echo(f"  {th.n_good} good images cannot resolve a rate of {th.target:g} (needs >= {int(1 / th.target)}): "
                   "the value extrapolates a Gumbel fit of their scores; score more good parts to measure it",
                   err=True)
    if th.measured.get("resolved") is False:
        click.echo(f"  {th.n_good} good images cannot resolve a rate of {th.target:g}: the threshold is just above "
                   "the highest good score", err=True)
    click.echo(f"normalised score: 0.5 at the threshold, scale {th.scale:.4g} (the good scores' spread)")
    click.echo(f"written to {path}")
