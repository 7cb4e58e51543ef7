"""Paths in and out of the watch daemon: what it must not score, and paths in JSON that any tool reads.

docs/watch.md, "What happens when": two cases live here.

- ``--out`` that holds the watched folder (``watch /data/line1/incoming --out /data/line1``) is a
  sensible layout, so it is not refused: the tracker then leaves out only what the daemon writes
  (:func:`own_folders`), not everything under OUTDIR, which would be the watched folder itself.
- A file name that is not UTF-8 (a Latin-1 camera PC writing into a UTF-8 line PC) reaches Python
  with lone surrogates (PEP 383, ``surrogateescape``); ``json.dumps`` writes them as ``\\udce9``,
  which no JSON tool outside Python can turn back into the name. :func:`json_path` writes valid
  UTF-8 for people and the exact bytes in base64 for programs; :func:`real_path` reads them back.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Iterable

#: Folders of OUTDIR that the daemon writes (besides results.jsonl, which is no image).
OWN_SUBFOLDERS = ("state", "heatmaps")


def own_folders(folder: Path, out_dir: Path, sink_folders: Iterable[Path] = ()) -> list[Path]:
    """The paths the arrival tracker excludes: all of OUTDIR, or only its own subfolders when
    OUTDIR is the watched folder or holds it (excluding OUTDIR would exclude every file)."""
    root, out = Path(folder).resolve(), Path(out_dir).resolve()
    sinks = [Path(p).resolve() for p in sink_folders]
    if out == root or out in root.parents:
        return [out / name for name in OWN_SUBFOLDERS] + sinks
    return [out] + sinks


def json_path(key: str, path: str | os.PathLike) -> dict[str, str]:
    """``{key: text}`` for a JSON record, valid UTF-8 whatever bytes the name holds.

    A name that is not UTF-8 gets U+FFFD for each bad byte in ``key`` (readable, not unique) and its
    exact bytes in ``<key>_bytes_b64``: ``os.fsdecode(base64.b64decode(r["path_bytes_b64"]))`` in
    Python, ``jq -r .path_bytes_b64 | base64 -d`` in a shell (docs/watch.md, "results.jsonl").
    """
    raw = os.fsencode(path)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {key: raw.decode("utf-8", "replace"), f"{key}_bytes_b64": base64.b64encode(raw).decode("ascii")}


def real_path(record: dict, key: str = "path") -> str:
    """The path :func:`json_path` wrote, as the file system has it (a ``str`` that ``open`` takes)."""
    b64 = record.get(f"{key}_bytes_b64")
    return os.fsdecode(base64.b64decode(b64)) if b64 else record[key]


def readable(path: str | os.PathLike) -> str:
    """A path for a file name or a log line: valid UTF-8 (U+FFFD for bytes that are not)."""
    return os.fsencode(path).decode("utf-8", "replace")
