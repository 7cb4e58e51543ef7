"""AUPRO against a slow, line-by-line transcription of MUSC_SPEC 6 / the authors' evaluation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import auc

from musc_edge.core.errors import InputError
from musc_edge.core.metrics import UndefinedMetricError, aupro, aupro_thresholds, pixel_metrics

EIGHT_CONNECTED = np.ones((3, 3), int)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def spec_aupro(masks, maps, steps=200, max_fpr=0.3, structure=EIGHT_CONNECTED):
    """MUSC_SPEC 6 written out directly: a loop over thresholds, images and regions."""
    lowest = min(float(m.min()) for m in maps)
    highest = max(float(m.max()) for m in maps)
    delta = (highest - lowest) / steps
    normal_pixels = sum(int((~m).sum()) for m in masks)
    pros, fprs = [], []
    for th in np.arange(lowest, highest, delta):
        overlaps, false_positives = [], 0
        for mask, amap in zip(masks, maps):
            binary = amap > th
            labelled, n_regions = ndimage.label(mask, structure=structure)
            for region in range(1, n_regions + 1):
                inside = labelled == region
                overlaps.append(binary[inside].sum() / inside.sum())
            false_positives += np.logical_and(~mask, binary).sum()
        pros.append(np.mean(overlaps))
        fprs.append(false_positives / normal_pixels)
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < max_fpr
    kept = fprs[keep]
    kept = (kept - kept.min()) / (kept.max() - kept.min())
    return auc(kept, pros[keep])


def random_images(rng, n_images, levels=None, dtype=np.float32):
    masks, maps = [], []
    for _ in range(n_images):
        h, w = int(rng.integers(6, 28)), int(rng.integers(6, 28))
        # Random blobs: smoothed noise over a threshold gives odd shapes with diagonal contacts.
        noise = ndimage.uniform_filter(rng.random((h, w)), size=3)
        mask = noise > np.quantile(noise, rng.uniform(0.75, 1.0))
        amap = rng.normal(size=(h, w)) + rng.uniform(0.5, 3.0) * mask
        if levels is not None:
            amap = np.round(amap * levels) / levels
        masks.append(mask)
        maps.append(amap.astype(dtype))
    if not any(m.any() for m in masks):
        masks[0][0, 0] = True
    return masks, maps


@pytest.mark.parametrize("seed", range(16))
def test_aupro_equals_spec_transcription(seed):
    rng = np.random.default_rng(seed)
    masks, maps = random_images(rng, int(rng.integers(1, 5)), levels=[None, 4, 30, None][seed % 4],
                                dtype=[np.float32, np.float64][seed % 2])
    expected = spec_aupro(masks, maps)
    assert aupro(masks, maps) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert pixel_metrics(masks, maps)["aupro"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize(("steps", "max_fpr"), [(50, 0.3), (200, 0.1), (37, 1.0)])
def test_aupro_other_thresholds_and_fpr_limits(steps, max_fpr):
    masks, maps = random_images(np.random.default_rng(steps), 3)
    expected = spec_aupro(masks, maps, steps=steps, max_fpr=max_fpr)
    assert aupro(masks, maps, thresholds=steps, max_fpr=max_fpr) == pytest.approx(expected, rel=1e-9)


def test_regions_are_eight_connected():
    # Two diagonal chains: one region each with 8-connectivity, many with 4-connectivity.
    mask = np.zeros((12, 12), bool)
    for i in range(5):
        mask[i, i] = True
        mask[11 - i, 2 + i] = True
    mask[8:11, 8:11] = True
    amap = np.random.default_rng(0).normal(size=mask.shape) + np.linspace(0, 3, mask.size).reshape(mask.shape) * mask
    ours = aupro([mask], [amap])
    assert ours == pytest.approx(spec_aupro([mask], [amap]), rel=1e-9)
    # The test can tell the two apart.
    assert abs(ours - spec_aupro([mask], [amap], structure=FOUR_CONNECTED)) > 1e-3


def test_arange_extra_threshold_is_kept_like_the_authors():
    # np.arange(min, max, (max - min) / 200) gives 201 thresholds for some ranges; find one.
    rng = np.random.default_rng(1)
    top = next(t for t in rng.uniform(1, 2, 10_000) if len(np.arange(0.0, t, t / 200)) == 201)
    assert len(aupro_thresholds(0.0, top)) == 201
    masks, maps = random_images(rng, 2, dtype=np.float64)
    maps = [(m - m.min()) for m in maps]
    scale = top / max(m.max() for m in maps)
    maps = [m * scale for m in maps]
    assert min(m.min() for m in maps) == 0.0 and max(m.max() for m in maps) == top
    assert aupro(masks, maps) == pytest.approx(spec_aupro(masks, maps), rel=1e-9)


def test_perfect_and_inverted_maps():
    rng = np.random.default_rng(5)
    masks, _ = random_images(rng, 3)
    # Normal pixels spread below every anomalous pixel: every region is fully found at FPR 0.
    perfect = [np.where(m, 2.0 + rng.random(m.shape), rng.random(m.shape)) for m in masks]
    assert aupro(masks, perfect) == pytest.approx(spec_aupro(masks, perfect))
    assert aupro(masks, perfect) == pytest.approx(1.0, abs=0.02)
    inverted = [np.where(m, rng.random(m.shape), 2.0 + rng.random(m.shape)) for m in masks]
    assert aupro(masks, inverted) == pytest.approx(0.0, abs=1e-12)


def test_aupro_errors_name_the_reason():
    mask = np.zeros((5, 5), bool)
    with pytest.raises(UndefinedMetricError, match="no anomalous pixel"):
        aupro([mask], [np.random.default_rng(0).random((5, 5))])
    with pytest.raises(UndefinedMetricError, match="no normal pixel"):
        aupro([~mask], [np.random.default_rng(0).random((5, 5))])
    mask[2, 2] = True
    # Most normal pixels tied at the top score: no threshold gets below FPR 0.3.
    amap = np.ones((5, 5))
    amap[0, 0] = 0.0
    with pytest.raises(UndefinedMetricError, match=r"no threshold reaches FPR < 0.3"):
        aupro([mask], [amap])
    with pytest.raises(InputError, match=r"expected map 0 of shape \(5, 5\) like its mask, but got \(5, 4\)"):
        aupro([mask], [amap[:, :4]])


def test_fpr_exactly_at_the_limit_is_dropped():
    # Ten normal pixels 0/9 .. 9/9 and two anomalous ones: FPR is exactly 3/10 == 0.3 for a run of
    # thresholds, which the spec's strict "FPR < 0.3" drops.
    row = np.array([[*(np.arange(10) / 9), 0.8, 0.95]])
    mask = np.zeros(row.shape, bool)
    mask[0, 10:] = True
    assert aupro([mask], [row]) == pytest.approx(spec_aupro([mask], [row]), rel=1e-12)
    assert aupro([mask], [row]) != pytest.approx(spec_aupro([mask], [row], max_fpr=0.30000000001), rel=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counts_above_float64_thresholds_compare_exactly(dtype):
    # Thresholds are float64 (as in the authors' np.arange); float32 maps must be compared in
    # float64, not with the threshold rounded to float32.
    from musc_edge.core.metrics import rank_counts

    rng = np.random.default_rng(11)
    scores = np.round(rng.random(2000) * 50).astype(dtype) / dtype(7)
    positive = rng.random(scores.size) < 0.2
    values = scores.astype(np.float64)
    ths = np.concatenate([values[:50], np.nextafter(values[:50], -1.0), np.nextafter(values[:50], 2.0),
                          values[:50] + 1e-12, values[:50] - 1e-12, [-1.0, 0.0, 8.0]])
    above, positives_above = rank_counts(scores, scores[positive]).count_above(ths)
    np.testing.assert_array_equal(above, [(values > t).sum() for t in ths])
    np.testing.assert_array_equal(positives_above, [(values[positive] > t).sum() for t in ths])


def test_real_mtd_masks_of_different_sizes(mtd_dir):
    # Real defect shapes (thin cracks, blowholes) on non-square images of different sizes.
    import cv2

    paths = sorted((mtd_dir / "ground_truth").glob("*/*_mask.png"))[::20][:6]
    assert len(paths) == 6, f"MTD masks not found under {mtd_dir}"
    masks = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 127 for p in paths]
    assert len({m.shape for m in masks}) > 1 and any(m.any() for m in masks)
    rng = np.random.default_rng(0)
    maps = [ndimage.uniform_filter(rng.random(m.shape), 9) + 0.05 * ndimage.uniform_filter(m * 1.0, 5)
            for m in masks]
    assert aupro(masks, maps) == pytest.approx(spec_aupro(masks, maps), rel=1e-9)
