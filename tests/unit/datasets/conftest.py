"""Tiny data sets of real image files, one builder per layout (musc_edge.datasets)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")


class Build:
    """Writes small PNG images, masks and data set folders under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.rng = np.random.default_rng(0)

    def image(self, path: Path, shape: tuple[int, int] = (20, 24)) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), self.rng.integers(0, 255, shape, dtype=np.uint8))
        return path

    def mask(self, path: Path, shape: tuple[int, int] = (20, 24), boxes=((2, 6, 3, 9),), value: int = 255,
             dtype=np.uint8) -> Path:
        """A mask with ``value`` in each box (y0, y1, x0, x1), 0 elsewhere."""
        m = np.zeros(shape, dtype)
        for y0, y1, x0, x1 in boxes:
            m[y0:y1, x0:x1] = value
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), m)
        return path

    def flat(self, name: str = "flat", n: int = 4) -> Path:
        folder = self.root / name
        for i in range(n):
            self.image(folder / f"{i:03d}.png")
        return folder

    def mvtec(self, name: str = "cat", n_good: int = 3, defects=("crack",), n_each: int = 2) -> Path:
        """test/good/, test/<defect>/ and ground_truth/<defect>/<stem>_mask.png."""
        cat = self.root / name
        for i in range(n_good):
            self.image(cat / "test" / "good" / f"{i:03d}.png")
        for d in defects:
            for i in range(n_each):
                self.image(cat / "test" / d / f"{i:03d}.png")
                self.mask(cat / "ground_truth" / d / f"{i:03d}_mask.png")
        return cat

    def loco(self, name: str = "breakfast_box", n_good: int = 3, n_each: int = 2) -> Path:
        """MVTec LOCO AD: ground_truth/<type>/<stem>/000.png, 001.png (two regions, two values)."""
        cat = self.root / name
        for i in range(n_good):
            self.image(cat / "test" / "good" / f"{i:03d}.png")
        for kind in ("logical_anomalies", "structural_anomalies"):
            for i in range(n_each):
                self.image(cat / "test" / kind / f"{i:03d}.png")
                self.mask(cat / "ground_truth" / kind / f"{i:03d}" / "000.png", boxes=((1, 4, 1, 4),), value=7)
                self.mask(cat / "ground_truth" / kind / f"{i:03d}" / "001.png", boxes=((10, 15, 12, 20),), value=1)
        (cat / "train" / "good").mkdir(parents=True)
        return cat

    def visa(self, objects=("candle",), n_train: int = 2, n_normal: int = 3, n_anomaly: int = 2,
             mask_value: int = 255, encoding: str = "utf-8") -> Path:
        """VisA root: <object>/Data/{Images,Masks}/..., split_csv/1cls.csv with paths relative to the root."""
        visa = self.root / "VisA"
        rows = []
        for obj in objects:
            for i in range(n_train):
                rel = f"{obj}/Data/Images/Normal/train_{i:04d}.JPG"
                self.image(visa / rel)
                rows.append((obj, "train", "normal", rel, ""))
            for i in range(n_normal):
                rel = f"{obj}/Data/Images/Normal/{i:04d}.JPG"
                self.image(visa / rel)
                rows.append((obj, "test", "normal", rel, ""))
            for i in range(n_anomaly):
                rel, mrel = f"{obj}/Data/Images/Anomaly/{i:03d}.JPG", f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
                self.image(visa / rel)
                self.mask(visa / mrel, value=mask_value)
                rows.append((obj, "test", "anomaly", rel, mrel))
        self.csv(visa, rows, encoding=encoding)
        return visa

    def csv(self, visa: Path, rows, header=("object", "split", "label", "image", "mask"),
            encoding: str = "utf-8") -> Path:
        path = visa / "split_csv" / "1cls.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding=encoding) as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
        return path

    def folder(self, name: str = "line", n_good: int = 3, n_bad: int = 2) -> Path:
        """anomalib Folder: good/, bad/ and masks/<stem>.png."""
        root = self.root / name
        for i in range(n_good):
            self.image(root / "good" / f"g{i}.png")
        for i in range(n_bad):
            self.image(root / "bad" / f"b{i}.png")
            self.mask(root / "masks" / f"b{i}.png")
        return root


@pytest.fixture()
def build(tmp_path: Path) -> Build:
    return Build(tmp_path)
