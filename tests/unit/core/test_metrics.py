"""Image and pixel AUROC / AP / F1-max against scikit-learn (the authors' evaluation calls it)."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from musc_edge.core.errors import InputError
from musc_edge.core.metrics import (
    IMAGE_KEYS,
    PIXEL_KEYS,
    UndefinedMetricError,
    UndefinedMetricWarning,
    image_metrics,
    pixel_metrics,
)


def sklearn_metrics(labels, scores) -> dict:
    """What the authors' ``compute_metrics`` does with scikit-learn."""
    labels, scores = np.asarray(labels).ravel(), np.asarray(scores).ravel()
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "auroc": roc_auc_score(labels, scores),
        "ap": average_precision_score(labels, scores),
        "f1_max": np.max(f1[np.isfinite(f1)]),
    }


def random_case(rng: np.random.Generator, n: int, levels: int | None, dtype=np.float64):
    """Labels with both classes, scores shifted for positives; ``levels`` quantises to force ties."""
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[rng.integers(n)] = True
    labels[rng.integers(n)] = False
    labels[0], labels[1] = True, False
    scores = rng.normal(size=n) + labels * rng.uniform(0, 2)
    if levels is not None:
        scores = np.round(scores * levels / 4) / levels
    return labels.astype(int), scores.astype(dtype)


def assert_matches(ours: dict, ref: dict) -> None:
    for key, value in ref.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("seed", range(40))
def test_image_metrics_match_sklearn_with_and_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    levels = [None, 2, 5, 50][seed % 4]
    labels, scores = random_case(rng, n, levels, dtype=[np.float64, np.float32][seed % 2])
    result = image_metrics(labels, scores)
    assert tuple(result) == IMAGE_KEYS
    assert_matches(result, sklearn_metrics(labels, scores))


def test_image_metrics_accept_lists_and_bools():
    labels = [True, False, True, False, False]
    scores = [0.9, 0.1, 0.4, 0.4, 0.8]
    assert_matches(image_metrics(labels, scores), sklearn_metrics(np.array(labels, int), scores))
    assert_matches(image_metrics([1, 0, 1, 0, 0], scores), sklearn_metrics([1, 0, 1, 0, 0], scores))


def test_image_metrics_known_values():
    # Perfect ranking, a fully tied ranking, and a reversed ranking.
    assert image_metrics([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0}
    tied = image_metrics([0, 1, 0, 1], [5, 5, 5, 5])
    assert tied["auroc"] == 0.5 and tied["ap"] == 0.5 and tied["f1_max"] == pytest.approx(2 / 3)
    assert image_metrics([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4])["auroc"] == 0.0


@pytest.mark.parametrize("only", [0, 1])
def test_image_metrics_single_class_is_an_error_naming_it(only):
    with pytest.raises(UndefinedMetricError, match=rf"but got only {only} \((normal|anomalous)\) in 3 images"):
        image_metrics([only] * 3, [0.1, 0.2, 0.3])
    assert issubclass(UndefinedMetricError, InputError)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([0, 1, 1], [0.1, 0.2], r"expected image scores of shape \(3,\) like the labels, but got \(2,\)"),
        ([0, 1, 2], [0.1, 0.2, 0.3], r"expected labels of 0 \(normal\) or 1 \(anomalous\), or bool, but got values \[2\]"),
        ([[0, 1]], [[0.1, 0.2]], r"expected labels of shape \(N,\), but got shape \(1, 2\)"),
        ([0, 1], [0.1, np.nan], r"expected finite image scores, but got NaN or inf"),
        ([0, 1], [0.1, np.inf], r"expected finite image scores, but got NaN or inf"),
        ([0, 1], ["a", "b"], r"expected real-valued image scores, but got dtype <U1"),
        (["n", "a"], [0.1, 0.2], r"expected labels of 0 \(normal\) or 1 \(anomalous\), or bool, but got dtype <U1"),
    ],
)
def test_image_metrics_input_errors(labels, scores, message):
    with pytest.raises(InputError, match=message):
        image_metrics(labels, scores)


def blob_masks(rng: np.random.Generator, shapes, p_anomalous=0.6):
    """Masks with a few random rectangles and discs; some images stay all-normal."""
    masks = []
    for h, w in shapes:
        mask = np.zeros((h, w), bool)
        if rng.random() < p_anomalous:
            yy, xx = np.mgrid[:h, :w]
            for _ in range(int(rng.integers(1, 4))):
                cy, cx, r = rng.integers(h), rng.integers(w), rng.integers(1, max(2, min(h, w) // 4))
                if rng.random() < 0.5:
                    mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                else:
                    mask[cy: cy + r, cx: cx + 2 * r] = True
        masks.append(mask)
    return masks


def noisy_maps(rng, masks, levels=None, dtype=np.float32):
    maps = []
    for mask in masks:
        amap = rng.normal(size=mask.shape) + 1.5 * mask * rng.random()
        if levels is not None:
            amap = np.round(amap * levels) / levels
        maps.append(amap.astype(dtype))
    return maps


@pytest.mark.parametrize("seed", range(12))
def test_pixel_metrics_match_sklearn_on_variable_sizes(seed):
    rng = np.random.default_rng(100 + seed)
    shapes = [(int(rng.integers(5, 40)), int(rng.integers(5, 40))) for _ in range(int(rng.integers(2, 7)))]
    masks = blob_masks(rng, shapes)
    masks[0][0, 0] = True  # at least one anomalous pixel
    maps = noisy_maps(rng, masks, levels=[None, 3, 20][seed % 3], dtype=[np.float32, np.float64][seed % 2])
    flat_masks = np.concatenate([m.ravel() for m in masks]).astype(int)
    flat_maps = np.concatenate([m.ravel() for m in maps])
    result = pixel_metrics(masks, maps, pro=False)
    assert tuple(result) == PIXEL_KEYS and result["aupro"] is None and result.reasons == {}
    assert_matches({k: result[k] for k in IMAGE_KEYS}, sklearn_metrics(flat_masks, flat_maps))


def test_pixel_metrics_accept_stacked_arrays_and_01_masks():
    rng = np.random.default_rng(7)
    masks = np.stack(blob_masks(rng, [(24, 32)] * 4, p_anomalous=1.0)).astype(np.uint8)
    maps = np.stack(noisy_maps(rng, masks.astype(bool)))
    result = pixel_metrics(masks, maps)
    assert_matches({k: result[k] for k in IMAGE_KEYS}, sklearn_metrics(masks, maps))
    assert 0.0 <= result["aupro"] <= 1.0
    assert json.loads(json.dumps(result)).keys() == set(PIXEL_KEYS)


def test_pixel_metrics_without_anomalous_pixels_are_none_with_reasons():
    masks = [np.zeros((8, 10), bool), np.zeros((6, 6), np.uint8)]
    maps = [np.random.default_rng(0).random((8, 10)), np.zeros((6, 6))]
    with pytest.warns(UndefinedMetricWarning, match="no anomalous pixel"):
        result = pixel_metrics(masks, maps)
    assert all(result[k] is None for k in PIXEL_KEYS)
    assert set(result.reasons) == set(PIXEL_KEYS)
    assert "AUPRO is undefined: the masks hold no anomalous pixel" == result.reasons["aupro"]


def test_pixel_metrics_degenerate_aupro_keeps_the_other_metrics():
    # The map equals the mask: every threshold gives FPR 0, so the FPR cannot be min-max rescaled.
    mask = np.zeros((10, 10), bool)
    mask[2:5, 3:7] = True
    with pytest.warns(UndefinedMetricWarning, match="cannot be rescaled"):
        result = pixel_metrics([mask], [mask.astype(np.float32)])
    assert result["auroc"] == 1.0 and result["ap"] == 1.0 and result["f1_max"] == 1.0
    assert result["aupro"] is None and "cannot be rescaled" in result.reasons["aupro"]


def test_pixel_metrics_constant_maps():
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = True
    with pytest.warns(UndefinedMetricWarning, match="every map value equals 0.5"):
        result = pixel_metrics([mask], [np.full((4, 5), 0.5)])
    assert result["auroc"] == 0.5 and result["aupro"] is None


def test_pixel_metrics_defined_everywhere_issue_no_warning():
    rng = np.random.default_rng(3)
    masks = blob_masks(rng, [(30, 20), (16, 40)], p_anomalous=1.0)
    maps = noisy_maps(rng, masks)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = pixel_metrics(masks, maps)
    assert result.reasons == {} and all(isinstance(result[k], float) for k in PIXEL_KEYS)


@pytest.mark.parametrize(
    ("masks", "maps", "message"),
    [
        ([np.zeros((4, 4))], [np.zeros((4, 5))],
         r"expected map 0 of shape \(4, 4\) like its mask, but got \(4, 5\)"),
        ([np.zeros((4, 4))] * 2, [np.zeros((4, 4))],
         r"expected one map per mask \(2 masks\), but got 1 maps"),
        ([np.full((4, 4), 255, np.uint8)], [np.zeros((4, 4))],
         r"expected mask 0 of 0 \(normal\) or 1 \(anomalous\), or bool, but got values \[255\]; "
         r"threshold 8-bit masks first \(mask > 127\)"),
        (np.zeros((4, 4)), np.zeros((4, 4)),
         r"expected mask 0 to be 2-D \(H, W\), but got shape \(4,\)"),
        ([np.zeros((2, 2))], [np.array([[0.0, np.nan], [0.0, 0.0]])],
         r"expected finite map 0, but got NaN or inf"),
        ([], [], r"expected at least one mask and map, but got none"),
    ],
)
def test_pixel_metrics_input_errors(masks, maps, message):
    with pytest.raises(InputError, match=message):
        pixel_metrics(masks, maps)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"pro_thresholds": 1}, r"expected an integer number of AUPRO thresholds >= 2, but got 1"),
    ({"max_fpr": 0.0}, r"expected max_fpr in \(0, 1\], but got 0.0"),
])
def test_pixel_metrics_argument_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        pixel_metrics([np.eye(3)], [np.eye(3)], **kwargs)


class _LazySequence:
    """Loads item i on demand, like an evaluation that reads masks from disk one at a time."""

    def __init__(self, items):
        self.items, self.loaded = items, 0

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.loaded += 1
        return self.items[i]


def test_pixel_metrics_accept_lazy_sequences_and_generators():
    rng = np.random.default_rng(9)
    masks = blob_masks(rng, [(20, 30), (25, 15), (10, 10)], p_anomalous=1.0)
    maps = noisy_maps(rng, masks)
    lazy_masks, lazy_maps = _LazySequence(masks), _LazySequence(maps)
    expected = pixel_metrics(masks, maps)
    assert pixel_metrics(lazy_masks, lazy_maps) == expected
    assert lazy_masks.loaded == 3 and lazy_maps.loaded == 3
    assert pixel_metrics((m for m in masks), iter(maps)) == expected
