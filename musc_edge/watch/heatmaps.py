"""``OUTDIR/heatmaps/``: one overlay per reported image, written so that it can never stop the line.

docs/watch.md, "What happens when":

- Names are ``<seq:08d>_<stem>.png`` fitted to the file system with the atomic writer's temporary
  name (:func:`musc_edge.outputs.writers.fit_name`: a long stem is cut and tagged with a hash, so
  names stay unique and the same on every run). A 233-byte file name once made the write fail,
  and since a restart replays the same image, the daemon died again on every restart.
- An overlay that cannot be made or written (the source vanished, a full disk, a folder we may not
  write) is logged and recorded in the result line (``heatmap: null``, ``heatmap_error``); the
  result itself is never held back for it.
- ``keep`` (``--keep-heatmaps N``) keeps the newest N overlays; the default keeps all, and they grow
  with every image.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from musc_edge.core.errors import MuscEdgeError
from musc_edge.outputs.writers import fit_name, write_png

from .paths import readable

log = logging.getLogger(__name__)


def _seq_of(path: Path) -> int:
    head = path.name.split("_", 1)[0]
    return int(head) if head.isdigit() else -1


class HeatmapStore:
    """Writes overlays into ``folder``; ``keep``: how many of the newest to keep (None: all)."""

    def __init__(self, folder: Path, keep: int | None = None) -> None:
        self.folder = Path(folder)
        self.keep = keep
        self._kept: deque[Path] | None = None  # oldest first; listed at the first write

    def name(self, seq: int, source: str | os.PathLike) -> str:
        """``<seq:08d>_<stem>.png``, valid UTF-8 and short enough to write."""
        return fit_name(f"{seq:08d}_{readable(Path(source).stem)}.png")

    def write(self, seq: int, source: str | os.PathLike, render: Callable[[], np.ndarray]
              ) -> tuple[str | None, str | None]:
        """Render and write one overlay: (its absolute path, None), or (None, why it is missing)."""
        target = self.folder / self.name(seq, source)
        try:
            write_png(target, render())
        except (OSError, MuscEdgeError) as e:  # never the line's problem: the result goes out without it
            reason = str(e) if isinstance(e, MuscEdgeError) else f"cannot write {target}: {e.strerror or e}"
            log.warning("no heatmap for seq %d: %s", seq, reason)
            return None, reason
        self._retain(target)
        return str(target.absolute()), None  # like "path": usable from any working directory

    def _retain(self, written: Path) -> None:
        """Delete the oldest overlays beyond ``keep``."""
        if self.keep is None:
            return
        if self._kept is None:
            found = [p for p in self.folder.glob("*.png") if _seq_of(p) >= 0]
            self._kept = deque(sorted(found, key=_seq_of))
        if not self._kept or self._kept[-1] != written:  # a replay rewrites the newest one
            self._kept.append(written)
        while len(self._kept) > self.keep:
            self._kept.popleft().unlink(missing_ok=True)
