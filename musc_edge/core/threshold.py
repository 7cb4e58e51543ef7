"""Thresholds an engineer can set from a scored run, and a stable 0-1 score (docs/line.md).

MuSc has no training step and so no threshold of its own: a score says how badly an image's
patches match the other images of its pool (MUSC_SPEC 3), and the numbers depend on that pool.
The raw score (max of the MSM map, MUSC_SPEC 4) stays comparable while the pool is of the same
kind (a window of mostly good parts of one product, at one window size); the RsCIN score is
min-max normalised within the pool (MUSC_SPEC 5) and is not (docs/line.md, "Why the scores are
relative"). So a threshold is set on ``raw_score``, from a run scored like the line runs, in one
of three ways:

- labels (``score`` on a labelled set): the F1-optimal threshold;
- labels and a target false-reject rate: the lowest threshold that rejects at most that share of
  the *labelled good* parts, measured on them (the defect recall at it is reported);
- known-good parts only (``watch`` or ``score`` over a run of good parts): a threshold at a
  target false-alarm rate from the good parts' score distribution, empirical where the run is
  large enough to resolve the rate, else from a Gumbel fit (a raw score is a maximum over patches,
  MUSC_SPEC 4, and maxima have Gumbel-like right tails).

"Reject" and "alarm" both mean "verdict anomalous for a good part"; the two names follow the two
data sources (measured on labelled good parts, or estimated from a known-good run).
Every function is pure (numpy in, numbers out); :func:`load_scores` and the JSON helpers are the
only I/O.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .durable import atomic_write_bytes
from .errors import InputError

THRESHOLD_VERSION = 1

#: Score columns a threshold can be set on; raw is the one comparable across pools (MUSC_SPEC 4/5).
SCORES = ("raw_score", "image_score")

#: Euler-Mascheroni constant: the Gumbel mean is mu + gamma * beta.
_EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class RunScores:
    """The scores of one run: ``labels`` 1 anomalous / 0 good / -1 unknown, or None (none known)."""

    paths: tuple[str, ...]
    scores: np.ndarray
    labels: np.ndarray | None
    source: str
    score: str = "raw_score"


@dataclass(frozen=True)
class Threshold:
    """A threshold on ``score``: verdict anomalous when ``score >= value``.

    ``scale`` is the spread the normalised score uses (:func:`normalised_score`); ``measured``
    holds the rates on the images it was set from (``false_reject_rate``, and with labels
    ``recall``, ``precision``, ``f1``); ``candidates`` the other thresholds that were computed.
    """

    value: float
    score: str
    method: str  # "f1", "false_reject_rate" or "false_alarm_rate"
    target: float | None
    scale: float
    basis: str  # how the value was found: labels, empirical, gumbel-fit
    n_good: int
    n_anomalous: int
    measured: dict = field(default_factory=dict)
    good: dict = field(default_factory=dict)  # mean, std, median, max of the good scores
    candidates: dict = field(default_factory=dict)
    source: str | None = None
    version: int = THRESHOLD_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping, *, where: str = "threshold") -> Threshold:
        if not isinstance(data, Mapping):
            raise InputError(f"{where}: expected a JSON object, but got {type(data).__name__}")
        if data.get("version") != THRESHOLD_VERSION:
            raise InputError(f"{where}: threshold file version {data.get('version')!r}, this musc-edge reads "
                             f"{THRESHOLD_VERSION}; compute it again with `musc-edge threshold`")
        try:
            value, scale = float(data["value"]), float(data["scale"])
        except (KeyError, TypeError, ValueError):
            raise InputError(f"{where}: expected numbers 'value' and 'scale'; compute it again with "
                             "`musc-edge threshold`") from None
        if not (math.isfinite(value) and math.isfinite(scale) and scale > 0):
            raise InputError(f"{where}: expected a finite value and a positive scale, but got {value}, {scale}")
        if data.get("score") not in SCORES:
            raise InputError(f"{where}: expected 'score' one of {', '.join(SCORES)}, but got {data.get('score')!r}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known} | {"value": value, "scale": scale})


# ----------------------------------------------------------------------------------------- pure functions
def f1_optimal(scores: Sequence[float], labels: Sequence[int]) -> tuple[float, dict]:
    """The threshold of maximal F1 (anomalous = positive) and its precision, recall, F1.

    Every cut between two distinct scores is tried; the threshold lies halfway between the lowest
    score it flags and the highest it passes, so a new image scoring like one of the set gets the
    same verdict. This is the F1-max of MUSC_SPEC 6 (``precision_recall_curve``), as a threshold.
    """
    s, y = _scores_labels(scores, labels)
    if y.min() == y.max():
        raise InputError("an F1-optimal threshold needs both good (0) and anomalous (1) images; "
                         f"the labels are all {int(y[0])}")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    fp = np.cumsum(1 - y)
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # last index of each run of equal scores
    tp, fp = tp[last], fp[last]
    n_pos = int(y.sum())
    f1 = 2 * tp / (tp + fp + n_pos)  # 2PR/(P+R) with P = tp/(tp+fp), R = tp/n_pos
    best = int(np.argmax(f1))
    lowest_flagged = s[last[best]]
    below = s[last[best] + 1] if last[best] + 1 < s.size else None
    value = _between(lowest_flagged, below)
    return value, _rates(s, y, value)


def at_false_reject_rate(scores: Sequence[float], labels: Sequence[int], target: float) -> tuple[float, dict]:
    """The lowest threshold that rejects at most ``target`` of the labelled good parts.

    Measured on them, not estimated: with n good parts the rates it can tell apart are 0, 1/n,
    2/n, ...; below 1/n it puts the threshold just above the highest good score and says so
    (``resolved: false``).
    """
    s, y = _scores_labels(scores, labels)
    _check_rate(target, "false-reject rate")
    good = s[y == 0]
    if good.size == 0:
        raise InputError("a false-reject threshold needs labelled good (0) images; there are none")
    value, resolved = _empirical(good, target)
    return value, {**_rates(s, y, value), "resolved": resolved}


def at_false_alarm_rate(good_scores: Sequence[float], target: float) -> tuple[float, dict]:
    """A threshold with an expected false-alarm rate of ``target`` on parts like ``good_scores``.

    Empirical (the lowest threshold passing all but ``floor(target * n)`` of them) when the run
    holds at least 1/target parts; for fewer, a quantile of a Gumbel fit (method of moments) of
    their scores, never below the highest of them: extrapolating is all a small run allows, and
    the result says ``basis: gumbel-fit`` so it is not mistaken for a measurement.
    """
    good = _finite(good_scores, "good scores")
    _check_rate(target, "false-alarm rate")
    if good.size < 2:
        raise InputError(f"a false-alarm threshold needs at least 2 known-good images, got {good.size}")
    value, resolved = _empirical(good, target)
    basis = "empirical"
    if not resolved:
        mean, std = float(good.mean()), float(good.std(ddof=1))
        beta = std * math.sqrt(6) / math.pi
        mu = mean - _EULER_GAMMA * beta
        fit = mu - beta * math.log(-math.log1p(-target))  # Gumbel quantile at 1 - target
        value = max(fit, float(np.nextafter(good.max(), np.inf)))
        basis = "gumbel-fit"
    return value, {"false_reject_rate": float(np.mean(good >= value)), "basis": basis}


def spread(good_scores: Sequence[float]) -> float:
    """The scale of :func:`normalised_score`: the standard deviation of the good parts' scores
    (a positive floor where they are all equal, so the score stays defined)."""
    good = _finite(good_scores, "good scores")
    std = float(good.std(ddof=1)) if good.size > 1 else 0.0
    return std if std > 0 else max(abs(float(good.mean())) * 1e-3, 1e-6)


def normalised_score(raw, threshold: Threshold | Mapping):
    """A stable 0-1 score: ``1 / (1 + exp(-(raw - T) / scale))``, T and scale from ``threshold``.

    0.5 exactly at the threshold, strictly increasing in ``raw``, so ``normalised >= 0.5`` is the
    same verdict as ``raw >= T``. ``scale`` is the spread of the good parts' raw scores: a part
    one good-spread above T scores 0.73, two spreads 0.88; a typical good part, a few spreads below
    T, 0.05-0.2. Unlike ``image_score`` (min-max within the pool, MUSC_SPEC 5) it does not move
    when the pool changes, only when the threshold file does. Takes a float or an array.
    """
    th = threshold if isinstance(threshold, Threshold) else Threshold.from_dict(threshold)
    z = (np.asarray(raw, dtype=np.float64) - th.value) / th.scale
    out = 0.5 * (1.0 + np.tanh(0.5 * z))  # the logistic, without overflow for large |z|
    return float(out) if out.ndim == 0 else out


def calibrate(run: RunScores, *, target_fpr: float | None = None, target_frr: float | None = None) -> Threshold:
    """The threshold of a run: the asked target, else F1-optimal with labels, else an error.

    With labels, good = label 0 (unknown labels are left out); without, every image is taken as
    a known-good part. All thresholds the data allows are kept in ``candidates``.
    """
    if target_fpr is not None and target_frr is not None:
        raise InputError("give one of --target-fpr and --target-frr, not both")
    s = run.scores
    labelled = run.labels is not None and np.any(run.labels >= 0)
    if labelled:
        known = run.labels >= 0
        s, y = s[known], run.labels[known].astype(np.int64)
        good = s[y == 0]
        both = bool(y.min() == 0 and y.max() == 1)
    else:
        y, good, both = None, s, False
    if good.size < 2:
        raise InputError(f"{run.source}: {good.size} good image(s); a threshold needs at least 2 known-good "
                         "images (label 0, or a run of good parts only)")
    candidates: dict[str, dict] = {}
    if both:
        v, m = f1_optimal(s, y)
        candidates["f1"] = {"value": v, **m}
    if target_frr is not None:
        if not both:
            raise InputError(f"{run.source}: --target-frr measures rejects of labelled good parts and the defects "
                             "caught; it needs labels of both kinds. For a run of good parts only use --target-fpr")
        v, m = at_false_reject_rate(s, y, target_frr)
        candidates["false_reject_rate"] = {"value": v, "target": target_frr, **m}
    if target_fpr is not None:
        v, m = at_false_alarm_rate(good, target_fpr)
        if both:
            m = {**_rates(s, y, v), "basis": m["basis"]}
        candidates["false_alarm_rate"] = {"value": v, "target": target_fpr, **m}
    if target_fpr is not None:
        method, target = "false_alarm_rate", target_fpr
    elif target_frr is not None:
        method, target = "false_reject_rate", target_frr
    elif both:
        method, target = "f1", None
    elif labelled:
        raise InputError(f"{run.source}: labels of one kind only ({good.size} good), so no F1-optimal threshold; "
                         "give a false-alarm rate for the good parts, e.g. --target-fpr 0.01")
    else:
        raise InputError(f"{run.source}: no labels, so no F1-optimal threshold; take the images as known-good "
                         "parts and give a false-alarm rate, e.g. --target-fpr 0.01")
    chosen = dict(candidates[method])
    value = float(chosen.pop("value"))
    chosen.pop("target", None)
    basis = chosen.pop("basis", "labels" if method != "false_alarm_rate" else "empirical")
    return Threshold(value=value, score=run.score, method=method, target=target, scale=spread(good),
                     basis=basis, n_good=int(good.size), n_anomalous=int((y == 1).sum()) if y is not None else 0,
                     measured=chosen, good=_summary(good), candidates=candidates, source=run.source)


# ----------------------------------------------------------------------------------------- files
def write_threshold(path: Path | str, threshold: Threshold) -> None:
    atomic_write_bytes(Path(path), (json.dumps(threshold.to_dict(), indent=2) + "\n").encode())


def read_threshold(path: Path | str) -> Threshold:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"threshold file not found: {path}; write one with `musc-edge threshold OUTDIR`") from None
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"threshold file {path} cannot be read ({e})") from None
    return Threshold.from_dict(data, where=str(path))


def load_scores(out_dir: Path | str, score: str = "raw_score") -> RunScores:
    """The scores of a run: ``OUTDIR/scores.csv`` (``musc-edge score``) or ``OUTDIR/results.jsonl``
    (``musc-edge watch``; no labels, a last line without its newline is being written and skipped)."""
    out = Path(out_dir)
    if score not in SCORES:
        raise InputError(f"expected a score column among {', '.join(SCORES)}, but got {score!r}")
    csv_path, jsonl_path = out / "scores.csv", out / "results.jsonl"
    if csv_path.is_file() and jsonl_path.is_file():
        raise InputError(f"{out} holds both scores.csv and results.jsonl; point at the output folder of one run")
    if csv_path.is_file():
        paths, scores, labels = _read_csv(csv_path, score)
        source = str(csv_path)
    elif jsonl_path.is_file():
        paths, scores, labels = _read_jsonl(jsonl_path, score)
        source = str(jsonl_path)
    else:
        raise InputError(f"{out} holds neither scores.csv (musc-edge score) nor results.jsonl (musc-edge watch)")
    if not scores:
        raise InputError(f"{source} holds no scored images")
    arr = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{source}: expected finite {score} values, but got NaN or inf")
    lab = None if labels is None else np.asarray(labels, dtype=np.int64)
    return RunScores(tuple(paths), arr, lab, source, score)


def _read_csv(path: Path, score: str) -> tuple[list[str], list[float], list[int] | None]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or score not in reader.fieldnames:
            raise InputError(f"{path}: expected a column {score!r}, but the header is {reader.fieldnames}")
        has_labels = "label" in reader.fieldnames
        paths, scores, labels = [], [], []
        for i, row in enumerate(reader, start=2):
            try:
                scores.append(float(row[score]))
                label = (row.get("label") or "").strip()
                labels.append(int(label) if label else -1)
            except (TypeError, ValueError):
                raise InputError(f"{path}, line {i}: expected a number in {score!r} and 0/1/empty in 'label', "
                                 f"but got {row.get(score)!r}, {row.get('label')!r}") from None
            if labels[-1] not in (-1, 0, 1):
                raise InputError(f"{path}, line {i}: expected label 0 (good) or 1 (anomalous), got {labels[-1]}")
            paths.append(row.get("path", ""))
    return paths, scores, labels if has_labels else None


def _read_jsonl(path: Path, score: str) -> tuple[list[str], list[float], None]:
    raw = path.read_bytes()
    paths, scores = [], []
    for i, line in enumerate(raw.split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            scores.append(float(rec[score]))
        except (ValueError, KeyError, TypeError):
            raise InputError(f"{path}, line {i}: expected a JSON object with {score!r}") from None
        paths.append(str(rec.get("path", "")))
    return paths, scores, None


# ----------------------------------------------------------------------------------------- helpers
def _finite(values: Sequence[float], what: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(arr).all():
        raise InputError(f"expected finite {what}, but got NaN or inf")
    return arr


def _scores_labels(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    s = _finite(scores, "scores")
    y = np.asarray(labels).ravel()
    if y.shape != s.shape:
        raise InputError(f"expected one label per score ({s.size} scores), but got {y.size} labels")
    if s.size == 0:
        raise InputError("expected scores, but got none")
    if not np.isin(y, (0, 1)).all():
        bad = sorted(set(y.tolist()) - {0, 1})
        raise InputError(f"expected labels 0 (good) or 1 (anomalous), but got values {bad}")
    return s, y.astype(np.int64)


def _check_rate(rate: float, what: str) -> None:
    if not (isinstance(rate, (int, float)) and 0 < rate < 1):
        raise InputError(f"expected a {what} between 0 and 1 (e.g. 0.01 for 1 %), but got {rate!r}")


def _between(flagged: float, passed: float | None) -> float:
    """Halfway between the lowest flagged and the highest passed score (just above, if none passes)."""
    if passed is None:
        return float(flagged)
    return float(passed + (flagged - passed) / 2)


def _empirical(good: np.ndarray, target: float) -> tuple[float, bool]:
    """Lowest threshold rejecting at most floor(target * n) of ``good``; resolved when that is >= 1."""
    desc = np.sort(good)[::-1]
    allowed = int(math.floor(target * desc.size + 1e-9))  # 0.29 * 100 is 28.999...: still 29
    if allowed == 0:
        return float(np.nextafter(desc[0], np.inf)), False
    # reject the `allowed` highest; ties with the first passed score must pass too
    passed = desc[allowed]
    flagged = desc[:allowed]
    flagged = flagged[flagged > passed]
    if flagged.size == 0:
        return float(np.nextafter(passed, np.inf)), allowed >= 1
    return _between(float(flagged.min()), float(passed)), True


def _rates(s: np.ndarray, y: np.ndarray, value: float) -> dict:
    flagged = s >= value
    tp = int(np.sum(flagged & (y == 1)))
    fp = int(np.sum(flagged & (y == 0)))
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / n_pos if n_pos else float("nan")
    f1 = 2 * tp / (2 * tp + fp + (n_pos - tp)) if n_pos else float("nan")
    out = {"false_reject_rate": fp / n_neg if n_neg else float("nan"), "precision": precision}
    if n_pos:
        out |= {"recall": recall, "f1": f1}
    return out


def _summary(good: np.ndarray) -> dict:
    return {"mean": float(good.mean()), "std": float(good.std(ddof=1)) if good.size > 1 else 0.0,
            "median": float(np.median(good)), "max": float(good.max())}
