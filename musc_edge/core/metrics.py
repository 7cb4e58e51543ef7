"""Evaluation metrics of MUSC_SPEC 6: image and pixel AUROC, AP, F1-max, and AUPRO at FPR 0.3.

Why this module exists: the authors' evaluation calls scikit-learn on every pixel of a category
(one argsort per metric, about 9 s each for 25 M pixels on one core) and computes AUPRO with a
Python loop over 200 thresholds x every ground-truth region (minutes). We give the same numbers,
vectorised and in pure numpy (regions labelled by :mod:`musc_edge.core.regions`):

* AUROC, AP and F1-max all come from one ``np.sort`` of the pooled scores and, for each distinct
  score of a positive, how many scores lie below it and how many tie with it (:class:`RankCounts`).
  Ties are exact equality, grouped as scikit-learn's ``_binary_clf_curve`` groups them, so AUROC
  equals ``roc_auc_score`` (ties count one half), AP equals ``average_precision_score``
  (step-wise, no interpolation) and F1-max is the maximum of ``2PR / (P + R)`` over
  ``precision_recall_curve``'s finite points.
* AUPRO never loops over thresholds on images: each anomalous pixel is given its threshold bin
  once (``np.searchsorted``) and the weight ``1 / area of its region``; a weighted ``np.bincount``
  and a reversed cumulative sum then give the mean per-region overlap at every threshold. The
  false-positive counts at every threshold are binary searches in the same sorted scores.
  O(pixels) besides the one sort.

Undefined metrics: image metrics over a single class are a caller error (:class:`InputError`);
pixel metrics over masks with no anomalous (or no normal) pixel, and AUPRO when its FPR curve is
degenerate, are reported as ``None`` with the reason (a :class:`UndefinedMetricWarning` and the
result's ``reasons``), because a category without masks must not stop an evaluation.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .errors import InputError
from .regions import positive_regions

ArrayLike = Union[np.ndarray, Sequence]

#: Keys of :func:`image_metrics`' result.
IMAGE_KEYS = ("auroc", "ap", "f1_max")
#: Keys of :func:`pixel_metrics`' result.
PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro")


class UndefinedMetricError(InputError):
    """A metric that has no value for these inputs (one class only, degenerate FPR curve)."""


class UndefinedMetricWarning(UserWarning):
    """Issued by :func:`pixel_metrics` for each metric it reports as ``None``; says why."""


class Metrics(dict):
    """A plain ``dict`` of metric name -> float (or ``None``), plus ``reasons``.

    ``reasons`` maps the name of every metric that is ``None`` because it is undefined to a
    one-line explanation. It is an attribute, not a key, so the dict holds only metrics
    (``json.dumps`` of a :class:`Metrics` gives the metrics alone).
    """

    def __init__(self, values: dict, reasons: dict | None = None):
        super().__init__(values)
        self.reasons: dict[str, str] = dict(reasons or {})


# --------------------------------------------------------------------------------------------
# Ranking summary shared by AUROC, AP, F1-max and the FPR of AUPRO
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankCounts:
    """Where the positives fall among all scores: everything the ranking metrics need.

    sorted_scores: (n,) every score, ascending (kept for AUPRO's false-positive counts).
    values: (U,) the distinct scores of the positives, ascending, in the scores' dtype (a tie
        is exact equality, as in scikit-learn).
    positives: (U,) int64, positives scoring exactly ``values[u]``.
    below: (U,) int64, scores (of either class) strictly below ``values[u]``.
    tied: (U,) int64, scores (of either class, positives included) equal to ``values[u]``.
    """

    sorted_scores: np.ndarray
    values: np.ndarray
    positives: np.ndarray
    below: np.ndarray
    tied: np.ndarray

    @property
    def n(self) -> int:
        return int(self.sorted_scores.size)

    @property
    def n_positive(self) -> int:
        return int(self.positives.sum())

    @property
    def n_negative(self) -> int:
        return self.n - self.n_positive

    def count_above(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(all scores > t, positive scores > t) for each float64 threshold t."""
        le = _count_at_most(self.sorted_scores, thresholds)
        positives_le = np.concatenate(([0], np.cumsum(self.positives)))[
            _count_at_most(self.values, thresholds)]
        return self.n - le, self.n_positive - positives_le


def _count_at_most(ascending: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """How many of ``ascending`` are <= each float64 threshold, compared exactly in float64.

    For float32 data the threshold is first rounded *down* to float32 (then ``x <= t32`` iff
    ``x <= t``), so the large array is never cast to float64.
    """
    if ascending.dtype == np.float32:
        t32 = thresholds.astype(np.float32)
        too_high = t32.astype(np.float64) > thresholds
        t32[too_high] = np.nextafter(t32[too_high], np.float32(-np.inf))
        return np.searchsorted(ascending, t32, side="right")
    return np.searchsorted(ascending, thresholds.astype(ascending.dtype), side="right")


def rank_counts(scores: np.ndarray, positive_scores: np.ndarray) -> RankCounts:
    """Build the :class:`RankCounts` of ``scores``, of which ``positive_scores`` are the positives.

    ``positive_scores`` must hold exactly the scores of the positive samples (same values, same
    dtype). Cost: one ``np.sort`` of all scores (SIMD-accelerated in numpy 2; scikit-learn's
    ``argsort`` is ~20x slower here) and two binary searches per distinct positive score; the
    labels are never permuted and nothing of the size of the input is built besides the sort.
    """
    ordered = np.sort(scores, kind="quicksort")
    values, positives = np.unique(positive_scores, return_counts=True)
    below = np.searchsorted(ordered, values, side="left")
    tied = np.searchsorted(ordered, values, side="right") - below
    return RankCounts(ordered, values, positives.astype(np.int64), below.astype(np.int64), tied.astype(np.int64))


def _auroc(rc: RankCounts) -> float:
    """Area under the ROC curve; equals scikit-learn's ``roc_auc_score`` (trapezoids over ties).

    Each positive is credited with the negatives strictly below it plus half of those tied with
    it (the trapezoid over a tied run); summed in exact int64 before the one division.
    """
    positives_below = np.cumsum(rc.positives) - rc.positives
    negatives_below = rc.below - positives_below
    negatives_tied = rc.tied - rc.positives
    twice_credit = int(np.dot(rc.positives, 2 * negatives_below + negatives_tied))
    return twice_credit / (2.0 * rc.n_positive * rc.n_negative)


def _tp_and_predicted(rc: RankCounts) -> tuple[np.ndarray, np.ndarray]:
    """At each threshold "score >= values[u]": true positives and all predicted positives.

    Only these thresholds matter for AP and F1-max: where no positive sits, recall does not
    rise (no AP term) and the false positives grow (F1 falls).
    """
    tp = rc.n_positive - (np.cumsum(rc.positives) - rc.positives)
    return tp, rc.n - rc.below


def _average_precision(rc: RankCounts) -> float:
    """AP = sum over thresholds of (R_k - R_{k-1}) * P_k: scikit-learn's step-wise definition."""
    tp, predicted = _tp_and_predicted(rc)
    # Integer weights, one division at the end: a perfect ranking gives exactly 1.0.
    return float(np.dot(rc.positives, tp / predicted) / rc.n_positive)


def _f1_max(rc: RankCounts) -> float:
    """Max of 2PR / (P + R) over the precision-recall curve's finite points.

    With P = tp / predicted and R = tp / n_pos, 2PR / (P + R) = 2 tp / (predicted + n_pos). The
    points where scikit-learn's formula is 0/0 (tp = 0) are dropped there and give 0 here; its
    end point (P = 1, R = 0) gives 0; so the maximum is over our thresholds and 0.
    """
    tp, predicted = _tp_and_predicted(rc)
    return float(max(0.0, (2.0 * tp / (predicted + rc.n_positive)).max(initial=0.0)))


# --------------------------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------------------------


def _is_real(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)


def _as_binary(arr: np.ndarray, what: str, hint: str = "") -> np.ndarray:
    """A bool array from bool or 0/1 numbers; anything else is an InputError naming ``what``."""
    if arr.dtype == bool:
        return arr
    expected = f"expected {what} of 0 (normal) or 1 (anomalous), or bool"
    if not _is_real(arr.dtype):
        raise InputError(f"{expected}, but got dtype {arr.dtype}")
    bad = (arr != 0) & (arr != 1)
    if bad.any():
        raise InputError(f"{expected}, but got values {np.unique(arr[bad])[:5].tolist()}{hint}")
    return arr == 1


def _binary_labels(labels: ArrayLike) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise InputError(f"expected labels of shape (N,), but got shape {arr.shape}")
    return _as_binary(arr, "labels")


def _finite_scores(scores: ArrayLike, what: str) -> np.ndarray:
    arr = np.asarray(scores)
    if arr.dtype == bool or not _is_real(arr.dtype):
        raise InputError(f"expected real-valued {what}, but got dtype {arr.dtype}")
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)  # exact; float32 sorts fast
    elif arr.dtype != np.float32:
        arr = arr.astype(np.float64, copy=False)  # integers exact below 2**53; long double rounded
    if not np.isfinite(arr).all():
        raise InputError(f"expected finite {what}, but got NaN or inf; check the scorer's output")
    return arr


def _mask_array(mask, index: int) -> np.ndarray:
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise InputError(f"expected mask {index} to be 2-D (H, W), but got shape {arr.shape}; "
                         "pass masks as (N, H, W) or a list of (H, W) arrays")
    return _as_binary(arr, f"mask {index}", "; threshold 8-bit masks first (mask > 127)")


def _map_array(amap, index: int, shape: tuple) -> np.ndarray:
    arr = np.asarray(amap)
    if arr.shape != shape:
        raise InputError(f"expected map {index} of shape {shape} like its mask, but got {arr.shape}; "
                         "compute maps at the masks' (original) image size")
    return _finite_scores(arr, f"map {index}")


@dataclass(frozen=True)
class _PooledPixels:
    """Every pixel of the category, pooled: what all pixel metrics need."""

    scores: np.ndarray           # (P_all,) every map value
    positive_scores: np.ndarray  # (P_pos,) values under the masks
    positive_weights: np.ndarray  # (P_pos,) 1 / area of each pixel's region (empty unless regions)
    n_regions: int


def _pool_pixels(masks: ArrayLike, maps: ArrayLike, *, regions: bool) -> _PooledPixels:
    """Check masks and maps pairwise and pool them; label 8-connected regions if asked.

    Images may have different sizes (metrics are taken at the original image size). Regions are
    labelled per image, 8-connected (:func:`musc_edge.core.regions.positive_regions`: the same regions
    as ``skimage.measure.label``'s default full connectivity used by the authors).
    """
    masks = masks if hasattr(masks, "__len__") else list(masks)
    maps = maps if hasattr(maps, "__len__") else list(maps)
    if len(masks) != len(maps):
        raise InputError(f"expected one map per mask ({len(masks)} masks), but got {len(maps)} maps")
    if len(masks) == 0:
        raise InputError("expected at least one mask and map, but got none")
    all_scores, pos_scores, pos_weights = [], [], []
    n_regions = 0
    for i in range(len(masks)):  # indexing, not iteration: lazy sequences load one image at a time
        m = _mask_array(masks[i], i)
        a = _map_array(maps[i], i, m.shape)
        all_scores.append(a.ravel())
        if regions and m.any():
            k, inside = positive_regions(m)  # region of each defect pixel, row-major like a[m]
            area = np.bincount(inside, minlength=k)
            pos_scores.append(a[m])
            pos_weights.append(1.0 / area[inside])
            n_regions += k
        elif m.any():
            pos_scores.append(a[m])
    dtype = np.result_type(*[s.dtype for s in all_scores])
    scores = np.concatenate(all_scores).astype(dtype, copy=False) if len(all_scores) > 1 else all_scores[0]
    positive = np.concatenate(pos_scores).astype(dtype, copy=False) if pos_scores else np.empty(0, dtype)
    weights = np.concatenate(pos_weights) if pos_weights else np.empty(0, np.float64)
    return _PooledPixels(scores, positive, weights, n_regions)


# --------------------------------------------------------------------------------------------
# AUPRO (MUSC_SPEC 6)
# --------------------------------------------------------------------------------------------


def aupro_thresholds(vmin: float, vmax: float, steps: int = 200) -> np.ndarray:
    """The thresholds of MUSC_SPEC 6: ``np.arange(min, max, (max - min) / steps)`` in float64.

    This is exactly how the authors' evaluation spaces them, including numpy's float ``arange``
    length: for about 6% of (min, max) pairs rounding yields ``steps + 1`` thresholds (the last one
    within rounding of ``max``), and the released numbers include that point, so we keep it.
    min and max are taken exactly in float64 whatever the maps' dtype: the authors' maps are
    float64; had they been float32, their code would have computed the step in float32.
    """
    vmin, vmax = float(vmin), float(vmax)
    return np.arange(vmin, vmax, (vmax - vmin) / steps)


def _aupro_from(pooled: _PooledPixels, counts: RankCounts, steps: int, max_fpr: float) -> float:
    """AUPRO from the pooled pixels and their ranking table; raises UndefinedMetricError.

    For each threshold th (ascending): binary = map > th; PRO(th) = mean over regions of the
    fraction of the region's pixels in binary; FPR(th) = normal pixels in binary / normal pixels.
    Keep FPR < max_fpr, min-max rescale the kept FPRs to [0, 1], trapezoidal area of (FPR, PRO).
    """
    if pooled.n_regions == 0:
        raise UndefinedMetricError("AUPRO is undefined: the masks hold no anomalous pixel")
    n_negative = counts.n_negative
    if n_negative == 0:
        raise UndefinedMetricError("AUPRO is undefined: the masks hold no normal pixel")
    vmin, vmax = counts.sorted_scores[0], counts.sorted_scores[-1]
    if not vmax > vmin:
        raise UndefinedMetricError(f"AUPRO is undefined: every map value equals {float(vmin)!r}")
    ths = aupro_thresholds(vmin, vmax, steps)

    # FP(th) = pixels > th - anomalous pixels > th, by binary search in the sorted scores.
    above, positives_above = counts.count_above(ths)
    fpr = (above - positives_above) / n_negative

    # Anomalous pixel p is in binary at threshold i iff ths[i] < v_p, i.e. iff i < bin_p.
    bins = np.searchsorted(ths, pooled.positive_scores.astype(np.float64, copy=False), side="left")
    weight_per_bin = np.bincount(bins, weights=pooled.positive_weights, minlength=ths.size + 1)
    inside_from = np.cumsum(weight_per_bin[::-1])[::-1]  # inside_from[b] = weights of bins >= b
    pro = inside_from[1:] / pooled.n_regions               # pro[i] = weights of bins > i

    keep = fpr < max_fpr
    if not keep.any():
        raise UndefinedMetricError(
            f"AUPRO is undefined: no threshold reaches FPR < {max_fpr} "
            f"(lowest FPR {float(fpr.min()):.4g}); most normal pixels share the top score")
    kept_fpr, kept_pro = fpr[keep], pro[keep]
    span = kept_fpr.max() - kept_fpr.min()
    if span == 0:
        raise UndefinedMetricError(
            f"AUPRO is undefined: the FPR is {float(kept_fpr[0]):.4g} at every threshold below "
            f"{max_fpr}, so it cannot be rescaled to [0, 1] (normal pixels all at the minimum score?)")
    rescaled = (kept_fpr - kept_fpr.min()) / span
    # FPR falls as the threshold rises: integrate in the reverse direction, as sklearn's auc does
    # (np.trapezoid's arithmetic, written out because numpy < 2 lacks that name).
    return float(-(np.diff(rescaled) * (kept_pro[1:] + kept_pro[:-1]) / 2.0).sum())


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def image_metrics(labels: ArrayLike, scores: ArrayLike) -> Metrics:
    """Image-level AUROC, AP and F1-max (MUSC_SPEC 6) of ``scores`` against 0/1 ``labels``.

    Raises :class:`InputError` when the labels hold a single class: AUROC is then undefined, and a
    category evaluated without any good (or any defective) image is a mistake in the test set, not
    a number to average (the authors' code silently reports 0 there).
    """
    y = _binary_labels(labels)
    s = _finite_scores(scores, "image scores")
    if s.shape != y.shape:
        raise InputError(f"expected image scores of shape {y.shape} like the labels, but got {s.shape}")
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.size:
        only = "1 (anomalous)" if n_pos else "0 (normal)"
        raise UndefinedMetricError(
            f"expected both normal (0) and anomalous (1) labels, but got only {only} in {y.size} images; "
            "image AUROC/AP/F1 need at least one of each")
    counts = rank_counts(s, s[y])
    return Metrics({"auroc": _auroc(counts), "ap": _average_precision(counts), "f1_max": _f1_max(counts)})


def pixel_metrics(masks: ArrayLike, maps: ArrayLike, *, pro: bool = True, pro_thresholds: int = 200,
                  max_fpr: float = 0.3) -> Metrics:
    """Pixel AUROC, AP, F1-max and AUPRO over every pixel of a category (MUSC_SPEC 6).

    masks: (N, H, W) or a sequence of (H_i, W_i) arrays, bool or 0/1 (threshold 8-bit masks at >127).
    maps: anomaly maps of the same shapes, at the original image size.
    pro: compute AUPRO (``aupro`` is ``None`` when False); pro_thresholds, max_fpr: see :func:`aupro`.

    A metric that is undefined for these inputs (no anomalous or no normal pixel; a degenerate
    AUPRO curve) is ``None``; ``result.reasons[name]`` and an :class:`UndefinedMetricWarning` say
    why. Malformed inputs (shapes, values) raise :class:`InputError`.
    """
    _check_pro_args(pro_thresholds, max_fpr)
    pooled = _pool_pixels(masks, maps, regions=pro)
    counts = rank_counts(pooled.scores, pooled.positive_scores)
    values: dict = dict.fromkeys(PIXEL_KEYS)
    reasons: dict[str, str] = {}
    if counts.n_positive == 0 or counts.n_negative == 0:
        kind = "anomalous" if counts.n_positive == 0 else "normal"
        for key in ("auroc", "ap", "f1_max"):
            reasons[key] = f"pixel {key} is undefined: the masks hold no {kind} pixel"
    else:
        values.update(auroc=_auroc(counts), ap=_average_precision(counts), f1_max=_f1_max(counts))
    if pro:
        try:
            values["aupro"] = _aupro_from(pooled, counts, pro_thresholds, max_fpr)
        except UndefinedMetricError as exc:
            reasons["aupro"] = str(exc)
    for reason in reasons.values():
        warnings.warn(reason, UndefinedMetricWarning, stacklevel=2)
    return Metrics(values, reasons)


def aupro(masks: ArrayLike, maps: ArrayLike, *, thresholds: int = 200, max_fpr: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to FPR ``max_fpr``, normalised (MUSC_SPEC 6).

    As the authors' evaluation computes it: thresholds ``np.arange(min, max, (max - min) / 200)``
    over all maps; at each, binary = map > threshold; PRO = mean over 8-connected ground-truth
    regions of all images of the region's fraction in binary; FPR = normal pixels in binary /
    all normal pixels; keep FPR < ``max_fpr``; min-max rescale the kept FPRs to [0, 1]; trapezoid.
    Note the min-max rescaling: the result is not the usual "AUPRO / 0.3".

    Raises :class:`UndefinedMetricError` (an :class:`InputError`) where the authors' code would
    give NaN or crash: no anomalous or no normal pixel, constant maps, or an FPR curve with
    fewer than two distinct values below ``max_fpr``.
    """
    _check_pro_args(thresholds, max_fpr)
    pooled = _pool_pixels(masks, maps, regions=True)
    counts = rank_counts(pooled.scores, pooled.positive_scores)
    return _aupro_from(pooled, counts, thresholds, max_fpr)


def _check_pro_args(steps: int, max_fpr: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
        raise InputError(f"expected an integer number of AUPRO thresholds >= 2, but got {steps!r}")
    if not 0.0 < float(max_fpr) <= 1.0:
        raise InputError(f"expected max_fpr in (0, 1], but got {max_fpr!r}")


__all__ = [
    "IMAGE_KEYS", "PIXEL_KEYS", "Metrics", "RankCounts", "UndefinedMetricError", "UndefinedMetricWarning",
    "aupro", "aupro_thresholds", "image_metrics", "pixel_metrics", "rank_counts",
]
