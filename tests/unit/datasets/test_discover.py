"""``discover``: --layout auto picks the right layout; wrong or mixed flags are clear errors."""

from __future__ import annotations

import pytest

from musc_edge.core.errors import InputError
from musc_edge.datasets import AUTO_ORDER, LAYOUTS, detect_layout, discover


@pytest.mark.parametrize("kind, expected", [("flat", "flat"), ("mvtec", "mvtec"), ("loco", "loco"),
                                            ("visa_object", "visa"), ("visa_root", "visa")])
def test_auto_picks_the_layout(build, kind, expected):
    root = {"flat": lambda: build.flat(), "mvtec": lambda: build.mvtec(), "loco": lambda: build.loco(),
            "visa_object": lambda: build.visa() / "candle", "visa_root": lambda: build.visa()}[kind]()
    assert detect_layout(root) == expected
    assert discover(root).layout == expected
    assert discover(root, layout=expected).layout == expected


def test_registry():
    assert set(LAYOUTS) == {"flat", "mvtec", "loco", "visa", "folder"}
    assert AUTO_ORDER[-1] == "flat" and "folder" not in AUTO_ORDER  # folder only by its flags
    assert all(layout.summary for layout in LAYOUTS.values())


def test_an_mvtec_category_with_a_stray_folder_in_ground_truth_stays_mvtec(build):
    cat = build.mvtec()
    (cat / "ground_truth" / "crack" / "old").mkdir()
    assert detect_layout(cat) == "mvtec"


@pytest.mark.parametrize("kind, layout, match", [
    ("flat", "mvtec", "test/<type>/"),
    ("flat", "loco", "test/<type>/"),
    ("flat", "visa", "not a VisA object folder"),
    ("mvtec", "flat", "no images"),
    ("mvtec", "loco", "use --layout mvtec"),
    ("loco", "mvtec", "use --layout loco"),
    ("visa", "flat", "no images"),
    ("visa", "mvtec", "test/<type>/"),
    ("flat", "yolo", "--layout 'yolo' is not known"),
])
def test_a_wrong_explicit_layout_is_a_clear_error(build, kind, layout, match):
    makers = {"flat": build.flat, "mvtec": build.mvtec, "loco": build.loco, "visa": lambda: build.visa() / "candle"}
    root = makers[kind]()
    with pytest.raises(InputError, match=match):
        discover(root, layout=layout)


@pytest.mark.parametrize("kwargs, match", [
    ({"layout": "flat", "mask_dir": "masks"}, "belong to --layout folder, not flat"),
    ({"layout": "visa", "normal_dir": "good"}, "belong to --layout folder, not visa"),
    ({"abnormal_dir": "bad"}, "needs --normal-dir"),
    ({"layout": "folder", "normal_dir": "good", "gt": "MASKS"}, "takes its masks from --mask-dir"),
])
def test_mixed_flags_are_a_clear_error(build, tmp_path, kwargs, match):
    root = build.folder()
    if kwargs.get("gt") == "MASKS":
        kwargs = {**kwargs, "gt": root / "masks"}
    with pytest.raises(InputError, match=match):
        discover(root, **kwargs)
