"""Durable file writes (stdlib only): temporary file + rename, optional fsync.

In the core because every layer writes files that must never be seen half-written: the watch
daemon's state, TensorRT engines and their sidecars, batch outputs. A crash leaves the old or the
new content, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


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

