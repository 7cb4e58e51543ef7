"""Writers of the batch tools' outputs: JSON, CSV, PNG, unique output names.

Every writer goes through :func:`musc_edge.core.durable.atomic_write_bytes`, so a crash never
leaves half a CSV or JSON behind.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from musc_edge.core.durable import atomic_write_bytes
from musc_edge.core.errors import InputError


#: Longest file name (bytes) we write: NAME_MAX (255 on Linux, macOS and Windows file systems)
#: less what :func:`musc_edge.core.durable.atomic_write_bytes` adds for its temporary file
#: (``.{name}.XXXXXXXX.tmp``: 14 bytes), so the temporary name fits too.
MAX_NAME_BYTES = 255 - len(".") - len(".XXXXXXXX.tmp")

#: Hex digits of the hash that keeps a shortened name unique (48 bits).
_HASH_CHARS = 12


def fit_name(name: str, max_bytes: int = MAX_NAME_BYTES) -> str:
    """``name`` itself when it fits ``max_bytes``, else its stem cut and tagged with a hash.

    The result keeps the suffix, is stable (the same input always gives the same name) and unique
    (the tag is a hash of the whole original name, so two long names that share a prefix differ).
    Lengths are counted in file-system bytes (``os.fsencode``: UTF-8, undecodable bytes as they
    were), and a multi-byte character is never cut in half.
    """
    raw = os.fsencode(name)
    if len(raw) <= max_bytes:
        return name
    stem, suffix = os.path.splitext(name)
    tag = "~" + hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    room = max_bytes - len(os.fsencode(suffix)) - len(tag)
    if room < 1:
        raise ValueError(f"max_bytes {max_bytes} leaves no room for a name ending in {suffix!r}")
    cut = os.fsencode(stem)[:room].decode("utf-8", "ignore")  # a split character is dropped, not mangled
    return cut + tag + suffix


def output_names(samples: Sequence[Sample], suffix: str = ".png") -> list[str]:
    """A unique relative output file name per sample (``<type>/<stem>.png``), never colliding.

    Two inputs that differ only in their image suffix (``a.jpg``, ``a.bmp``) keep it in the name.
    A file name too long to write (with the temporary name of the atomic writer) is shortened by
    :func:`fit_name`; the folders are the input's own, which exist, so they fit already.
    """
    first = [str(Path(s.rel).with_suffix(suffix)) for s in samples]
    counts: dict[str, int] = {}
    for name in first:
        counts[name] = counts.get(name, 0) + 1
    names = [Path(s.rel + suffix if counts[n] > 1 else n) for s, n in zip(samples, first)]
    return [n.with_name(fit_name(n.name)).as_posix() for n in names]


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


