"""VisA layout: one object's test split as split_csv/1cls.csv lists it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import detect_layout, discover, read_mask


def test_visa_object_folder(build):
    visa = build.visa(objects=("candle", "capsules"), n_train=2, n_normal=3, n_anomaly=2)
    ds = discover(visa / "candle")
    assert ds.layout == "visa" and ds.has_labels and not ds.warnings
    assert all(s.path.is_relative_to(visa / "candle") for s in ds.samples)  # capsules not in the pool
    assert not any("train_" in s.path.name for s in ds.samples)  # only split=test is scored
    assert [s.rel for s in ds.samples] == ["good/0000.JPG", "good/0001.JPG", "good/0002.JPG", "bad/000.JPG",
                                           "bad/001.JPG"]
    assert [s.label for s in ds.samples] == [0, 0, 0, 1, 1]
    bad = ds.samples[3]
    assert bad.mask_path == visa / "candle" / "Data" / "Masks" / "Anomaly" / "000.png" and bad.mask_nonzero
    assert ds.samples[0].mask_path is None and ds.samples[0].has_mask_truth


@pytest.mark.parametrize("value", [1, 255])
def test_visa_masks_with_any_nonzero_defect_value(build, value):
    visa = build.visa(mask_value=value)
    bad = next(s for s in discover(visa / "candle").samples if s.label == 1)
    m = read_mask(bad.mask_path, nonzero=bad.mask_nonzero)
    assert m.sum() == 4 * 6 and m[2:6, 3:9].all()


def test_visa_root_with_one_object(build):
    visa = build.visa(objects=("pcb1",))
    ds = discover(visa)
    assert ds.layout == "visa" and len(ds.samples) == 5


def test_visa_root_with_two_objects_names_them(build):
    visa = build.visa(objects=("candle", "capsules"))
    with pytest.raises(InputError) as e:
        discover(visa)
    msg = str(e.value)
    assert "lists 2 objects (candle, capsules)" in msg and "one object at a time" in msg
    assert str(visa / "candle") in msg and "..." not in msg


def test_visa_unknown_object_lists_the_objects(build):
    visa = build.visa(objects=("candle", "capsules"))
    (visa / "fryum").mkdir()
    with pytest.raises(InputError, match="no images of 'fryum'; its objects are candle, capsules"):
        discover(visa / "fryum")


def test_visa_relative_object_folder(build, monkeypatch):
    visa = build.visa()
    monkeypatch.chdir(visa / "candle")
    assert detect_layout(Path(".")) == "visa"
    ds = discover(".")
    assert ds.layout == "visa" and len(ds.samples) == 5 and all(s.path.is_file() for s in ds.samples)


def test_visa_csv_with_a_byte_order_mark_and_mixed_case(build):
    visa = build.visa(n_normal=1, n_anomaly=0)
    build.csv(visa, [("candle", "TEST", "Normal", "candle/Data/Images/Normal/0000.JPG", "")], encoding="utf-8-sig")
    ds = discover(visa / "candle")
    assert [(s.rel, s.label) for s in ds.samples] == [("good/0000.JPG", 0)]


def test_visa_csv_errors(build):
    visa = build.visa()
    build.csv(visa, [("candle", "test", "defect", "candle/Data/Images/Anomaly/000.JPG", "")])
    with pytest.raises(InputError, match=r"1cls.csv:2: label 'defect'.*expected normal or anomaly"):
        discover(visa / "candle")
    build.csv(visa, [("candle", "test", "normal")], header=("object", "split", "label"))
    with pytest.raises(InputError, match="expected the columns image, label, mask, object, split"):
        discover(visa / "candle")
    build.csv(visa, [])
    with pytest.raises(InputError, match="lists no images"):
        discover(visa / "candle")
    build.csv(visa, [("candle", "train", "normal", "candle/Data/Images/Normal/train_0000.JPG", "")])
    with pytest.raises(InputError, match="no test images of 'candle'"):
        discover(visa / "candle")


def test_visa_missing_files_and_duplicates_are_warnings(build):
    visa = build.visa(n_normal=2, n_anomaly=2)
    (visa / "candle" / "Data" / "Images" / "Normal" / "0001.JPG").unlink()
    (visa / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    csv_path = visa / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text() + "candle,test,normal,candle/Data/Images/Normal/0000.JPG,\n")
    ds = discover(visa / "candle")
    assert [s.rel for s in ds.samples] == ["good/0000.JPG", "bad/000.JPG", "bad/001.JPG"]
    assert ds.samples[2].mask_path is None
    text = "\n".join(ds.warnings)
    assert "0001.JPG is listed in" in text and "no mask for defective image" in text and "listed twice" in text


def test_visa_same_name_in_two_folders_keeps_outputs_apart(build):
    visa = build.visa(n_normal=0, n_anomaly=0)
    rows = []
    for sub in ("a", "b"):
        build.image(visa / "candle" / sub / "0000.JPG")
        rows.append(("candle", "test", "normal", f"candle/{sub}/0000.JPG", ""))
    build.csv(visa, rows)
    rels = [s.rel for s in discover(visa / "candle").samples]
    assert rels == ["good/candle/a/0000.JPG", "good/candle/b/0000.JPG"]


def test_visa_gt_flags(build, tmp_path):
    visa = build.visa()
    assert all(s.label is None and s.mask_path is None for s in discover(visa / "candle", "none").samples)
    masks = tmp_path / "masks"
    masks.mkdir()
    with pytest.raises(InputError, match="--layout visa reads its own masks"):
        discover(visa / "candle", masks)
    with pytest.raises(InputError, match="not a VisA object folder"):
        discover(build.flat(), layout="visa")
    assert np.array([s.label for s in discover(visa / "candle").samples]).sum() == 2
