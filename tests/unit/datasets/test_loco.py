"""MVTec LOCO AD layout: a folder of masks per defective image, their union, any nonzero pixel."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from musc_edge.core.errors import ImageDecodeError, InputError
from musc_edge.datasets import discover, read_mask


def test_loco_category(build):
    cat = build.loco(n_good=2, n_each=2)
    ds = discover(cat)
    assert ds.layout == "loco" and ds.has_labels and not ds.warnings
    by_rel = {s.rel: s for s in ds.samples}
    assert len(ds.samples) == 6
    assert by_rel["good/000.png"].label == 0 and by_rel["good/000.png"].mask_path is None
    logical = by_rel["logical_anomalies/001.png"]
    assert logical.label == 1 and logical.mask_nonzero
    assert logical.mask_path == cat / "ground_truth" / "logical_anomalies" / "001"  # the folder
    assert discover(cat, layout="loco").samples == ds.samples


def test_loco_mask_is_the_union_of_its_regions(build):
    """Two regions, values 7 and 1 (not 0/255): both are defect, nothing else is."""
    cat = build.loco(n_each=1)
    folder = cat / "ground_truth" / "structural_anomalies" / "000"
    (folder / "._000.png").write_bytes(b"\x00\x05AppleDouble")  # macOS debris, not a mask
    (folder / "notes.txt").write_text("not a mask")
    m = read_mask(folder, nonzero=True)
    expected = np.zeros((20, 24), bool)
    expected[1:4, 1:4] = True
    expected[10:15, 12:20] = True
    np.testing.assert_array_equal(m, expected)
    assert read_mask(folder / "001.png", nonzero=True).sum() == 5 * 8  # value 1: defect with nonzero
    assert not read_mask(folder).any()  # the 0/255 rule would see nothing in LOCO's masks
    big = read_mask(folder, (40, 48), nonzero=True)  # resized to the image (nearest)
    assert big.shape == (40, 48) and big.sum() == 4 * expected.sum()


def test_loco_mask_folder_errors(build, tmp_path):
    empty = tmp_path / "empty_masks"
    empty.mkdir()
    with pytest.raises(ImageDecodeError, match="no mask images"):
        read_mask(empty, nonzero=True)
    mixed = tmp_path / "mixed"
    build.mask(mixed / "000.png", shape=(10, 10))
    build.mask(mixed / "001.png", shape=(12, 10))
    with pytest.raises(ImageDecodeError, match="differ in size"):
        read_mask(mixed, nonzero=True)
    assert read_mask(mixed, (10, 10), nonzero=True).shape == (10, 10)


def test_loco_missing_mask_folder_is_a_warning(build):
    cat = build.loco(n_each=1)
    shutil.rmtree(cat / "ground_truth" / "logical_anomalies" / "000")
    ds = discover(cat)
    assert ds.layout == "loco"
    assert any("logical_anomalies/000.png" in w for w in ds.warnings)


def test_loco_explicit_on_an_mvtec_category_and_gt_flags(build, tmp_path):
    with pytest.raises(InputError, match="use --layout mvtec"):
        discover(build.mvtec(), layout="loco")
    cat = build.loco()
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(InputError, match="--layout loco reads its own masks"):
        discover(cat, masks)
    assert all(s.label is None and s.mask_path is None for s in discover(cat, "none").samples)
