"""How much memory a rolling pool takes, and whether it fits, before anything is allocated.

A :class:`musc_edge.core.window.PoolWindow` of W slots holds, per (tapped layer, r) combination q,
every image's LNAMD features (W, L, C_q) and the pair distance table (W, Q, L, W), all float32:

    bytes = 4 * (W * L * sum_q C_q  +  W^2 * Q * L  +  W * D)

The table grows with W^2: ViT-B/16 at 224 (L = 196, C = 768, 4 layers, r = 1, 3, 5: Q = 12)
takes 2.3 GiB at W = 256 (0.57 GiB of it the table) and 175 GiB at W = 4096 (147 GiB the table).
So a pool is refused, with the GiB it needs and
the largest W that fits, when it exceeds the budget: by default :data:`DEFAULT_SHARE` of the
memory available to this process (``MemAvailable`` of ``/proc/meminfo``, capped by a cgroup
limit), or ``--mem-budget``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError

#: Share of the available memory a pool may take by default: the rest is for the backbone, the
#: decoded images, the scores and whatever else runs on the line PC.
DEFAULT_SHARE = 0.5

GIB = float(1 << 30)


@dataclass(frozen=True)
class Footprint:
    """Bytes a pool of ``slots`` images takes, in its parts; ``per_slot``/``per_slot2`` give the
    linear and quadratic coefficients (with the references counted in ``slots``)."""

    slots: int
    features: int
    table: int
    embeddings: int
    per_slot: int
    per_slot2: int

    @property
    def total(self) -> int:
        return self.features + self.table + self.embeddings

    def largest_slots(self, budget: int) -> int:
        """Largest number of slots whose pool fits ``budget`` bytes (0 if not even one)."""
        a, b = float(self.per_slot2), float(self.per_slot)
        if a <= 0:
            return int(budget // b) if b > 0 else 0
        w = int((-b + math.sqrt(b * b + 4.0 * a * budget)) / (2.0 * a))
        while w > 0 and a * w * w + b * w > budget:
            w -= 1
        return w


def pool_footprint(slots: int, n_patches: int, token_dims: Sequence[int], n_r: int, embed_dim: int,
                   itemsize: int = 4) -> Footprint:
    """The :class:`Footprint` of a pool of ``slots`` images (MUSC_SPEC 3's table, float32)."""
    q = len(token_dims) * int(n_r)
    per_feat = int(n_patches) * sum(int(c) for c in token_dims) * int(n_r) * itemsize
    per_slot2 = q * int(n_patches) * itemsize
    w = int(slots)
    return Footprint(slots=w, features=w * per_feat, table=w * w * per_slot2, embeddings=w * int(embed_dim) * 4,
                     per_slot=per_feat + int(embed_dim) * 4, per_slot2=per_slot2)


def _cgroup_limit() -> int | None:
    """The memory limit of this process's cgroup (v2 ``memory.max`` or v1), None if unlimited."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping, or None where it cannot be told.

    Linux's ``MemAvailable`` (free plus reclaimable cache), capped by the cgroup limit of a
    container; elsewhere the physical memory from ``sysconf``.
    """
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        avail = None
    if avail is None:
        try:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_limit()
    return min(avail, limit) if limit is not None else avail


def default_budget() -> int | None:
    """:data:`DEFAULT_SHARE` of :func:`available_memory`, or None (no check) where unknown."""
    avail = available_memory()
    return None if avail is None else int(avail * DEFAULT_SHARE)


_UNITS = {"": GIB, "b": 1, "k": 1e3, "kb": 1e3, "kib": 1 << 10, "m": 1e6, "mb": 1e6, "mib": 1 << 20,
          "g": 1e9, "gb": 1e9, "gib": GIB, "t": 1e12, "tb": 1e12, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """``--mem-budget``: '8GiB', '512MiB', '2G', '1.5' (GiB when no unit) -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise InputError(f"--mem-budget expects a size such as 8GiB, 512MiB or 2G, got {text!r}")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def check_fits(fp: Footprint, budget: int | None = None, *, what: str = "the window", reserved_slots: int = 0,
               flag: str = "--window") -> None:
    """Refuse a pool over the budget with one line: the GiB it needs, the budget, the largest
    ``flag`` value that fits. ``budget`` None: :func:`default_budget`. ``reserved_slots``: slots
    that are not part of ``flag`` (reference images)."""
    explicit = budget is not None
    budget = default_budget() if budget is None else int(budget)
    if budget is None or fp.total <= budget:
        return
    fits = max(0, fp.largest_slots(budget) - int(reserved_slots))
    source = "--mem-budget" if explicit else f"{DEFAULT_SHARE:.0%} of the {budget / DEFAULT_SHARE / GIB:.1f} GiB available"
    advice = (f"the largest {flag} that fits is {fits}" if fits >= 2 else
              f"not even {flag} 2 fits")
    raise InputError(
        f"{what} needs {fp.total / GIB:.1f} GiB for a pool of {fp.slots} images (distance table "
        f"{fp.table / GIB:.1f} GiB, features {fp.features / GIB:.1f} GiB), over the budget of {budget / GIB:.1f} GiB "
        f"({source}); "
        f"{advice}; lower {flag} or raise --mem-budget"
    )
