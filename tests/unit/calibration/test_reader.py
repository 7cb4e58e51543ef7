"""Image splitting and the ONNX Runtime calibration reader (calibration/reader.py)."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.calibration.reader import MIN_CALIBRATION_IMAGES, ImageFolderReader, split_images
from musc_edge.core.errors import InputError
from musc_edge.runtime.preprocess import load_input
from musc_edge.runtime.testing import tiny_meta

from .conftest import copy_images


def test_split_is_disjoint_deterministic_and_calibrates_on_good_images(sample_dir):
    a = split_images(sample_dir, 8, holdout=6, seed=0)
    b = split_images(sample_dir, 8, holdout=6, seed=0)
    assert a.calibration == b.calibration and a.heldout == b.heldout
    assert len(a.calibration) == 8 and len(a.heldout) == 6
    assert not set(a.calibration) & set(a.evaluation)
    assert set(a.heldout) <= set(a.evaluation)
    assert len(a.calibration) + len(a.evaluation) == 40
    labels = {s.path: s.label for s in a.dataset.samples}
    assert all(labels[p] == 0 for p in a.calibration)  # defects stay for the evaluation
    assert sum(labels[p] for p in a.evaluation) == 11
    assert split_images(sample_dir, 8, holdout=6, seed=1).calibration != a.calibration


def test_flat_folder(tmp_path, sample_dir):
    folder = copy_images(sample_dir, tmp_path / "flat", 12)
    split = split_images(folder, 6, holdout=4)
    assert len(split.calibration) == 6 and len(split.heldout) == 4 and len(split.evaluation) == 6
    assert split.dataset.layout == "flat"


def test_empty_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty"):
        split_images(tmp_path / "empty", 8)


def test_too_few_images_names_the_fix(tmp_path, sample_dir):
    folder = copy_images(sample_dir, tmp_path / "few", 7)
    with pytest.raises(InputError, match=r"has 7 images, too few for --num 8.*--num 5"):
        split_images(folder, 8)
    with pytest.raises(InputError, match="too few calibration images"):
        split_images(folder, MIN_CALIBRATION_IMAGES - 1)


def test_missing_folder(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        split_images(tmp_path / "nope", 8)


def test_reader_batches_match_runtime_preprocessing(sample_dir):
    meta = tiny_meta(image_size=64)
    paths = sorted((sample_dir / "test" / "good").glob("*.jpg"))[:5]
    reader = ImageFolderReader(paths, meta, batch_size=2)
    feeds = []
    while (feed := reader.get_next()) is not None:
        feeds.append(feed)
    assert [f[meta.input_name].shape[0] for f in feeds] == [2, 2, 1]
    first = feeds[0][meta.input_name][0]
    np.testing.assert_array_equal(first, load_input(paths[0], meta)[0])
    assert reader.used == paths
    reader.rewind()
    assert reader.get_next()[meta.input_name].shape == (2, 3, 64, 64)


def test_reader_skips_unreadable_files_and_refuses_too_few(tmp_path, sample_dir):
    meta = tiny_meta(image_size=64)
    good = sorted((sample_dir / "test" / "good").glob("*.jpg"))[:3]
    bad = []
    for i in range(3):
        p = tmp_path / f"broken{i}.jpg"
        p.write_bytes(b"\xff\xd8\xff not really a jpeg")
        bad.append(p)
    (tmp_path / "empty.png").write_bytes(b"")
    reader = ImageFolderReader(good + bad + [tmp_path / "empty.png"], meta, batch_size=4)
    assert reader.get_next()[meta.input_name].shape[0] == 3  # the broken ones skipped
    with pytest.raises(InputError, match="only 3 of 7 calibration images could be read"):
        reader.get_next()
