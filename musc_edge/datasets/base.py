"""What every dataset layout returns: samples (path, label, mask) and the shared file rules.

A layout module (``flat``, ``mvtec``, ``visa``, ``loco``, ``folder``) is a function from a root
folder to a :class:`Dataset`; this module holds what they share: which files are images, how a
mask is read, and the listing orders a stream can be fed in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from musc_edge.core.errors import ImageDecodeError, InputError

#: File name suffixes of images we read (lower case). ``.gif`` is listed so that a GIF is found,
#: counted and skipped with its reason by the decoder (it reads no GIF), never ignored in silence.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif")
GOOD_TYPE = "good"
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def is_image_name(path: str | Path) -> bool:
    """True for a visible file whose suffix is one we read."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_images(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (not recursive)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p))


def reference_images(folder: str | Path) -> list[Path]:
    """The known-good images of a ``--reference`` folder; InputError when there are none."""
    if not Path(folder).is_dir():
        raise InputError(f"--reference folder not found: {folder}")
    paths = list_images(folder)
    if not paths:
        raise InputError(f"--reference {folder} holds no images (jpg, png, bmp, tif)")
    return paths


@dataclass(frozen=True)
class Sample:
    """One image to score.

    rel: its path relative to the scored root, POSIX style (names output files).
    defect_type: the defect class folder (None where the layout has none).
    label: 0 normal, 1 defective, None unknown.
    mask_path: its ground-truth mask: a file, or (MVTec LOCO AD) a folder of masks whose union is
        the defect; None for good images (all zero) and where none exists.
    mask_nonzero: the mask's defect pixels are every nonzero pixel (VisA, LOCO) instead of > 127
        (MVTec AD's 0/255 masks).
    """

    path: Path
    rel: str
    defect_type: str | None = None
    label: int | None = None
    mask_path: Path | None = None
    mask_nonzero: bool = False

    @property
    def has_mask_truth(self) -> bool:
        """True when this image's pixel truth is known: a mask file, or a good image (all zero)."""
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class Dataset:
    """A folder of images found by a layout, with what it knows about ground truth."""

    root: Path
    layout: str  #: the registry name of the layout that read it ("flat", "mvtec", ...)
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...] = ()

    @property
    def has_labels(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)


def mask_index(mask_dir: Path) -> dict[tuple[str, str], Path]:
    """(parent folder relative to mask_dir, file stem) -> path, for every mask-like file."""
    index: dict[tuple[str, str], Path] = {}
    for dirpath, _, files in os.walk(mask_dir):
        rel_parent = Path(dirpath).relative_to(mask_dir).as_posix()
        for name in sorted(files):
            p = Path(dirpath) / name
            if p.suffix.lower() in MASK_SUFFIXES:
                index.setdefault((rel_parent, p.stem), p)
    return index


def _type_children(gt: Path) -> list[Path]:
    """What the ``<type>/`` folders of a ground-truth folder hold (visible entries only)."""
    if not gt.is_dir():
        return []
    return [child for kind in sorted(gt.iterdir()) if kind.is_dir() and not kind.name.startswith(".")
            for child in sorted(kind.iterdir()) if not child.name.startswith(".")]


def has_mask_folders(gt: Path) -> bool:
    """True when ``gt/<type>/`` holds a folder of masks per image (MVTec LOCO AD: ``<type>/<stem>/000.png``)."""
    return any(child.is_dir() for child in _type_children(gt))


def has_mask_files(gt: Path) -> bool:
    """True when ``gt/<type>/`` holds mask image files (MVTec AD: ``<type>/<stem>_mask.png``)."""
    return any(child.is_file() and child.suffix.lower() in MASK_SUFFIXES for child in _type_children(gt))


def find_mask(index: dict[tuple[str, str], Path], kind: str | None, stem: str) -> Path | None:
    """The mask of image ``stem`` (of defect class ``kind``): ``<kind>/<stem>_mask``, ``<stem>``..."""
    parents = ([kind] if kind else []) + ["."]
    for parent in parents:
        for candidate in (f"{stem}_mask", stem):
            hit = index.get((parent, candidate))
            if hit is not None:
                return hit
    return None


def _decode_gray(path: Path) -> np.ndarray:
    """The mask's pixel values, one channel, at the file's own bit depth."""
    import cv2

    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read mask ({e.strerror or e})") from None
    mask = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if mask is None:
        raise ImageDecodeError(f"{path}: not a readable mask image")
    if mask.ndim == 3:
        if mask.shape[2] == 4:  # BGRA (or gray + alpha): the alpha channel is opacity, not defect
            mask = mask[:, :, :3]
        mask = mask.max(axis=2)  # a colour-saved mask: a pixel is defect where any channel is
    return mask


def _defect_pixels(mask: np.ndarray, nonzero: bool) -> np.ndarray:
    if nonzero:
        return mask > 0
    if mask.dtype == np.uint16 and mask.max() > 255:  # a 16-bit 0/65535 mask: the 8-bit threshold, scaled
        return (mask >> 8) > 127
    return mask > 127


def read_mask(path: str | Path, shape: tuple[int, int] | None = None, *, nonzero: bool = False) -> np.ndarray:
    """A ground-truth mask as bool (H, W).

    A pixel is defect where it is above 127 (MVTec AD's 0/255 masks) or, with ``nonzero``, where
    it is not 0 (VisA, MVTec LOCO AD). A folder (MVTec LOCO AD: one mask per defect region) is the
    union of the masks in it. With ``shape`` (the image's (h, w)) a mask of another size is
    resized (nearest) to it.
    """
    import cv2

    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in MASK_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if not files:
            raise ImageDecodeError(f"{path}: a mask folder with no mask images in it")
        parts = [read_mask(p, shape, nonzero=nonzero) for p in files]
        if shape is None and len({p.shape for p in parts}) > 1:
            raise ImageDecodeError(f"{path}: its masks differ in size")
        return np.logical_or.reduce(parts)
    mask = _decode_gray(path)
    if shape is not None and mask.shape != tuple(shape):
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return _defect_pixels(mask, nonzero)


#: Orders ``order_samples`` knows: by name (the listing order of a layout) or by modification time.
ORDERS = ("name", "mtime")


def order_samples(samples: Sequence[Sample], order: str = "name") -> tuple[Sample, ...]:
    """The samples in the order a stream should see them (``score --order``).

    ``name``: as the layout lists them (an MVTec category: by defect type, then file name).
    ``mtime``: by file modification time, oldest first (production order when files were written
    as parts came off the line), ties in name order; a file that vanished sorts last (and is skipped
    when read). Batch MuSc does not depend on the order; a rolling window does.
    """
    if order not in ORDERS:
        raise InputError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
    if order == "name":
        return tuple(samples)

    def mtime(s: Sample) -> int | float:
        try:
            return s.path.stat().st_mtime_ns
        except OSError:
            return float("inf")

    keyed = [(mtime(s), i, s) for i, s in enumerate(samples)]
    return tuple(s for _, _, s in sorted(keyed, key=lambda x: (x[0], x[1])))


def grouped_by_type(samples: Sequence[Sample]) -> bool:
    """True when samples of several defect types come in one run per type (MVTec listing order).

    That is the worst order for a rolling window: a window full of one defect type lets the defect
    match itself (MUSC_SPEC 8).
    """
    types = [s.defect_type for s in samples]
    if len(set(types)) < 2 or any(t is None for t in types):
        return False
    runs = 1 + sum(a != b for a, b in zip(types, types[1:]))
    repeated_defect = any(types.count(t) > 1 for t in set(types) if t != GOOD_TYPE)
    return runs == len(set(types)) and repeated_defect
