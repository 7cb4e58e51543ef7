"""anomalib's Folder layout: a folder of normal images, one of abnormal ones, one of masks.

``--normal-dir``, ``--abnormal-dir`` and ``--mask-dir`` are relative to the scored root (or
absolute). Normal images are label 0, abnormal ones label 1; an abnormal image's mask is the file of
the mask folder with its stem (``<stem>.png`` or ``<stem>_mask.png``), defect above 127. Never
detected automatically: the folders are named on the command line.
"""

from __future__ import annotations

from pathlib import Path

from musc_edge.core.errors import InputError

from .base import Dataset, Sample, find_mask, list_images, mask_index

NAME = "folder"


def detect(root: Path) -> bool:
    return False


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset(), normal_dir: str | Path | None = None,
                 abnormal_dir: str | Path | None = None) -> Dataset:
    if normal_dir is None:
        raise InputError("--layout folder needs --normal-dir (and usually --abnormal-dir, --mask-dir)")
    samples: list[Sample] = []
    warnings: list[str] = []
    index = None
    if mask_dir is not None and gt_mode != "none":
        if not (root / mask_dir).is_dir():  # else every abnormal image would silently have no mask
            raise InputError(f"--mask-dir {mask_dir}: no such folder under {root}")
        index = mask_index(root / mask_dir)
    for flag, sub, label in (("--normal-dir", normal_dir, 0), ("--abnormal-dir", abnormal_dir, 1)):
        if sub is None:
            continue
        folder = root / sub
        if not folder.is_dir():
            raise InputError(f"{flag} {sub}: no such folder under {root}")
        kind = "good" if label == 0 else folder.name
        for p in list_images(folder):
            if p.resolve().parent in excluded:
                continue
            mask = None
            if index is not None and label == 1:
                mask = find_mask(index, None, p.stem)
                if mask is None:
                    warnings.append(f"no mask for abnormal image {p.name}: left out of pixel metrics")
            samples.append(Sample(path=p, rel=f"{kind}/{p.name}", defect_type=kind,
                                  label=None if gt_mode == "none" else label, mask_path=mask))
    if not samples:
        raise InputError(f"no images in {root / normal_dir}" + (f" or {root / abnormal_dir}" if abnormal_dir else ""))
    return Dataset(root=root, layout=NAME, samples=tuple(samples), warnings=tuple(warnings))
