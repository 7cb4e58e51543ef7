"""VisA: one object's test split as listed in ``split_csv/1cls.csv``.

The CSV (columns ``object, split, label, image, mask``; paths relative to the VisA root) is the
ground truth: ``label`` is ``normal`` or ``anomaly``, masks mark defects with nonzero pixels.
Pass the object's folder (``VisA/candle``, with ``VisA/split_csv/1cls.csv`` beside it) or a VisA
root whose CSV lists one object. MuSc scores one object at a time: its images form the pool.
"""

from __future__ import annotations

import csv
from pathlib import Path

from musc_edge.core.errors import InputError

from .base import Dataset, Sample

NAME = "visa"
CSV = Path("split_csv") / "1cls.csv"


def _csv_and_object(root: Path) -> tuple[Path, Path, str | None] | None:
    """(csv path, VisA root, object name or None for 'the root itself') or None."""
    if (root / CSV).is_file():
        return root / CSV, root, None
    if (root.parent / CSV).is_file():
        return root.parent / CSV, root.parent, root.name
    return None


def detect(root: Path) -> bool:
    return _csv_and_object(root) is not None


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset()) -> Dataset:
    found = _csv_and_object(root)
    if found is None:
        raise InputError(f"{root} is not a VisA object folder: no {CSV} in it or beside it")
    csv_path, visa_root, obj = found
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    need = {"object", "split", "label", "image", "mask"}
    if rows and not need <= set(rows[0]):
        raise InputError(f"{csv_path}: expected the columns {', '.join(sorted(need))}, got {', '.join(rows[0])}")
    objects = sorted({r["object"] for r in rows})
    if obj is None:
        if len(objects) != 1:
            raise InputError(f"{csv_path} lists {len(objects)} objects ({', '.join(objects[:6])}...); MuSc scores "
                             f"one object at a time: pass {visa_root}/<object>")
        obj = objects[0]
    elif obj not in objects:
        raise InputError(f"{csv_path} lists no images of {obj!r}; its objects are {', '.join(objects)}")
    samples, warnings = [], []
    for r in rows:
        if r["object"] != obj or r["split"] != "test":
            continue
        path = visa_root / r["image"]
        if path.resolve().parent in excluded:
            continue
        if not path.is_file():
            warnings.append(f"{r['image']} is listed in {CSV} but missing: left out")
            continue
        label = None if gt_mode == "none" else int(r["label"] != "normal")
        mask = None
        if label == 1:
            mask = visa_root / r["mask"] if r["mask"] else None
            if mask is None or not mask.is_file():
                warnings.append(f"no mask for defective image {r['image']}: left out of pixel metrics")
                mask = None
        kind = "good" if r["label"] == "normal" else "bad"
        samples.append(Sample(path=path, rel=f"{kind}/{path.name}", defect_type=kind, label=label,
                              mask_path=mask, mask_nonzero=True))
    if not samples:
        raise InputError(f"{csv_path} lists no test images of {obj!r} that exist under {visa_root}")
    return Dataset(root=root, layout=NAME, samples=tuple(samples), warnings=tuple(warnings))
