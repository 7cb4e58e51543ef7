"""MVTec AD category: ``DIR/test/<type>/*.png`` with ``DIR/ground_truth/<type>/<stem>_mask.png``.

``good`` images are normal and have no mask (all zero); any other type is defective. A mask
pixel above 127 is defect.
"""

from __future__ import annotations

from pathlib import Path

from musc_edge.core.errors import InputError

from .base import GOOD_TYPE, Dataset, Sample, find_mask, has_mask_files, has_mask_folders, list_images, mask_index

NAME = "mvtec"


def type_dirs(root: Path) -> list[Path]:
    """The ``test/<type>`` folders of a category, sorted; empty when there is no such layout."""
    test_dir = root / "test"
    if not test_dir.is_dir():
        return []
    return sorted(p for p in test_dir.iterdir() if p.is_dir())


def detect(root: Path) -> bool:
    return bool(type_dirs(root))


def collect(root: Path, layout: str, *, gt_mode: str, mask_dir: Path | None, excluded: frozenset[Path],
            mask_for, nonzero: bool) -> Dataset:
    """The MVTec-style walk over ``test/<type>/`` shared with MVTec LOCO AD; ``mask_for(kind,
    stem)`` finds an image's mask."""
    samples: list[Sample] = []
    warnings: list[str] = []
    for type_dir in type_dirs(root):
        if type_dir.resolve() in excluded:
            continue
        kind = type_dir.name
        label = None if gt_mode == "none" else int(kind != GOOD_TYPE)
        for p in list_images(type_dir):
            mask = None
            if mask_for is not None and label == 1:
                mask = mask_for(kind, p.stem)
                if mask is None:
                    warnings.append(f"no mask for defective image {kind}/{p.name}: left out of pixel metrics")
            samples.append(Sample(path=p, rel=f"{kind}/{p.name}", defect_type=kind, label=label, mask_path=mask,
                                  mask_nonzero=nonzero))
    if not samples:
        raise InputError(f"no images (jpg/png/bmp/tiff) in {root / 'test'}/<type>/; "
                         "an MVTec-style category holds test/good/, test/<defect>/ and ground_truth/<defect>/")
    return Dataset(root=root, layout=layout, samples=tuple(samples), warnings=tuple(warnings))


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset()) -> Dataset:
    if gt_mode == "auto":
        mask_dir = root / "ground_truth" if (root / "ground_truth").is_dir() else None
        if mask_dir is not None and has_mask_folders(mask_dir) and not has_mask_files(mask_dir):
            raise InputError(f"{mask_dir} holds a folder of masks per image (<type>/<stem>/000.png), the MVTec "
                             "LOCO AD layout; use --layout loco (or --layout auto)")
    index = mask_index(mask_dir) if mask_dir is not None and gt_mode != "none" else None
    mask_for = None if index is None else (lambda kind, stem: find_mask(index, kind, stem))
    return collect(root, NAME, gt_mode=gt_mode, mask_dir=mask_dir, excluded=excluded, mask_for=mask_for,
                   nonzero=False)
