"""MVTec LOCO AD category: ``test/<type>/<stem>.png`` with a folder of masks per defective image,
``ground_truth/<type>/<stem>/000.png, 001.png, ...`` (one per defect region).

The image's defect is the union of its masks, and any nonzero pixel is defect (LOCO's masks carry
region values, not 0/255). Told apart from MVTec AD by those per-image mask folders.
"""

from __future__ import annotations

from pathlib import Path

from musc_edge.core.errors import InputError

from .base import Dataset, has_mask_files, has_mask_folders
from .mvtec import collect, type_dirs

NAME = "loco"


def detect(root: Path) -> bool:
    gt = root / "ground_truth"
    return bool(type_dirs(root)) and has_mask_folders(gt) and not has_mask_files(gt)


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset()) -> Dataset:
    if gt_mode == "auto":
        mask_dir = root / "ground_truth"
        if has_mask_files(mask_dir) and not has_mask_folders(mask_dir):
            raise InputError(f"{mask_dir} holds mask files (<type>/<stem>_mask.png), the MVTec AD layout, not "
                             "MVTec LOCO AD's folder of masks per image (<type>/<stem>/000.png); use --layout mvtec")
    mask_for = None
    if mask_dir is not None and gt_mode != "none":
        def mask_for(kind: str, stem: str) -> Path | None:
            folder = mask_dir / kind / stem
            return folder if folder.is_dir() else None
    return collect(root, NAME, gt_mode=gt_mode, mask_dir=mask_dir, excluded=excluded, mask_for=mask_for,
                   nonzero=True)
