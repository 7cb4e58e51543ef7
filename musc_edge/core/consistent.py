"""Consistent anomalies: keep a defect repeated across the pool from vouching for itself.

MuSc scores a patch by its distances to its nearest patches in the other images of the pool
(MUSC_SPEC 3): a defect that recurs at the same place in many images (a scratch from one tool, a
dirty lens) finds close matches in every copy, and with copies in 30% of the pool its whole
[0, 0.3) interval is made of them, so it scores as normal (MUSC_SPEC 8). This module finds such
groups of images and takes them out of each other's interval, through ``score_tokens``'s
``exclude`` (``exclude[i, j]``: image j does not score image i).

The method follows the idea of CoDeGraph (Le-Gia and Ahn, "On the Problem of Consistent Anomalies
in Zero-Shot Industrial Anomaly Detection", arXiv 2510.10456), simplified to deterministic numpy
with few settings (:class:`ConsistentOptions`):

1. One MSM-like pass on one (layer, r) (by default the last tapped layer, r = 3): the full table
   ``D[i, m, j]`` of distances from patch m of image i to its nearest patch of image j
   (:func:`distance_table`, the pair kernel :func:`musc_edge.core.pairs.block_minima`).
2. Neighbour burnout. For each patch, its distances to the other images sorted ascending,
   ``s_1 <= s_2 <= ...``. A normal patch's distances grow gradually; a patch of a defect shared by
   k other images stays close for k images and then jumps, once its copies are used up. The paper's
   extreme-value model makes the log growth ``ln(s_{k+1} / s_k)`` of a normal patch exponential with
   mean ``1 / (alpha k)``, so the rank-scaled gap ``t_k = k ln(s_{k+1} / s_k)`` has about the same
   law at every rank; each k is measured in its pool median (:func:`gap_scales`). A patch burns out
   at ``k*``, the k of its largest scaled gap (``min_clique <= k <= max_fraction (N - 1)``), when
   that gap reaches :func:`burnout_threshold` (``burnout * log2(tests)`` medians: a Bonferroni
   bound for the exponential, widened for real features' heavier tail) AND the patch would be
   anomalous without its k* nearest images: the mean of its next interval of distances
   (``s_{k*+1}...``, the MSM score it would get) is at least the pool's typical image maximum (the
   median over images of their highest plain MSM score at this layer, r). The second condition
   keeps groups of similar *normal* images (sub-populations, repeated shots of one part) alone:
   their patches may burn out, but they stay unremarkable without their group. An image more than
   ``max_share`` of whose patches burn out is a near-duplicate of its clique, not the carrier of a
   defect, and sends no links.
3. Suspicious links. A burnt-out patch of image i links i to the k* images that matched it;
   ``links[i, j]`` counts such patches (:func:`suspicious_links`).
4. Groups. Images i and j are joined when both ``links[i, j]`` and ``links[j, i]`` are at least
   ``min_patches`` (the copies vouch for each other, both ways). Each connected component of that
   graph is pruned to its members that spend at least ``min_purity`` of their links inside it (a
   patch of a large normal sub-population burns out after dozens of images, most of them outside
   any small component); what is left with at least ``min_clique + 1`` images is a group
   (:func:`clique_groups`; the paper runs community detection on a weighted image graph, pruned
   components are its deterministic stand-in). Every pair of images inside a group is excluded
   (:func:`exclusion_matrix`); a group larger than ``max_fraction`` of the pool keeps only its
   direct edges, so no chain of links can take half the pool out of an image's interval.

Ordinary pools: no patch needs both a burst of close matches and an anomalous remainder, so
nothing or almost nothing is excluded (``tests/unit/core/test_consistent.py``; on MTD the same
figures with and without, docs/scorer.md "Repeated defects").

Cost and memory: one global MSM pass (one of the ``len(layers) * len(r_list)`` that scoring
runs). Memory: the (N, L, N) float32 table (37 MB at N = 109, L = 784; 155 MB at N = 444,
L = 196) plus per-image (L, N) temporaries, and the (N, N) link counts; nothing larger.
Deterministic: no random draw, stable sorts, components numbered by their smallest image.

Pure: numpy and the array API (the table is built on the tokens' namespace, e.g. CuPy; the
per-image analysis, which has data-dependent shapes, runs on the host).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from array_api_compat import array_namespace

from .errors import InputError
from .lnamd import lnamd
from .msm import as_unit_float32, check_exclude
from .pairs import block_minima, interval_bounds
from .params import DEFAULT_PARAMS, MuscParams
from .scorer import score_tokens, validate_layer_tokens
from .types import Scores

__all__ = [
    "ConsistentOptions", "ConsistentScores", "burnout_threshold", "clique_groups", "consistent_exclusions",
    "distance_table", "exclusion_matrix", "exclusions_from_table", "gap_scales", "score_tokens_consistent",
    "suspicious_links",
]

#: Bytes of one product block of :func:`distance_table` (the pair kernel tiles it further on numpy).
TABLE_BLOCK_BYTES = 128 << 20


@dataclass(frozen=True)
class ConsistentOptions:
    """The settings of the consistent-anomaly search (the module docstring explains each).

    layer: index of the tapped layer the search runs on (-1: the last); r: its LNAMD degree.
    min_clique: the fewest *other* images that must share a defect (2: three copies; a defect in
        two images barely moves a 30% interval, and near-duplicate photographs come in pairs).
    max_fraction: the largest share of the pool a group may have (and the largest k searched).
    burnout: the factor of :func:`burnout_threshold`: a patch's largest gap must reach ``burnout *
        log2(tests)`` medians.
    min_patches: burnt-out patches needed in each direction to join two images.
    min_purity: the share of an image's links that must point into its group for it to stay.
    max_share: an image more than this share of whose patches burn out is a near-duplicate of its
        clique (the same part photographed again), not the carrier of a defect: it sends no links
        (on MTD the largest share is 19%, a pasted 0.6% defect burns out 1-4% of its image).
    """

    layer: int = -1
    r: int = 3
    min_clique: int = 2
    max_fraction: float = 0.5
    burnout: float = 2.0
    min_patches: int = 1
    min_purity: float = 0.5
    max_share: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise InputError(f"consistent layer must be an integer index into the tapped layers, got {self.layer!r}")
        if not isinstance(self.r, int) or self.r < 1 or self.r % 2 == 0:
            raise InputError(f"consistent r must be an odd integer >= 1, got {self.r!r}")
        if not isinstance(self.min_clique, int) or self.min_clique < 1:
            raise InputError("min_clique must be an integer >= 1 (other images sharing a defect), "
                             f"got {self.min_clique!r}")
        if not 0.0 < float(self.max_fraction) < 1.0:
            raise InputError(f"max_fraction must be in (0, 1), got {self.max_fraction!r}")
        if not float(self.burnout) > 0.0:
            raise InputError(f"burnout must be > 0 (a factor of log2(tests)), got {self.burnout!r}")
        if not 0.0 < float(self.max_share) <= 1.0:
            raise InputError(f"max_share must be in (0, 1], got {self.max_share!r}")
        if not 0.0 <= float(self.min_purity) <= 1.0:
            raise InputError(f"min_purity must be in [0, 1], got {self.min_purity!r}")
        if not isinstance(self.min_patches, int) or self.min_patches < 1:
            raise InputError(f"min_patches must be an integer >= 1, got {self.min_patches!r}")

    def max_clique(self, n: int) -> int:
        """The largest k searched in a pool of ``n`` images (at least ``min_clique``)."""
        return max(self.min_clique, int(math.floor(self.max_fraction * (n - 1))))


DEFAULT_OPTIONS = ConsistentOptions()


@dataclass(frozen=True)
class ConsistentScores:
    """What :func:`score_tokens_consistent` returns: the scores with the exclusion, the (N, N) bool
    exclusion matrix itself and the groups it came from (sorted tuples of image indices)."""

    scores: Scores
    exclude: np.ndarray
    groups: tuple[tuple[int, ...], ...]


def distance_table(z: Any, *, precision: str = "exact", block_bytes: int = TABLE_BLOCK_BYTES) -> Any:
    """``D[i, m, j]``: distance of patch m of image i to its nearest patch of image j; +inf for j = i.

    z: (N, L, C) unit vectors (LNAMD output), any array API namespace; returns (N, L, N) float32 of
    that namespace. Each image pair is multiplied once (both directions from one product, as in
    MSM); blocks of images are sized so that one product holds about ``block_bytes``.
    """
    xp = array_namespace(z)
    if z.ndim != 3:
        raise InputError(f"distance_table needs (N, L, C) patch features, got shape {tuple(z.shape)}")
    n, L, _ = z.shape
    if n < 2:
        raise InputError(f"distance_table needs at least 2 images, got {n}")
    z = as_unit_float32(z)
    b = max(1, min(n, math.isqrt(max(1, int(block_bytes) // (8 * L * L)))))
    table = xp.full((n, L, n), math.inf, dtype=xp.float32, device=getattr(z, "device", None))
    for i0 in range(0, n, b):
        i1 = min(n, i0 + b)
        for j0 in range(i0, n, b):
            j1 = min(n, j0 + b)
            rows, cols = block_minima(z[i0:i1, ...], z[j0:j1, ...], want_cols=j0 != i0, diagonal=j0 == i0,
                                      precision=precision)
            table[i0:i1, :, j0:j1] = rows
            if j0 != i0:
                table[j0:j1, :, i0:i1] = cols
    return table


def _sorted_others(row: np.ndarray, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Image i's (L, N) distances without the self column: sorted ascending (float64) and the
    image index of each sorted entry (stable: equal distances keep image order)."""
    others = np.delete(np.arange(row.shape[1]), i)
    d = row[:, others].astype(np.float64)
    order = np.argsort(d, axis=1, kind="stable")
    return np.take_along_axis(d, order, axis=1), others[order]


def _gaps(s: np.ndarray, k_min: int, k_max: int) -> np.ndarray:
    """Rank-scaled log gaps ``t[:, k - k_min] = k ln(s_{k+1} / s_k)`` (1-indexed s), k in [k_min, k_max]."""
    k = np.arange(k_min, k_max + 1, dtype=np.float64)
    lo = np.maximum(s[:, k_min - 1:k_max], 1e-12)
    return k * np.log(np.maximum(s[:, k_min:k_max + 1], 1e-12) / lo)


def _host_rows(table: Any) -> Callable[[int], np.ndarray]:
    """Image i's (L, N) slice of the table as a numpy array (one image copied to the host at a time):
    CuPy's ``asnumpy``, else DLPack (the array API's interchange), else ``numpy.asarray``."""
    if isinstance(table, np.ndarray):
        return lambda i: table[i]
    to_host = getattr(array_namespace(table), "asnumpy", None)  # CuPy
    if to_host is not None:
        return lambda i: to_host(table[i])

    def row(i: int) -> np.ndarray:
        part = table[i, ...]
        try:
            return np.from_dlpack(part)
        except (TypeError, AttributeError, RuntimeError, BufferError):
            return np.asarray(part)

    return row


def gap_scales(table: Any, options: ConsistentOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """(K,) float64: for each searched k (``min_clique`` .. ``max_clique``), the pool's median of the
    rank-scaled gap ``t_k`` (median over images of each image's median over its patches).

    Under the paper's model (arXiv 2510.10456, sec. 4) ``t_k`` of a normal patch is exponential
    with the same scale at every k; on real features the scale drifts slowly with k (0.044 at
    k = 2 to 0.073 at k = 50 on MTD), so each k is measured in its own median.
    """
    n = table.shape[0]
    k_min, k_max = options.min_clique, min(options.max_clique(n), n - 2)
    if k_max < k_min:
        return np.zeros(0)
    row = _host_rows(table)
    per_image = np.stack([np.median(_gaps(_sorted_others(row(i), i)[0], k_min, k_max), axis=0) for i in range(n)])
    return np.median(per_image, axis=0)


def burnout_threshold(n: int, L: int, options: ConsistentOptions = DEFAULT_OPTIONS) -> float:
    """The gap (in medians of its k) a patch must reach to burn out: ``burnout * log2(tests)``,
    tests = N * L * (number of k searched). Were the gaps exactly exponential, a normal patch would
    pass ``log2(tests)`` with probability about 1 / tests (a median is ln 2 of the scale); real
    gaps have a heavier tail (the largest of 4.4 M on a 109-image MTD pool: 44 medians, 2.0 times
    log2(4.4 M)), hence the factor, 2 by default: what keeps a normal patch that passes it out
    of a group is the other two conditions (an anomalous remainder, links both ways)."""
    k_count = min(options.max_clique(n), n - 2) - options.min_clique + 1
    return float(options.burnout) * math.log2(max(2, n * L * max(1, k_count)))


def suspicious_links(table: Any, interval: tuple[float, float] = DEFAULT_PARAMS.interval,
                     options: ConsistentOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """(N, N) int32: ``links[i, j]`` = burnt-out patches of image i whose k* nearest images hold j.

    table: (N, L, N) from :func:`distance_table` (any namespace; read on the host one image at a
    time). A patch burns out at k*, the k of its largest gap ``t_k / median_k`` (:func:`gap_scales`),
    when that gap reaches :func:`burnout_threshold` and the MSM score it would have without its k*
    nearest images (the interval mean over its remaining N - 1 - k* others) reaches the pool's
    median image maximum of the plain score (the module docstring, step 2).
    """
    n, L = int(table.shape[0]), int(table.shape[1])
    links = np.zeros((n, n), dtype=np.int32)
    k_min, k_max = options.min_clique, min(options.max_clique(n), n - 2)
    if k_max < k_min:
        return links
    row = _host_rows(table)
    lo, hi = interval_bounds(n - 1, interval)
    scales = np.maximum(gap_scales(table, options), 1e-12)
    level = float(np.median([_sorted_others(row(i), i)[0][:, lo:hi].mean(axis=1).max() for i in range(n)]))
    threshold = burnout_threshold(n, L, options)
    for i in range(n):
        s, who = _sorted_others(row(i), i)
        t = _gaps(s, k_min, k_max) / scales
        best = np.argmax(t, axis=1)  # the first of equal gaps: the smallest k
        burnt = np.flatnonzero(t[np.arange(L), best] >= threshold)
        if burnt.size > options.max_share * L:
            continue  # the same part photographed again, not a defect carried by a few patches
        for m in burnt:
            k = int(best[m]) + k_min
            a, b = interval_bounds(n - 1 - k, interval)
            if s[m, k + a:k + b].mean() >= level:
                links[i, who[m, :k]] += 1
    return links


def clique_groups(links: np.ndarray, options: ConsistentOptions = DEFAULT_OPTIONS) -> tuple[tuple[int, ...], ...]:
    """Groups of images that vouch for each other both ways (the module docstring, step 4).

    Edges: ``links[i, j] >= min_patches`` and ``links[j, i] >= min_patches``. Each connected
    component is then pruned to its pure members: an image stays while at least ``min_purity`` of
    its links (``links[i].sum()``) point into the current group (the copies of one defect match
    each other and little else; a patch of a large group of similar normal images, which burns out
    after dozens of images, spends most of its links outside any small component). Groups: what
    is left with at least ``min_clique + 1`` images, each a sorted tuple, in the order of their
    smallest image.
    """
    links = np.asarray(links)
    if links.ndim != 2 or links.shape[0] != links.shape[1]:
        raise InputError(f"links must be a square (N, N) count matrix, got shape {links.shape}")
    n = links.shape[0]
    edge = (links >= options.min_patches) & (links.T >= options.min_patches)
    np.fill_diagonal(edge, False)
    total = links.sum(axis=1).astype(np.float64)
    seen = np.zeros(n, dtype=bool)
    groups = []
    for start in range(n):
        if seen[start] or not edge[start].any():
            continue
        stack, members = [start], []
        seen[start] = True
        while stack:
            v = stack.pop()
            members.append(v)
            for w in np.flatnonzero(edge[v] & ~seen):
                seen[w] = True
                stack.append(int(w))
        group = np.asarray(sorted(members), dtype=np.int64)
        while group.size:
            inside = links[np.ix_(group, group)].sum(axis=1)
            pure = inside >= options.min_purity * total[group]
            if pure.all():
                break
            group = group[pure]
        if group.size >= options.min_clique + 1:
            groups.append(tuple(int(v) for v in group))
    return tuple(groups)


def exclusion_matrix(groups: Sequence[Sequence[int]], n: int, links: np.ndarray | None = None,
                     options: ConsistentOptions = DEFAULT_OPTIONS) -> np.ndarray:
    """(N, N) bool for ``score_tokens(exclude=...)``: True for every pair of images in one group.

    A group larger than ``max_fraction`` of the pool (only a chain of links makes one) keeps its
    direct mutual edges instead (``links`` needed then). Every image then keeps at least
    ``(1 - max_fraction)`` of the pool to be scored by: an image excluded from more than
    ``max_clique(n)`` others (a hub of several overlapping groups) keeps only its strongest
    exclusions, ``min(links[i, j], links[j, i])`` first (ties by image index), so the filter
    never leaves an image without scorers.
    """
    exclude = np.zeros((n, n), dtype=bool)
    cap = options.max_clique(n) + 1
    for group in groups:
        g = np.asarray(sorted(int(v) for v in group), dtype=np.int64)
        if g.size and (g.min() < 0 or g.max() >= n):
            raise InputError(f"group {tuple(g)} names an image outside the pool of {n}")
        if g.size <= cap or links is None:
            exclude[np.ix_(g, g)] = True
        else:
            sub = links[np.ix_(g, g)]
            exclude[np.ix_(g, g)] = (sub >= options.min_patches) & (sub.T >= options.min_patches)
    np.fill_diagonal(exclude, False)
    limit = max(1, min(options.max_clique(n), n - 2))
    for i in np.flatnonzero(exclude.sum(axis=1) > limit):
        js = np.flatnonzero(exclude[i])
        strength = np.minimum(links[i, js], links[js, i]) if links is not None else np.zeros(js.size)
        keep = js[np.lexsort((js, -strength))[:limit]]  # strongest first, then the lower index
        exclude[i] = False
        exclude[i, keep] = True
    return exclude


def consistent_exclusions(layer_tokens: Sequence[Any], params: MuscParams = DEFAULT_PARAMS,
                          options: ConsistentOptions = DEFAULT_OPTIONS, *, precision: str = "exact",
                          ) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """The (N, N) bool exclusion matrix of the pool's consistent-anomaly groups, and the groups.

    layer_tokens: as :func:`musc_edge.core.scorer.score_tokens` takes them (validated the same
    way); the search runs on ``layer_tokens[options.layer]`` at LNAMD degree ``options.r`` with
    ``params.interval``. An ordinary pool gives an all-False matrix and no groups.
    """
    n, _ = validate_layer_tokens(layer_tokens)
    layers = list(layer_tokens)
    if not -len(layers) <= options.layer < len(layers):
        raise InputError(f"consistent layer {options.layer} is out of range for {len(layers)} tapped layers")
    table = distance_table(lnamd(layers[options.layer], options.r), precision=precision)
    return exclusions_from_table(table, params.interval, options)


def exclusions_from_table(table: Any, interval: tuple[float, float] = DEFAULT_PARAMS.interval,
                          options: ConsistentOptions = DEFAULT_OPTIONS,
                          ) -> tuple[np.ndarray, tuple[tuple[int, ...], ...]]:
    """Steps 2-4 of the module docstring on a :func:`distance_table`: the (N, N) bool exclusion
    matrix and the groups (one table can so be searched with several ``options``)."""
    if getattr(table, "ndim", None) != 3 or table.shape[0] != table.shape[2]:
        raise InputError(f"table must be (N, L, N) from distance_table, got shape {tuple(getattr(table, 'shape', ()))}")
    n = int(table.shape[0])
    links = suspicious_links(table, interval, options)
    groups = clique_groups(links, options)
    return check_exclude(exclusion_matrix(groups, n, links, options), n), groups


def score_tokens_consistent(layer_tokens: Sequence[Any], embeddings: Any = None, *,
                            params: MuscParams = DEFAULT_PARAMS, options: ConsistentOptions = DEFAULT_OPTIONS,
                            mem_budget_bytes: int = 1 << 30, device: Any = "cpu", precision: str = "exact",
                            progress: Callable[[int, int], None] | None = None) -> ConsistentScores:
    """:func:`~musc_edge.core.scorer.score_tokens` with the pool's consistent-anomaly groups taken
    out of each other's intervals (:func:`consistent_exclusions`); the same arguments, plus
    ``options``. The search runs on the host (numpy); the scoring on ``device``."""
    exclude, groups = consistent_exclusions(layer_tokens, params, options, precision=precision)
    scores = score_tokens(layer_tokens, embeddings, params=params, mem_budget_bytes=mem_budget_bytes,
                          device=device, precision=precision, progress=progress,
                          exclude=exclude if exclude.any() else None)
    return ConsistentScores(scores=scores, exclude=exclude, groups=groups)


class ConsistentScoreStep:
    """A batch score step (:data:`musc_edge.core.pools.ScoreStep`) that filters consistent
    anomalies: ``musc-edge score --repeated-defects filter``. It keeps the groups it found in
    :attr:`groups` (pool indices) for the run's record."""

    __name__ = "batch_repeated_defects"

    def __init__(self, options: ConsistentOptions = DEFAULT_OPTIONS) -> None:
        self.options = options
        self.groups: tuple[tuple[int, ...], ...] = ()

    def __call__(self, tokens: Sequence[Any], embedding: Any, params: MuscParams, device: Any = "cpu",
                 progress: Callable[[int, int], None] | None = None) -> Scores:
        result = score_tokens_consistent(list(tokens), embedding, params=params, options=self.options,
                                         device=device, precision=getattr(device, "precision", "exact"),
                                         progress=progress)
        self.groups = result.groups
        return result.scores
