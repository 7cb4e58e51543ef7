"""Flat folder: the images directly inside DIR (not recursive).

No labels, unless a mask folder is given (``--gt MASKDIR``): then an image with a mask is
defective and one without is good.
"""

from __future__ import annotations

from pathlib import Path

from musc_edge.core.errors import InputError

from .base import Dataset, Sample, find_mask, list_images, mask_index

NAME = "flat"


def detect(root: Path) -> bool:
    """Any folder of images can be read flat: the layout of last resort."""
    return True


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset()) -> Dataset:
    images = [p for p in list_images(root) if p.resolve().parent not in excluded]
    if not images:
        raise InputError(f"no images (jpg/png/bmp/tiff) directly in {root}; pass a folder of images, "
                         "or a data set folder (--layout mvtec|visa|loco|folder)")
    if mask_dir is not None and mask_dir.resolve() == root.resolve():
        # every image would be found as its own mask (``<stem>.png``) and called defective
        raise InputError(f"--gt {mask_dir} is the folder being scored; keep the masks in a folder of their own")
    index = mask_index(mask_dir) if mask_dir is not None else None
    samples = []
    for p in images:
        mask = find_mask(index, None, p.stem) if index is not None else None
        label = (1 if mask is not None else 0) if index is not None else None
        samples.append(Sample(path=p, rel=p.name, label=label, mask_path=mask))
    return Dataset(root=root, layout=NAME, samples=tuple(samples))
