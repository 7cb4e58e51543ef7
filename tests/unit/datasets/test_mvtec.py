"""MVTec AD category layout: test/<type>/ with ground_truth/<type>/<stem>_mask.png."""

from __future__ import annotations

import shutil

import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import discover, read_mask


def test_mvtec_category(build):
    cat = build.mvtec(n_good=2, defects=("crack", "hole"), n_each=2)
    ds = discover(cat)
    assert ds.layout == "mvtec" and ds.has_labels and not ds.warnings
    assert [s.rel for s in ds.samples] == ["crack/000.png", "crack/001.png", "good/000.png", "good/001.png",
                                           "hole/000.png", "hole/001.png"]
    by_rel = {s.rel: s for s in ds.samples}
    assert by_rel["good/000.png"].label == 0 and by_rel["good/000.png"].mask_path is None
    hole = by_rel["hole/001.png"]
    assert hole.label == 1 and hole.defect_type == "hole" and not hole.mask_nonzero
    assert hole.mask_path == cat / "ground_truth" / "hole" / "001_mask.png"  # same stem in crack/: its own type
    assert read_mask(hole.mask_path).sum() == 4 * 6


def test_mvtec_threshold_is_above_127(build, tmp_path):
    path = build.mask(tmp_path / "m.png", boxes=((0, 2, 0, 2), (5, 7, 5, 7)), value=100)
    assert not read_mask(path).any()  # MVTec AD: 0/255, a pixel of 100 is not defect
    assert read_mask(path, nonzero=True).sum() == 8


def test_mvtec_missing_mask_is_a_warning(build):
    cat = build.mvtec(n_each=2)
    (cat / "ground_truth" / "crack" / "001_mask.png").unlink()
    ds = discover(cat)
    missing = [s for s in ds.samples if s.label == 1 and s.mask_path is None]
    assert [s.rel for s in missing] == ["crack/001.png"] and not missing[0].has_mask_truth
    assert any("crack/001.png" in w for w in ds.warnings)


def test_mvtec_without_ground_truth_folder_and_gt_none(build):
    cat = build.mvtec()
    labels = [s.label for s in discover(cat, "none").samples]
    assert labels == [None] * len(labels)
    shutil.rmtree(cat / "ground_truth")
    ds = discover(cat, layout="mvtec")
    assert ds.has_labels and all(s.mask_path is None for s in ds.samples) and not ds.warnings


def test_mvtec_with_a_mask_folder_elsewhere(build, tmp_path):
    cat = build.mvtec(n_each=1)
    other = tmp_path / "my_masks"
    build.mask(other / "crack" / "000_mask.png", boxes=((0, 1, 0, 1),))
    ds = discover(cat, other)
    crack = next(s for s in ds.samples if s.label == 1)
    assert crack.mask_path == other / "crack" / "000_mask.png"


def test_mvtec_explicit_on_wrong_folders(build):
    with pytest.raises(InputError, match="test/<type>/"):
        discover(build.flat(), layout="mvtec")
    with pytest.raises(InputError, match="use --layout loco"):
        discover(build.loco(), layout="mvtec")


def test_mvtec_leaves_out_the_output_folder(build):
    cat = build.mvtec(n_good=2)
    out = cat / "test" / "out"
    build.image(out / "stray.png")
    rels = [s.rel for s in discover(cat, exclude=[out]).samples]
    assert not any(r.startswith("out/") for r in rels) and len(rels) == 4
    assert "out/stray.png" in [s.rel for s in discover(cat).samples]  # without the exclusion it is a "type"
