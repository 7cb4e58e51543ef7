"""The settings of the MuSc algorithm in one object, with the defaults written once.

r_list: LNAMD aggregation degrees (MUSC_SPEC 2); interval: the [start, end) slice of the other
images' distances MSM averages, sorted ascending (MUSC_SPEC 3); k_list: RsCIN neighbourhood sizes
(MUSC_SPEC 5; (1, 8, 9) for VisA-like sets); match_radius: None for MuSc's global nearest patch,
or P to search only the (2P+1) x (2P+1) grid cells around a patch's own position in the other
image (aligned parts; not in the paper, see docs/scorer.md "Positional matching"). Validated once where they are made, so every function
that takes a :class:`MuscParams` can trust it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InputError

DEFAULT_R = (1, 3, 5)
DEFAULT_INTERVAL = (0.0, 0.3)
DEFAULT_K = (1, 2, 3)


@dataclass(frozen=True)
class MuscParams:
    """r list, MSM interval and RsCIN k list (MUSC_SPEC 2, 3, 5)."""

    r_list: tuple[int, ...] = DEFAULT_R
    interval: tuple[float, float] = DEFAULT_INTERVAL
    k_list: tuple[int, ...] = DEFAULT_K
    match_radius: int | None = None

    def __post_init__(self) -> None:
        r = tuple(int(v) for v in self.r_list)
        if not r:
            raise InputError("r_list is empty: pass at least one aggregation degree, e.g. (1, 3, 5)")
        if any(v < 1 or v % 2 == 0 for v in r):
            raise InputError(f"aggregation degree r must be an odd integer >= 1 (1, 3, 5), got {list(r)}")
        try:
            a, b = (float(v) for v in self.interval)
        except (TypeError, ValueError):
            raise InputError(f"interval must be (start, end), got {self.interval!r}") from None
        if not (0.0 <= a < b <= 1.0):
            raise InputError(f"interval must satisfy 0 <= start < end <= 1, got {(a, b)}")
        k = tuple(int(v) for v in self.k_list)
        if not k or min(k) < 1:
            raise InputError(f"k_list must hold integers >= 1, got {list(self.k_list)}")
        if self.match_radius is not None:
            try:
                radius = int(self.match_radius)
            except (TypeError, ValueError):
                raise InputError(f"match_radius must be an integer >= 0 or None (global), got {self.match_radius!r}") from None
            if radius < 0 or radius != self.match_radius:
                raise InputError(f"match_radius must be an integer >= 0 or None (global), got {self.match_radius!r}")
            object.__setattr__(self, "match_radius", radius)
        object.__setattr__(self, "r_list", r)
        object.__setattr__(self, "interval", (a, b))
        object.__setattr__(self, "k_list", k)

    def combos(self, n_layers: int) -> tuple[tuple[int, int], ...]:
        """(layer index, r) for every MSM the maps average, layer-major (MUSC_SPEC 3)."""
        return tuple((layer, r) for layer in range(int(n_layers)) for r in self.r_list)

    def to_dict(self) -> dict:
        return {"r_list": list(self.r_list), "interval": list(self.interval), "k_list": list(self.k_list),
                "match_radius": self.match_radius}

    @classmethod
    def of(cls, r_list: Sequence[int] | None = None, interval: Sequence[float] | None = None,
           k_list: Sequence[int] | None = None, match_radius: int | None = None) -> "MuscParams":
        """Defaults for what is None (the CLI's unset flags)."""
        return cls(tuple(DEFAULT_R if r_list is None else r_list),
                   tuple(DEFAULT_INTERVAL if interval is None else interval),
                   tuple(DEFAULT_K if k_list is None else k_list), match_radius)


DEFAULT_PARAMS = MuscParams()
