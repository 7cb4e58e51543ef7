"""Writers of the batch tools' outputs: JSON, CSV, PNG, unique output names.

Every writer goes through :func:`musc_edge.core.durable.atomic_write_bytes`, so a crash never
leaves half a CSV or JSON behind.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.errors import InputError


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


