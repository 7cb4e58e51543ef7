"""``read_mask``: the decoding rules every layout shares."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import ImageDecodeError
from musc_edge.datasets import read_mask

cv2 = pytest.importorskip("cv2")


def test_colour_mask_with_alpha_is_not_all_defect(tmp_path):
    m = np.zeros((8, 8, 4), np.uint8)
    m[..., 3] = 255  # opaque everywhere
    m[2:4, 2:4, :3] = 255
    assert cv2.imwrite(str(tmp_path / "rgba.png"), m)
    got = read_mask(tmp_path / "rgba.png")
    assert got.sum() == 4 and got[2:4, 2:4].all()
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[0, 0, 2] = 200  # a red pixel: defect where any channel is
    assert cv2.imwrite(str(tmp_path / "rgb.png"), rgb)
    assert read_mask(tmp_path / "rgb.png").sum() == 1


def test_16_bit_masks(tmp_path):
    m = np.zeros((6, 6), np.uint16)
    m[0, 0], m[1, 1], m[2, 2] = 65535, 3, 300
    assert cv2.imwrite(str(tmp_path / "m16.png"), m)
    assert read_mask(tmp_path / "m16.png").sum() == 1  # a 0/65535 mask: > 127 on the 8-bit scale (65535 only)
    assert read_mask(tmp_path / "m16.png", nonzero=True).sum() == 3  # any nonzero value, small ones too


def test_resize_and_unreadable(tmp_path):
    m = np.zeros((4, 4), np.uint8)
    m[:2, :2] = 255
    assert cv2.imwrite(str(tmp_path / "m.png"), m)
    big = read_mask(tmp_path / "m.png", (8, 8))
    assert big.shape == (8, 8) and big.sum() == 16
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ImageDecodeError, match="not a readable mask"):
        read_mask(tmp_path / "bad.png")
    with pytest.raises(ImageDecodeError, match="cannot read mask"):
        read_mask(tmp_path / "missing.png")
