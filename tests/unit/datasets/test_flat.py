"""Flat folder layout: the images directly in DIR, labelled only with ``--gt MASKDIR``."""

from __future__ import annotations

import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import discover, read_mask


def test_flat_folder_without_ground_truth(build):
    folder = build.flat(n=3)
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"x")
    build.image(folder / "sub" / "deeper.png")  # not recursive
    ds = discover(folder)
    assert ds.layout == "flat"
    assert [s.rel for s in ds.samples] == ["000.png", "001.png", "002.png"]
    assert all(s.label is None and s.mask_path is None and s.defect_type is None for s in ds.samples)
    assert not ds.has_labels


def test_flat_folder_with_a_mask_folder(build, tmp_path):
    folder = build.flat(n=4)
    masks = tmp_path / "masks"
    build.mask(masks / "001_mask.png")
    build.mask(masks / "003.png", boxes=((0, 5, 0, 5),))
    ds = discover(folder, masks)
    assert ds.layout == "flat" and ds.has_labels
    by_rel = {s.rel: s for s in ds.samples}
    assert [by_rel[k].label for k in ("000.png", "001.png", "002.png", "003.png")] == [0, 1, 0, 1]
    assert by_rel["001.png"].mask_path == masks / "001_mask.png"
    assert by_rel["003.png"].mask_path == masks / "003.png"
    assert by_rel["000.png"].mask_path is None and by_rel["000.png"].has_mask_truth  # good: all zero
    m = read_mask(by_rel["003.png"].mask_path)
    assert m.dtype == bool and m.shape == (20, 24) and m.sum() == 25


def test_flat_gt_none_and_explicit_layout(build, tmp_path):
    folder = build.flat(n=2)
    masks = tmp_path / "masks"
    build.mask(masks / "000_mask.png")
    assert discover(folder, "none").samples[0].label is None
    assert discover(folder, masks, layout="flat").samples[0].label == 1


def test_flat_mask_folder_errors(build, tmp_path):
    folder = build.flat(n=2)
    with pytest.raises(InputError, match="no such mask folder"):
        discover(folder, tmp_path / "nowhere")
    with pytest.raises(InputError, match="is the folder being scored"):
        discover(folder, folder)  # every image would be its own mask


def test_flat_excluded_folder_and_empty_folder(build, tmp_path):
    folder = build.flat(n=2)
    with pytest.raises(InputError, match="no images"):
        discover(folder, exclude=[folder])  # the excluded folder's images are left out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no images"):
        discover(empty)
    with pytest.raises(InputError, match="does not exist"):
        discover(tmp_path / "missing")
    with pytest.raises(InputError, match="is not a folder"):
        discover(folder / "000.png")
    assert all(s.path.parent == folder for s in discover(folder).samples)
