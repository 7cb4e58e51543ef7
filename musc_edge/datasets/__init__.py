"""Dataset layouts: one module per layout, each a function from a root folder to samples.

A layout is registered in :data:`LAYOUTS` with a ``detect(root)`` test and a
``make_dataset(root, ...)`` function; :func:`discover` picks one (``--layout auto``: the first
whose ``detect`` says yes, in the order of :data:`AUTO_ORDER`) or uses the one named. A new
layout is a new module plus one line here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from musc_edge.core.errors import InputError

from . import flat, folder, loco, mvtec, visa
from .base import (GOOD_TYPE, IMAGE_SUFFIXES, ORDERS, Dataset, Sample, grouped_by_type, is_image_name, list_images,
                   order_samples, read_mask, reference_images)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """One dataset layout: its name, how to recognise it, how to read it."""

    name: str
    detect: Callable[[Path], bool]
    make_dataset: Callable[..., Dataset]
    summary: str


LAYOUTS: dict[str, Layout] = {
    m.NAME: Layout(m.NAME, m.detect, m.make_dataset, (m.__doc__ or "").strip().splitlines()[0])
    for m in (flat, mvtec, loco, visa, folder)
}
#: The order ``--layout auto`` tries them in: the most specific first, flat last.
AUTO_ORDER = ("visa", "loco", "mvtec", "flat")


def _gt_mode(gt: str | Path) -> tuple[str, Path | None]:
    text = str(gt)
    mode = text.lower() if text.lower() in ("auto", "none") else "dir"
    mask_dir = Path(text) if mode == "dir" else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise InputError(f"--gt {text}: no such mask folder; use auto, none or a folder of masks")
    return mode, mask_dir


def detect_layout(root: Path) -> str:
    """The name of the layout ``--layout auto`` reads ``root`` with."""
    return next(name for name in AUTO_ORDER if LAYOUTS[name].detect(root))


def discover(root: str | Path, gt: str | Path = "auto", *, layout: str = "auto",
             exclude: Sequence[str | Path] = (), normal_dir: str | Path | None = None,
             abnormal_dir: str | Path | None = None, mask_dir: str | Path | None = None) -> Dataset:
    """Find the images under ``root`` and, per ``gt``, their labels and masks.

    layout: ``auto`` (detected; ``folder`` when ``normal_dir`` is given) or a name of
        :data:`LAYOUTS`.
    gt: ``auto`` (the layout's own ground truth), ``none`` (ignore any ground truth), or a folder
        of masks for a flat folder or an MVTec-style category (``<type>/<stem>_mask.png``,
        ``<stem>_mask.png`` or ``<stem>.png``).
    exclude: folders whose images are left out (our own output folder, ``--reference``).
    normal_dir, abnormal_dir, mask_dir: anomalib's Folder layout (``--layout folder``).
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; pass a folder of images or a data set folder")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; pass a folder of images or a data set folder")
    mode, gt_dir = _gt_mode(gt)
    excluded = frozenset(Path(e).resolve() for e in exclude)
    folder_flags = normal_dir is not None or abnormal_dir is not None or mask_dir is not None
    if layout == "auto":
        # any of the Folder flags names that layout; without --normal-dir it then says what is missing
        layout = "folder" if folder_flags else detect_layout(root)
        log.info("--layout auto: reading %s as %s", root, layout)
    if layout not in LAYOUTS:
        raise InputError(f"--layout {layout!r} is not known; choose one of auto, {', '.join(LAYOUTS)}")
    if layout == "folder":
        if gt_dir is not None:
            raise InputError("--layout folder takes its masks from --mask-dir, not --gt MASKDIR")
        return folder.make_dataset(root, gt_mode=mode, mask_dir=None if mask_dir is None else Path(mask_dir),
                                   excluded=excluded, normal_dir=normal_dir, abnormal_dir=abnormal_dir)
    if folder_flags:
        raise InputError(f"--normal-dir, --abnormal-dir and --mask-dir belong to --layout folder, not {layout}")
    if gt_dir is not None and layout in ("visa", "loco"):
        raise InputError(f"--layout {layout} reads its own masks; --gt takes auto or none there")
    return LAYOUTS[layout].make_dataset(root, gt_mode=mode, mask_dir=gt_dir, excluded=excluded)


__all__ = ["AUTO_ORDER", "GOOD_TYPE", "IMAGE_SUFFIXES", "LAYOUTS", "ORDERS", "Dataset", "Layout", "Sample",
           "detect_layout", "discover", "grouped_by_type", "is_image_name", "list_images", "order_samples",
           "read_mask", "reference_images"]
