"""Files in and out of the batch tools: image folders, data-set layouts, masks, CSV/JSON/PNG.

Two folder layouts are understood (``discover``):

* **flat**: the images directly inside DIR (jpg/png/bmp/tiff, not recursive); no labels, unless
  a mask folder is given (``gt=MASKDIR``: an image with a mask is defective, one without is good).
* **MVTec-style category**: ``DIR/test/<type>/*.png`` with ``DIR/ground_truth/<type>/<stem>_mask.png``;
  ``good`` images are normal and have no mask (all zero); any other type is defective. A mask pixel
  above 127 is defect.

Writers are atomic (temporary file + rename), so a crash never leaves half a CSV or JSON behind.
Decoding of *images* lives in ``musc_edge.runtime.preprocess``; masks are read here with OpenCV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import ImageDecodeError, InputError

#: File name suffixes of images we read (lower case).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
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


# ------------------------------------------------------------------------------------------ data set
@dataclass(frozen=True)
class Sample:
    """One image to score.

    rel: its path relative to the scored root (``test/`` of a category, or DIR), POSIX style.
    defect_type: the ``test/<type>`` folder (None for a flat folder).
    label: 0 normal, 1 defective, None unknown.
    mask_path: its ground-truth mask; None for good images (all zero) and where none exists.
    """

    path: Path
    rel: str
    defect_type: str | None = None
    label: int | None = None
    mask_path: Path | None = None

    @property
    def has_mask_truth(self) -> bool:
        """True when this image's pixel truth is known: a mask file, or a good image (all zero)."""
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class Dataset:
    """A folder of images found by :func:`discover`, with what it knows about ground truth."""

    root: Path
    layout: str  # "flat" or "mvtec"
    samples: tuple[Sample, ...]
    warnings: tuple[str, ...] = ()

    @property
    def has_labels(self) -> bool:
        return bool(self.samples) and all(s.label is not None for s in self.samples)


def discover(root: str | Path, gt: str | Path = "auto", *, exclude: Sequence[str | Path] = ()) -> Dataset:
    """Find the images under ``root`` and, per ``gt``, their labels and masks.

    gt: ``auto`` (labels and masks of an MVTec-style category, none for a flat folder), ``none``
    (ignore any ground truth), or a folder of masks (``<type>/<stem>_mask.png``, ``<stem>_mask.png``
    or ``<stem>.png``).
    """
    root = Path(root)
    if not root.exists():
        raise InputError(f"{root} does not exist; pass a folder of images or an MVTec-style category")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; pass a folder of images or an MVTec-style category")
    gt_text = str(gt)
    mode = gt_text.lower() if gt_text.lower() in ("auto", "none") else "dir"
    mask_dir = Path(gt_text) if mode == "dir" else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise InputError(f"--gt {gt_text}: no such mask folder; use auto, none or a folder of masks")
    excluded = {Path(e).resolve() for e in exclude}
    test_dir = root / "test"
    if test_dir.is_dir() and any(p.is_dir() for p in test_dir.iterdir()):
        return _discover_mvtec(root, test_dir, mode, mask_dir, excluded)
    images = [p for p in list_images(root) if p.resolve().parent not in excluded]
    if not images:
        raise InputError(f"no images (jpg/png/bmp/tiff) directly in {root}; pass a folder of images, "
                         "or an MVTec-style category (the folder that holds test/<type>/)")
    index = _mask_index(mask_dir) if mask_dir is not None else None
    samples = []
    for p in images:
        mask = _find_mask(index, None, p.stem) if index is not None else None
        label = (1 if mask is not None else 0) if index is not None else None
        samples.append(Sample(path=p, rel=p.name, label=label, mask_path=mask))
    return Dataset(root=root, layout="flat", samples=tuple(samples))


#: Orders ``order_samples`` knows: by name (the listing order of ``discover``) or by modification time.
ORDERS = ("name", "mtime")


def order_samples(samples: Sequence[Sample], order: str = "name") -> tuple[Sample, ...]:
    """The samples in the order a stream should see them (``score --order``).

    ``name``: as :func:`discover` lists them (an MVTec category: by defect type, then file name).
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


def _discover_mvtec(root: Path, test_dir: Path, mode: str, mask_dir: Path | None, excluded: set[Path]) -> Dataset:
    if mode == "auto":
        mask_dir = root / "ground_truth" if (root / "ground_truth").is_dir() else None
    index = _mask_index(mask_dir) if mask_dir is not None else None
    samples: list[Sample] = []
    warnings: list[str] = []
    for type_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        if type_dir.resolve() in excluded:
            continue
        kind = type_dir.name
        label = None if mode == "none" else int(kind != GOOD_TYPE)
        for p in list_images(type_dir):
            mask = None
            if index is not None and label == 1:
                mask = _find_mask(index, kind, p.stem)
                if mask is None:
                    warnings.append(f"no mask for defective image {kind}/{p.name}: left out of pixel metrics")
            samples.append(Sample(path=p, rel=f"{kind}/{p.name}", defect_type=kind, label=label, mask_path=mask))
    if not samples:
        raise InputError(f"no images (jpg/png/bmp/tiff) in {test_dir}/<type>/; "
                         "an MVTec-style category holds test/good/, test/<defect>/ and ground_truth/<defect>/")
    return Dataset(root=root, layout="mvtec", samples=tuple(samples), warnings=tuple(warnings))


def _mask_index(mask_dir: Path) -> dict[tuple[str, str], Path]:
    """(parent folder relative to mask_dir, file stem) -> path, for every mask-like file."""
    index: dict[tuple[str, str], Path] = {}
    for dirpath, _, files in os.walk(mask_dir):
        rel_parent = Path(dirpath).relative_to(mask_dir).as_posix()
        for name in sorted(files):
            p = Path(dirpath) / name
            if p.suffix.lower() in MASK_SUFFIXES:
                index.setdefault((rel_parent, p.stem), p)
    return index


def _find_mask(index: dict[tuple[str, str], Path], kind: str | None, stem: str) -> Path | None:
    parents = ([kind] if kind else []) + ["."]
    for parent in parents:
        for candidate in (f"{stem}_mask", stem):
            hit = index.get((parent, candidate))
            if hit is not None:
                return hit
    return None


def read_mask(path: str | Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A ground-truth mask as bool (H, W): pixel > 127 is defect.

    With ``shape`` (the image's (h, w)) a mask of another size is resized (nearest) to it.
    """
    path = Path(path)
    try:
        data = np.frombuffer(path.read_bytes(), np.uint8)
    except OSError as e:
        raise ImageDecodeError(f"{path}: cannot read mask ({e.strerror or e})") from None
    mask = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if data.size else None
    if mask is None:
        raise ImageDecodeError(f"{path}: not a readable mask image")
    if shape is not None and mask.shape != tuple(shape):
        mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return mask > 127


def output_names(samples: Sequence[Sample], suffix: str = ".png") -> list[str]:
    """A unique relative output file name per sample (``<type>/<stem>.png``), never colliding.

    Two inputs that differ only in their image suffix (``a.jpg``, ``a.bmp``) keep it in the name.
    """
    first = [str(Path(s.rel).with_suffix(suffix)) for s in samples]
    counts: dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    names = [s.rel + suffix if counts[n] > 1 else n for s, n in zip(samples, first)]
    return [Path(n).as_posix() for n in names]


# ------------------------------------------------------------------------------------------- writers
def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file in the folder ``path`` durable (POSIX: fsync of the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename.

    A crash leaves the old or the new content, never half of it. With ``fsync`` the data is also
    durable when this returns (fsync of the file before the rename and of the folder after): the
    watch daemon's state needs that after a power cut; batch outputs (CSV, JSON, PNG) do not and
    skip the two syncs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give open()'s usual mode (another
            # user, e.g. the service running `watch`, must read an engine or results written here)
            f.write(data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(path.parent)


def write_json(path: str | Path, obj: Any) -> None:
    """Pretty JSON, NaN-free (non-finite floats become null)."""
    text = json.dumps(_json_safe(obj), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(path, text.encode())


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """CSV with a header; floats written with full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if v is None else (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                         for v in row])
    atomic_write_bytes(path, buf.getvalue().encode())


def write_png(path: str | Path, image_bgr: np.ndarray) -> None:
    """Encode with OpenCV (BGR or gray uint8) and write atomically; works with any path characters."""
    ok, buf = cv2.imencode(".png", image_bgr)
    if not ok:
        raise InputError(f"could not encode {path} as PNG")
    atomic_write_bytes(path, buf.tobytes())


def heatmap_overlay(image_rgb: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
                    alpha: float = 0.5) -> np.ndarray:
    """The map in colour (JET: blue low, red high) blended over the image; BGR uint8 for write_png.

    ``vmin``/``vmax`` fix the colour scale, so overlays of one run are comparable with each other.
    """
    if amap.shape != image_rgb.shape[:2]:
        raise InputError(f"map of shape {amap.shape} does not fit image of shape {image_rgb.shape[:2]}")
    span = float(vmax) - float(vmin)
    norm = (amap - vmin) / span if span > 0 else np.zeros_like(amap)
    gray = np.clip(np.rint(norm * 255.0), 0, 255).astype(np.uint8)
    colour = cv2.applyColorMap(gray, cv2.COLORMAP_JET)
    base = cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR)
    return cv2.addWeighted(colour, float(alpha), base, 1.0 - float(alpha), 0.0)
