"""VisA: one object's test split as listed in ``split_csv/1cls.csv``.

The CSV (columns ``object, split, label, image, mask``; paths relative to the VisA root) is the
ground truth: ``label`` is ``normal`` or ``anomaly``, masks mark defects with nonzero pixels.
Pass the object's folder (``VisA/candle``, with ``VisA/split_csv/1cls.csv`` beside it) or a VisA
root whose CSV lists one object. MuSc scores one object at a time: its images form the pool.
"""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from musc_edge.core.errors import InputError

from .base import Dataset, Sample

NAME = "visa"
CSV = Path("split_csv") / "1cls.csv"
#: The CSV's labels (any case) -> the defect type of the sample ("good" is normal).
LABELS = {"normal": "good", "anomaly": "bad"}


def _csv_and_object(root: Path) -> tuple[Path, Path, str | None] | None:
    """(csv path, VisA root, object name or None for 'the root itself') or None."""
    if (root / CSV).is_file():
        return root / CSV, root, None
    # "." or "candle/.." name no folder of their own: resolve those (other paths stay as given)
    here = root.resolve() if root.name in ("", "..") else root
    if (here.parent / CSV).is_file():
        return here.parent / CSV, here.parent, here.name
    return None


def detect(root: Path) -> bool:
    return _csv_and_object(root) is not None


def make_dataset(root: Path, *, gt_mode: str = "auto", mask_dir: Path | None = None,
                 excluded: frozenset[Path] = frozenset()) -> Dataset:
    found = _csv_and_object(root)
    if found is None:
        raise InputError(f"{root} is not a VisA object folder: no {CSV} in it or beside it")
    csv_path, visa_root, obj = found
    # utf-8-sig: a CSV saved by a spreadsheet starts with a byte-order mark
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        rows = [{k.strip().lower(): (v or "").strip() for k, v in row.items() if k} for row in csv.DictReader(f)]
    need = {"object", "split", "label", "image", "mask"}
    if not rows:
        raise InputError(f"{csv_path} lists no images; expected the columns {', '.join(sorted(need))}")
    if not need <= set(rows[0]):
        raise InputError(f"{csv_path}: expected the columns {', '.join(sorted(need))}, got {', '.join(rows[0])}")
    objects = sorted({r["object"] for r in rows})
    if obj is None:
        if len(objects) != 1:
            shown = ", ".join(objects[:8]) + (", ..." if len(objects) > 8 else "")
            raise InputError(f"{csv_path} lists {len(objects)} objects ({shown}); MuSc scores one object at a "
                             f"time: pass {visa_root}/<object>, e.g. {visa_root / objects[0]}")
        obj = objects[0]
    elif obj not in objects:
        raise InputError(f"{csv_path} lists no images of {obj!r}; its objects are {', '.join(objects)}")
    samples, listed, warnings, seen = [], [], [], set()
    for line, r in enumerate(rows, start=2):  # line 1 is the header
        if r["object"] != obj or r["split"].lower() != "test":
            continue
        kind = LABELS.get(r["label"].lower())
        if kind is None:
            raise InputError(f"{csv_path}:{line}: label {r['label']!r} of {r['image']}: expected normal or anomaly")
        path = visa_root / r["image"]
        if path.resolve().parent in excluded:
            continue
        if path in seen:
            warnings.append(f"{r['image']} is listed twice in {CSV}: scored once")
            continue
        seen.add(path)
        if not path.is_file():
            warnings.append(f"{r['image']} is listed in {CSV} but missing: left out")
            continue
        label = None if gt_mode == "none" else int(kind != "good")
        mask = None
        if label == 1:
            mask = visa_root / r["mask"] if r["mask"] else None
            if mask is None or not mask.is_file():
                warnings.append(f"no mask for defective image {r['image']}: left out of pixel metrics")
                mask = None
        samples.append(Sample(path=path, rel=f"{kind}/{path.name}", defect_type=kind, label=label,
                              mask_path=mask, mask_nonzero=True))
        listed.append("/".join(p for p in r["image"].replace("\\", "/").split("/") if p not in ("", ".", "..")))
    if not samples:
        raise InputError(f"{csv_path} lists no test images of {obj!r} that exist under {visa_root}")
    names = [s.rel for s in samples]
    if len(set(names)) < len(names):  # one file name in two folders: name outputs by the CSV's path instead
        samples = [replace(s, rel=f"{s.defect_type}/{image}") for s, image in zip(samples, listed)]
    return Dataset(root=root, layout=NAME, samples=tuple(samples), warnings=tuple(warnings))
