"""anomalib's Folder layout: --normal-dir, --abnormal-dir, --mask-dir."""

from __future__ import annotations

import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import discover, read_mask


def test_folder_layout(build):
    root = build.folder(n_good=3, n_bad=2)
    for layout in ("folder", "auto"):  # --normal-dir names the layout under auto
        ds = discover(root, layout=layout, normal_dir="good", abnormal_dir="bad", mask_dir="masks")
        assert ds.layout == "folder" and ds.has_labels and not ds.warnings
        assert [(s.rel, s.label) for s in ds.samples] == [("good/g0.png", 0), ("good/g1.png", 0), ("good/g2.png", 0),
                                                          ("bad/b0.png", 1), ("bad/b1.png", 1)]
        b1 = ds.samples[-1]
        assert b1.mask_path == root / "masks" / "b1.png" and not b1.mask_nonzero
        assert read_mask(b1.mask_path).sum() == 4 * 6


def test_folder_layout_with_absolute_folders_and_mask_suffix(build, tmp_path):
    root = build.folder(n_bad=1)
    (root / "masks" / "b0.png").rename(root / "masks" / "b0_mask.png")
    ds = discover(root, normal_dir=root / "good", abnormal_dir=str(root / "bad"), mask_dir=root / "masks")
    assert ds.samples[-1].mask_path == root / "masks" / "b0_mask.png"


def test_folder_layout_missing_masks_and_normal_only(build):
    root = build.folder(n_bad=2)
    (root / "masks" / "b1.png").unlink()
    ds = discover(root, normal_dir="good", abnormal_dir="bad", mask_dir="masks")
    assert ds.samples[-1].mask_path is None and any("b1.png" in w for w in ds.warnings)
    only_good = discover(root, normal_dir="good")
    assert [s.label for s in only_good.samples] == [0, 0, 0]
    assert all(s.label is None for s in discover(root, "none", normal_dir="good", abnormal_dir="bad").samples)


def test_folder_layout_errors(build, tmp_path):
    root = build.folder()
    with pytest.raises(InputError, match="needs --normal-dir"):
        discover(root, layout="folder")
    with pytest.raises(InputError, match="needs --normal-dir"):
        discover(root, abnormal_dir="bad")  # auto: a Folder flag names the layout
    with pytest.raises(InputError, match="--normal-dir nope: no such folder"):
        discover(root, normal_dir="nope")
    with pytest.raises(InputError, match="--mask-dir nomasks: no such folder"):
        discover(root, normal_dir="good", abnormal_dir="bad", mask_dir="nomasks")
    with pytest.raises(InputError, match="takes its masks from --mask-dir"):
        discover(root, root / "masks", normal_dir="good")
    with pytest.raises(InputError, match="belong to --layout folder, not mvtec"):
        discover(build.mvtec(), layout="mvtec", normal_dir="good")
    (tmp_path / "line" / "empty").mkdir()
    with pytest.raises(InputError, match="no images in"):
        discover(root, normal_dir="empty")
