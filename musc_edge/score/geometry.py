"""Batch scoring under an input geometry (``--resize pad``, ``--tiles RxC[:overlap]``, ``--tile-match``).

The runtime cuts each image into V views (:mod:`musc_edge.runtime.geometry`: tiles, each squashed or
letterboxed to the model's S x S). :class:`GeometryPool` keeps every view's tokens (float16, as
:class:`~musc_edge.core.pools.BatchPool` does) and scores them with batch MuSc
(:func:`musc_edge.core.scorer.score_tokens`, MUSC_SPEC 2-5):

* ``aligned`` (default): one pool per tile position, the N images' tiles at that position: a tile
  is compared with the same place of the other parts, as aligned parts are. V calls of N inputs.
* ``any``: one pool of all N * V tiles; a tile is scored by every tile of the *other* images
  (``exclude``, :func:`musc_edge.runtime.geometry.same_image_exclude`): for parts that are not
  aligned, or textures without a place. One call of N * V inputs (about V^2 times the pairs of
  one image-level pool, V times those of ``aligned``).

Per view the raw score is the maximum over its valid cells (padding excluded, ``valid`` of
``score_tokens``) and RsCIN (MUSC_SPEC 5) re-scores it within its pool, with the tiles' own
embeddings: per tile position (aligned) or over all tiles (any). An image's raw score is the
maximum over its tiles' raw scores and its final score the maximum over its tiles' RsCIN scores;
its map is the tiles' maps stitched at the original size (:class:`ImageMaps`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from musc_edge.core.device import CPU, ScoreDevice
from musc_edge.core.errors import InputError
from musc_edge.core.memory import GIB, default_budget
from musc_edge.core.meta import ModelMeta
from musc_edge.core.params import DEFAULT_PARAMS, MuscParams
from musc_edge.core.pools import BatchPool, PoolScorer
from musc_edge.core.scorer import score_tokens
from musc_edge.core.types import Scores
from musc_edge.runtime.geometry import InputGeometry, View, full_map, same_image_exclude, valid_cells

#: ``--tile-match`` values.
TILE_MATCHES = ("aligned", "any")

#: MSM's distance-table budget in batch mode (score_tokens' default); a tighter --mem-budget lowers it.
MSM_BUDGET_BYTES = 1 << 30

#: The least MSM may be left: below it, owner blocks of a few images make scoring crawl.
MIN_MSM_BYTES = 64 << 20


def pool_bytes(meta: ModelMeta, n_images: int, per_image: int, match: str) -> int:
    """Bytes a tiled batch pool holds besides MSM's table: every view's float16 tokens and float32
    embedding, plus the scoring's working set for the pool actually scored (N * V inputs with
    ``any``, N with ``aligned``): about three float32 LNAMD arrays of the widest layer (MUSC_SPEC 2),
    and with ``aligned`` one tile position's tokens gathered.

    Not :func:`musc_edge.core.memory.pool_footprint`: that is the rolling window's layout (every
    (layer, r)'s features at once and the whole W x W table); batch MuSc holds one LNAMD array
    at a time and cuts the table into owner blocks within its budget (docs/scorer.md).
    """
    patches = meta.grid * meta.grid
    n_inputs = n_images * per_image
    token_bytes = (1 + patches) * sum(meta.token_dims) * 2
    held = n_inputs * (token_bytes + meta.embed_dim * 4)
    scored = n_inputs if match == "any" else n_images
    working = 3 * scored * patches * max(meta.token_dims) * 4 + n_inputs * patches * 8
    if match != "any" and per_image > 1:
        working += n_images * token_bytes
    return int(held + working)


def msm_budget(meta: ModelMeta, n_images: int, geometry: InputGeometry, match: str,
               budget: int | None = None) -> int:
    """MSM's table budget for a tiled pool, after checking the pool against the memory budget.

    ``budget``: ``--mem-budget`` (None: :func:`musc_edge.core.memory.default_budget`, half of what
    is available, the window's default). MSM gets what the pool leaves, up to its usual 1 GiB; a
    pool that leaves less than :data:`MIN_MSM_BYTES` is refused with one line (InputError).
    Without tiles (``--resize pad`` alone) the pool is the plain batch pool: no check, as today.
    """
    per_image = geometry.views_per_image
    if per_image == 1:
        return MSM_BUDGET_BYTES
    explicit = budget is not None
    budget = default_budget() if budget is None else int(budget)
    if budget is None:
        return MSM_BUDGET_BYTES
    need = pool_bytes(meta, n_images, per_image, match)
    if need + MIN_MSM_BYTES > budget:
        source = "--mem-budget" if explicit else "the default: half of the memory available"
        pool = n_images * per_image if match == "any" else n_images
        advice = "fewer tiles, --tile-match aligned, fewer images" if match == "any" else "fewer tiles or images"
        raise InputError(
            f"--tiles {geometry.tiles} --tile-match {match} holds {n_images} images x {per_image} tiles and scores "
            f"pools of {pool}: about {(need + MIN_MSM_BYTES) / GIB:.2f} GiB, over the budget of {budget / GIB:.2f} GiB "
            f"({source}); use {advice} or raise --mem-budget")
    return int(min(MSM_BUDGET_BYTES, budget - need))


@dataclass
class ImageMaps:
    """Each image's anomaly map at its original size, computed on demand from its views' G x G maps.

    view_maps: (N, V, G, G) float64, views: per image its V :class:`View` s, size: the model's S.
    """

    view_maps: np.ndarray
    views: Sequence[tuple[View, ...]]
    size: int

    def __len__(self) -> int:
        return len(self.view_maps)

    def full(self, i: int, hw: tuple[int, int]) -> np.ndarray:
        """Image ``i``'s (h, w) float32 map: views cropped to their valid box, upsampled, stitched."""
        return full_map(self.view_maps[i], self.views[i], self.size, hw)

    def value_range(self) -> tuple[float, float]:
        """(min, max) over the valid cells only: the run's colour scale is not stretched by padding."""
        g = self.view_maps.shape[-1]
        lo, hi = np.inf, -np.inf
        for maps, views in zip(self.view_maps, self.views):
            for m, v in zip(maps, views):
                cells = m[valid_cells(v.valid, self.size, g)]
                lo, hi = min(lo, float(cells.min())), max(hi, float(cells.max()))
        return lo, hi

    def sequence(self, sizes: Sequence[tuple[int, int]]) -> "_FullMaps":
        """The full-size maps as a lazy sequence (one alive at a time), for the pixel metrics."""
        return _FullMaps(self, list(sizes))


class _FullMaps(Sequence):
    def __init__(self, maps: ImageMaps, sizes: list[tuple[int, int]]) -> None:
        self.maps, self.sizes = maps, sizes

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:  # type: ignore[override]
        return self.maps.full(i, self.sizes[i])


class GeometryPool(PoolScorer):
    """Batch MuSc over the views of an :class:`InputGeometry` (module docstring).

    ``add(tokens, embedding, views)`` takes a batch of images: V rows of tokens per image
    (image-major) and each image's views. :meth:`finish` returns per-image :class:`Scores` whose
    ``patch_maps`` are the view maps, (N, G, G) without tiles and (N, V, G, G) with them; the
    full-size maps are in :attr:`maps` (an :class:`ImageMaps`) once it has run.
    """

    def __init__(self, meta: ModelMeta, n_images: int, geometry: InputGeometry, match: str = "aligned",
                 params: MuscParams = DEFAULT_PARAMS, device: ScoreDevice = CPU, *,
                 mem_budget_bytes: int | None = None, progress: Callable[[int, int], None] | None = None) -> None:
        if match not in TILE_MATCHES:
            raise InputError(f"--tile-match expects one of {', '.join(TILE_MATCHES)}, got {match!r}")
        self.meta, self.geometry, self.match, self.params, self.device = meta, geometry, match, params, device
        self.per_image = geometry.views_per_image
        self.msm_budget = msm_budget(meta, n_images, geometry, match, mem_budget_bytes)
        self._pool = BatchPool(meta, n_images * self.per_image, params, device=device)
        self._views: list[tuple[View, ...]] = []
        self.progress = progress
        self.device_name = device.name
        tiled = f"tiles_{match}" if self.per_image > 1 else "batch"
        self.name = f"{tiled}_{geometry.resize}"
        self.maps: ImageMaps | None = None

    def add(self, tokens: Sequence[np.ndarray], embedding: np.ndarray,
            views: Sequence[tuple[View, ...]] = ()) -> None:
        if len(views) * self.per_image != len(embedding) or any(len(v) != self.per_image for v in views):
            raise ValueError(f"a batch of {len(views)} images needs {self.per_image} views and feature rows each, "
                             f"got {len(embedding)} rows")
        self._pool.add(tokens, embedding)
        self._views += list(views)

    def _valid(self, views: Sequence[View]) -> np.ndarray | None:
        """(len(views), G*G) bool of the cells inside each view's image; None when all are (squash)."""
        if self.geometry.resize != "pad":
            return None
        g, s = self.meta.grid, self.meta.image_size
        return np.stack([valid_cells(v.valid, s, g).reshape(-1) for v in views])

    def finish(self) -> Scores:
        tokens, embedding = self._pool.tokens, self._pool.embedding
        n, v, g = len(self._views), self.per_image, self.meta.grid
        flat_views = [view for views in self._views for view in views]
        n_calls = len(tokens) * len(self.params.r_list)
        pools = [np.arange(n * v)] if self.match == "any" or v == 1 else [np.arange(n) * v + p for p in range(v)]
        maps = np.zeros((n * v, g, g))
        raw, final = np.zeros(n * v), np.zeros(n * v)
        for k, idx in enumerate(pools):
            step = None if self.progress is None else (
                lambda done, total, base=k * n_calls: self.progress(base + done, len(pools) * n_calls))
            exclude = same_image_exclude(n, v) if len(idx) == n * v and v > 1 else None
            valid = self._valid([flat_views[i] for i in idx])
            scores = score_tokens([t[idx] for t in tokens] if len(pools) > 1 else tokens, embedding[idx],
                                  params=self.params, mem_budget_bytes=self.msm_budget, device=self.device,
                                  progress=step, exclude=exclude, valid=valid)
            maps[idx], raw[idx], final[idx] = scores.patch_maps, scores.image_scores_raw, scores.image_scores
        self._pool = BatchPool(self.meta, 0, self.params)  # the tokens are freed
        view_maps = maps.reshape(n, v, g, g)
        self.maps = ImageMaps(view_maps=view_maps, views=list(self._views), size=self.meta.image_size)
        return Scores(patch_maps=view_maps[:, 0] if v == 1 else view_maps,
                      image_scores_raw=raw.reshape(n, v).max(axis=1), image_scores=final.reshape(n, v).max(axis=1))
