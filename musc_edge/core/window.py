"""Rolling-window MuSc: score each new image against the last W images at a cost linear in W.

Batch MuSc (MUSC_SPEC 3) compares every image of a pool with every other one: N^2 / 2 pair
products per pool. On a line the pool is a sliding window, and consecutive windows share all but
one image, so almost all of those pair products are already known. This module keeps them:

- for every image in the pool and every (tapped layer, aggregation degree r), its LNAMD features
  Z (L, C) (MUSC_SPEC 2);
- for every ordered pair (i, j) of images in the pool, the min-distance vector d_ij (L,): the
  distance of each patch of i to its nearest patch of j (MUSC_SPEC 3).

Adding an image costs one matrix product per (other image, layer, r), which gives both d_new,j and
d_j,new (the row and column minima, MUSC_SPEC 3); evicting one is bookkeeping. The MSM map of an
image is then an interval mean over the d_ij rows it already has, a selection (``np.partition``)
over W values per patch. The maps equal :func:`musc_edge.core.scorer.score_tokens` over the same pool.

Three layers:

- :class:`PoolWindow`: the pool itself (add, evict, maps, RsCIN), keyed by a caller-chosen integer
  ``seq``. It knows nothing of order or emission.
- :class:`RollingScorer`: the streaming policy on top (MUSC_SPEC 8): a window of the last
  ``capacity`` stream images plus fixed reference images, reporting each image once ``delay`` newer
  images have arrived and the pool holds ``min_pool`` images, oldest first (``watch``).
- :class:`CentredStream`: a finite stream fed one image at a time, each image scored against a
  window centred on it (``score --window``; :func:`stream_scores` for tokens already in memory).

Adding is split into :meth:`RollingScorer.prepare` (pure: computes an :class:`Entry` holding the new
image's features and its pair rows) and :meth:`RollingScorer.push` (applies it), so that a caller
can store the entry durably in between and replay it after a crash without the backbone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from .device import CPU, ScoreDevice, resolve_device
from .errors import InputError, StateError
from .lnamd import lnamd, patch_grid
from .memory import DEFAULT_SHARE, Footprint, check_fits, pool_footprint
from .msm import check_interval, pair_block_bytes
from .pairs import block_minima, interval_mean
from .params import DEFAULT_PARAMS, MuscParams
from .rscin import rscin
from .scorer import score_tokens
from .types import Scores

#: Bytes of one product block when a new image is scored against the pool (its pair rows), on a
#: CPU (cache sized) and on a GPU (one launch should fill it); and of one chunk of the selection.
_PREPARE_BLOCK_BYTES = 8 << 20
_GPU_PREPARE_BLOCK_BYTES = 1 << 30
_GPU_SELECT_BYTES = 256 << 20


@dataclass(frozen=True)
class Entry:
    """One image ready to join the pool: its features and its pair rows against the pool.

    seq: the caller's key of the image (unique, increasing for stream images).
    tokens: one (1 + G*G, C_l) array per tapped layer, as the backbone returned them.
    embedding: (D,) image embedding for RsCIN (MUSC_SPEC 5).
    partners: seqs of the images the rows below were computed against.
    d_out: (P, Q, L) float32, d_new,j: patches of the new image scored by partner j.
    d_in: (P, Q, L) float32, d_j,new: patches of partner j scored by the new image.
    info: JSON-able data the caller wants back with the image's emission (path, times).
    z: the LNAMD features, one (L, C) array per (layer, r); recomputed from ``tokens`` when absent.
    """

    seq: int
    tokens: tuple[np.ndarray, ...]
    embedding: np.ndarray
    partners: np.ndarray
    d_out: np.ndarray
    d_in: np.ndarray
    info: dict = field(default_factory=dict)
    z: tuple[np.ndarray, ...] | None = None

    def to_host(self) -> "Entry":
        """This entry with its rows as numpy arrays and without its device features (what a
        journal stores: ``z`` is recomputed from the tokens when the entry is replayed)."""
        if isinstance(self.d_out, np.ndarray) and isinstance(self.d_in, np.ndarray) and self.z is None:
            return self
        return replace(self, d_out=_host(self.d_out), d_in=_host(self.d_in), z=None)


def _host(x: Any) -> np.ndarray:
    """numpy copy of a numpy or CuPy array (CuPy refuses the implicit ``np.asarray``)."""
    return x if isinstance(x, np.ndarray) else x.get()


@dataclass(frozen=True)
class Emission:
    """The scores of one image, reported once (MUSC_SPEC 3-5 over the pool at that moment).

    patch_map: (G, G) float64 MSM map. raw_score: its max. image_score: after RsCIN over the pool.
    pool_size: images in the pool (references included) when it was scored.
    map_range: (min, max) over all the pool's maps then, a shared colour scale for heatmaps.
    """

    seq: int
    info: dict
    patch_map: np.ndarray
    raw_score: float
    image_score: float
    pool_size: int
    map_range: tuple[float, float]


class PoolWindow:
    """A pool of at most ``slots`` images with their LNAMD features and pair min-distances.

    Storage is preallocated, so memory does not grow with the number of images seen, and its size
    is checked against a budget before anything is allocated (:mod:`musc_edge.core.memory`):
    ``z[q]``: (slots, L, C_q) float32 per (layer, r) combination q;
    ``d``: (slots, Q, L, slots) float32 with d[i, q, :, j] = d_ij for layer/r q. Entries of free
    slots and the diagonal hold +inf: an interval mean over the ascending distances never reaches
    them (its upper bound is at most N - 1, MUSC_SPEC 3), so a row needs no masking.
    """

    def __init__(self, grid: int, token_dims: Sequence[int], embed_dim: int, slots: int, *,
                 params: MuscParams = DEFAULT_PARAMS, mem_budget_bytes: int | None = None,
                 what: str = "the pool", reserved_slots: int = 0,
                 device: str | ScoreDevice = CPU) -> None:
        if slots < 2:
            raise InputError(f"a pool needs room for at least 2 images, got {slots}")
        self.grid = int(grid)
        self.token_dims = tuple(int(c) for c in token_dims)
        self.embed_dim = int(embed_dim)
        self.slots = int(slots)
        self.params = params
        #: (layer index, r) for each combination q, layer-major like the batch scorer
        self.combos = params.combos(len(self.token_dims))
        self.device = resolve_device(device)
        self.footprint = check_pool_memory(self.slots, self.grid, self.token_dims, len(params.r_list), self.embed_dim,
                                           mem_budget_bytes, self.device, what=what, reserved_slots=reserved_slots)
        xp = self.xp = self.device.xp
        n_patches = self.grid * self.grid
        self._z = [xp.zeros((self.slots, n_patches, self.token_dims[layer]), dtype=xp.float32)
                   for layer, _ in self.combos]
        self._d = xp.full((self.slots, len(self.combos), n_patches, self.slots), np.inf, dtype=xp.float32)
        self._emb = xp.zeros((self.slots, self.embed_dim), dtype=xp.float32)
        self._slot_of: dict[int, int] = {}  # seq -> slot, in insertion order
        self._free = list(range(self.slots - 1, -1, -1))

    # --- contents ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def nbytes(self) -> int:
        """Bytes of the preallocated arrays: fixed for the pool's life, whatever streams through."""
        return self._d.nbytes + self._emb.nbytes + sum(z.nbytes for z in self._z)

    @property
    def seqs(self) -> list[int]:
        """Seqs of the images in the pool, in the order they were added."""
        return list(self._slot_of)

    # --- adding -----------------------------------------------------------------------------
    def features(self, tokens: Sequence[np.ndarray]) -> tuple[Any, ...]:
        """LNAMD features of one image, one (L, C) array per combination (MUSC_SPEC 2), computed
        on the pool's device (one upload of the image's tokens)."""
        if len(tokens) != len(self.token_dims):
            raise InputError(f"expected tokens of {len(self.token_dims)} tapped layers, got {len(tokens)}")
        out = []
        for layer, r in self.combos:
            t = np.asarray(tokens[layer])
            expect = (1 + self.grid * self.grid, self.token_dims[layer])
            if t.shape != expect:
                raise InputError(f"layer {layer}: expected tokens of shape {expect}, got {t.shape}; "
                                 "the model does not match this pool")
            out.append(lnamd(self.device.asarray(t[None]), r)[0])
        return tuple(out)

    def prepare(self, seq: int, tokens: Sequence[np.ndarray], embedding: np.ndarray, *,
                partners: Sequence[int] | None = None, info: dict | None = None) -> Entry:
        """Compute an image's entry against ``partners`` (default: the whole pool). Pure.

        One product per (partner, combination) gives both directions (MUSC_SPEC 3) through the
        pair kernel (:func:`musc_edge.core.pairs.block_minima`), so the cost is linear in the
        number of partners. The products run against whole blocks of slots in place (no gather);
        rows of slots that are not partners are dropped.
        """
        emb = np.asarray(embedding, np.float32).reshape(-1)
        if emb.shape != (self.embed_dim,):
            raise InputError(f"expected an embedding of {self.embed_dim} values, got {emb.shape}")
        z = self.features(tokens)
        partners = np.asarray(self.seqs if partners is None else list(partners), np.int64)
        slots = np.asarray([self._slot_of[int(s)] for s in partners], np.int64)
        xp, n_patches = self.xp, self.grid * self.grid
        d_out = xp.empty((len(partners), len(self.combos), n_patches), dtype=xp.float32)
        d_in = xp.empty_like(d_out)
        if len(slots):
            hi = int(slots.max()) + 1
            block = _PREPARE_BLOCK_BYTES if not self.device.is_gpu else _GPU_PREPARE_BLOCK_BYTES
            step = max(1, block // pair_block_bytes(n_patches))
            take = self.device.asarray(slots)
            for q in range(len(self.combos)):
                out_q = xp.empty((n_patches, hi), dtype=xp.float32)
                in_q = xp.empty((hi, n_patches), dtype=xp.float32)
                for j0 in range(0, hi, step):
                    j1 = min(hi, j0 + step)
                    rows, cols = block_minima(z[q][None], self._z[q][j0:j1], precision=self.device.precision,
                                              radius=self.params.match_radius)
                    out_q[:, j0:j1] = rows[0]
                    in_q[j0:j1] = cols[:, :, 0]
                d_out[:, q] = xp.take(out_q.T, take, axis=0)
                d_in[:, q] = xp.take(in_q, take, axis=0)
        return Entry(int(seq), tuple(np.asarray(t) for t in tokens), emb, partners, d_out, d_in,
                     dict(info or {}), z)

    def add(self, entry: Entry) -> None:
        """Put an entry into a free slot. Its rows must cover every image now in the pool.

        Rows against partners that have left since the entry was prepared are ignored, which is
        what lets a saved pool be rebuilt by replaying its entries in order.
        """
        if entry.seq in self._slot_of:
            raise StateError(f"image {entry.seq} is already in the pool")
        if not self._free:
            raise StateError(f"the pool is full ({self.slots} images); evict one first")
        row_of = {int(s): p for p, s in enumerate(entry.partners.tolist())}
        missing = [s for s in self._slot_of if s not in row_of]
        if missing:
            raise StateError(f"image {entry.seq} was prepared without pair rows for images {missing[:5]}")
        z = entry.z if entry.z is not None else self.features(entry.tokens)
        slot = self._free.pop()
        for q in range(len(self.combos)):
            self._z[q][slot] = self.device.asarray(z[q])
        self._emb[slot] = self.device.asarray(entry.embedding)
        if self._slot_of:  # the rows of the images now in the pool, in one scatter per direction
            rows = self.device.asarray(np.asarray([row_of[s] for s in self._slot_of], np.int64))
            others = self.device.asarray(np.asarray(list(self._slot_of.values()), np.int64))
            d_out, d_in = self.device.asarray(entry.d_out), self.device.asarray(entry.d_in)
            # numpy's (and CuPy's) rule: the scalar and the index array are split by slices, so the
            # indexed dimension comes first: the target is (P, Q, L), like the rows themselves
            self._d[slot, :, :, others] = self.xp.take(d_out, rows, axis=0)
            self._d[others, :, :, slot] = self.xp.take(d_in, rows, axis=0)
        self._slot_of[entry.seq] = slot

    def evict(self, seq: int) -> None:
        """Drop an image: its slot's rows and columns go back to +inf."""
        slot = self._slot_of.pop(seq)
        self._d[slot] = np.inf
        self._d[:, :, :, slot] = np.inf
        self._free.append(slot)

    # --- scoring ----------------------------------------------------------------------------
    def patch_maps(self, seqs: Sequence[int]) -> np.ndarray:
        """(len(seqs), G, G) float64 MSM maps against the rest of the pool (MUSC_SPEC 3).

        Cost per image: one selection over its (Q, L, slots) row of d, linear in the pool size
        (:func:`musc_edge.core.pairs.interval_mean`, the batch MSM's own). Images are taken in
        chunks of about 4 MB so the temporary copy stays small.
        """
        n = len(self._slot_of)
        if n < 2:
            raise InputError(f"MuSc needs at least 2 images in the pool, got {n}")
        lo, hi = check_interval(n, self.params.interval)
        return self.device.to_host(self._patch_maps(seqs, lo, hi))

    def _patch_maps(self, seqs: Sequence[int], lo: int, hi: int) -> Any:
        """The maps in the pool's namespace, (len(seqs), G, G) float64."""
        xp = self.xp
        slots = np.asarray([self._slot_of[s] for s in seqs], np.int64)
        row_bytes = int(np.prod(self._d.shape[1:])) * 4
        chunk = max(1, (_GPU_SELECT_BYTES if self.device.is_gpu else 4 << 20) // row_bytes)
        parts = []
        for c0 in range(0, len(slots), chunk):
            rows = xp.take(self._d, self.device.asarray(slots[c0:c0 + chunk]), axis=0)  # self/free slots: +inf
            parts.append(xp.mean(interval_mean(rows, lo, hi), axis=1))  # (c, Q, L) -> mean over layers and r
        out = parts[0] if len(parts) == 1 else xp.concat(parts, axis=0)
        return xp.reshape(out, (len(slots), self.grid, self.grid))

    def score_all(self) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
        """Score the whole pool: (seqs, patch maps (N, G, G), raw scores (N,), RsCIN scores (N,)).

        RsCIN (MUSC_SPEC 5) needs every image's raw score, so this is N selections.
        """
        seqs = self.seqs
        n = len(seqs)
        if n < 2:
            raise InputError(f"MuSc needs at least 2 images in the pool, got {n}")
        lo, hi = check_interval(n, self.params.interval)
        xp = self.xp
        maps = self._patch_maps(seqs, lo, hi)
        raw = xp.max(xp.reshape(maps, (n, -1)), axis=1)
        emb = xp.take(self._emb, self.device.asarray(np.asarray([self._slot_of[s] for s in seqs], np.int64)), axis=0)
        final = rscin(raw, emb, self.params.k_list)
        return seqs, self.device.to_host(maps), self.device.to_host(raw), self.device.to_host(final)


def check_pool_memory(slots: int, grid: int, token_dims: Sequence[int], n_r: int, embed_dim: int,
                      mem_budget_bytes: int | None, device: ScoreDevice, *, what: str,
                      reserved_slots: int = 0) -> Footprint:
    """The footprint of a pool of ``slots`` images, refused with one line if over the budget.

    The default budget is a share of the memory the pool will live in: the host's
    (:func:`musc_edge.core.memory.default_budget`) or, on a GPU, the device's free memory.
    """
    fp = pool_footprint(slots, int(grid) ** 2, token_dims, n_r, embed_dim)
    if mem_budget_bytes is None and device.is_gpu:
        mem_budget_bytes = int(device.free_bytes() * DEFAULT_SHARE)
    check_fits(fp, mem_budget_bytes, what=what, reserved_slots=reserved_slots)
    return fp


def check_stream_settings(capacity: int, delay: int, min_pool: int, n_references: int = 0) -> None:
    """Refuse settings under which an image could leave the window unreported, or never be."""
    if capacity < 1:
        raise InputError(f"--window must be at least 1, got {capacity}")
    if not 0 <= delay < capacity:
        raise InputError(f"--delay must be in [0, window) = [0, {capacity}), got {delay}")
    pool_max = capacity + n_references
    if pool_max < 2:
        raise InputError(f"--window {capacity} with no reference image leaves a pool of one: MuSc scores an image "
                         "against other images, so use --window 2 or more, or add --reference DIR")
    if not 2 <= min_pool <= pool_max:
        raise InputError(f"--min-pool must be in [2, window + references] = [2, {pool_max}], got {min_pool}")


class RollingScorer:
    """Streaming emission over a :class:`PoolWindow` (MUSC_SPEC 8).

    The pool is the ``references`` (added first, never evicted, never reported) plus the last
    ``capacity`` stream images. A stream image is reported once ``delay`` newer images have arrived
    (delay 0: at once, against the images before it) and the pool holds ``min_pool`` images;
    reports come oldest first, so a backlog drains in order. Because ``delay < capacity``, an
    image is always reported before it leaves the window.
    """

    def __init__(self, grid: int, token_dims: Sequence[int], embed_dim: int, *, capacity: int,
                 delay: int = 0, min_pool: int = 8, n_references: int = 0,
                 params: MuscParams = DEFAULT_PARAMS, mem_budget_bytes: int | None = None,
                 device: str | ScoreDevice = CPU) -> None:
        check_stream_settings(capacity, delay, min_pool, n_references)
        pool_max = capacity + n_references
        self.capacity = int(capacity)
        self.delay = int(delay)
        self.min_pool = int(min_pool)
        self.n_references = int(n_references)
        what = f"--window {capacity}" + (f" with {n_references} references" if n_references else "")
        self.pool = PoolWindow(grid, token_dims, embed_dim, pool_max, params=params,
                               mem_budget_bytes=mem_budget_bytes, what=what, reserved_slots=n_references,
                               device=device)
        self.references: list[int] = []
        self.stream: deque[int] = deque()  # stream seqs in the pool, oldest first
        self.pending: deque[int] = deque()  # stream seqs not yet reported, oldest first
        self._info: dict[int, dict] = {}

    def add_reference(self, entry: Entry) -> None:
        """Seed the pool with a known-good image; allowed only before the stream starts."""
        if self.stream:
            raise StateError("reference images must be added before the first stream image")
        if len(self.references) >= self.n_references:
            raise StateError(f"this scorer was set up for {self.n_references} reference images")
        self.pool.add(entry)
        self.references.append(entry.seq)

    def evictee(self) -> int | None:
        """The stream image that the next push will evict (None while the window has room)."""
        return self.stream[0] if len(self.stream) >= self.capacity else None

    def prepare(self, seq: int, tokens: Sequence[np.ndarray], embedding: np.ndarray,
                info: dict | None = None) -> Entry:
        """Compute the entry of a new image against the images that stay when it arrives. Pure."""
        if self.stream and seq <= self.stream[-1]:
            raise StateError(f"stream images must arrive with increasing seq ({seq} after {self.stream[-1]})")
        leaving = self.evictee()
        partners = [s for s in self.pool.seqs if s != leaving]
        return self.pool.prepare(seq, tokens, embedding, partners=partners, info=info)

    def push(self, entry: Entry) -> list[Emission]:
        """Apply a prepared entry: evict the oldest image if the window is full, add, report."""
        leaving = self.evictee()
        if leaving is not None:
            if self.pending and self.pending[0] == leaving:  # cannot happen with delay < capacity
                raise StateError(f"image {leaving} would leave the window unreported")
            self.pool.evict(self.stream.popleft())
            self._info.pop(leaving, None)
        self.pool.add(entry)
        self.stream.append(entry.seq)
        self.pending.append(entry.seq)
        self._info[entry.seq] = dict(entry.info)
        return self._emit(lambda seq: self._newer(seq) >= self.delay and len(self.pool) >= self.min_pool)

    def flush(self) -> list[Emission]:
        """Report every pending image now (end of a finite stream), if the pool can score at all."""
        if len(self.pool) < 2:
            return []
        return self._emit(lambda seq: True)

    def _newer(self, seq: int) -> int:
        """How many stream images arrived after ``seq`` (all still in the window)."""
        return len(self.stream) - 1 - self.stream.index(seq)

    def _emit(self, ready) -> list[Emission]:
        due = []
        while self.pending and ready(self.pending[0]):
            due.append(self.pending.popleft())
        if not due:
            return []
        seqs, maps, raw, final = self.pool.score_all()
        index = {s: i for i, s in enumerate(seqs)}
        map_range = (float(maps.min()), float(maps.max()))
        # copies: a view would keep the whole pool's maps alive for as long as the caller keeps one
        return [Emission(s, self._info[s], maps[index[s]].copy(), float(raw[index[s]]), float(final[index[s]]),
                         len(seqs), map_range) for s in due]

    def state(self) -> dict[str, Any]:
        """The order bookkeeping (JSON-able); the features live in the entries."""
        return {"references": list(self.references), "stream": list(self.stream),
                "pending": list(self.pending)}

    def restore(self, state: dict, entries: dict[int, Entry]) -> None:
        """Fill this empty scorer from :meth:`state` and the entries of its pool (any order).

        Entries are replayed oldest first; each one's rows cover every older image still present,
        so replay gives the same pool as before, without recomputing any pair.
        """
        if len(self.pool):
            raise StateError("restore needs an empty scorer")
        for seq in state["references"]:
            self.add_reference(entries[seq])
        for seq in state["stream"]:
            self.pool.add(entries[seq])
            self.stream.append(seq)
            self._info[seq] = dict(entries[seq].info)
        pending = [int(s) for s in state["pending"]]
        if any(s not in self.stream for s in pending):
            raise StateError("saved state lists pending images that are not in the window")
        self.pending.extend(pending)


class CentredStream:
    """A finite stream of images scored through a centred rolling window, fed one image at a time.

    This is ``musc-edge score --window W``: image i is reported once ``W // 2`` newer images have
    arrived, so it is scored against a window centred on it (W // 2 newer images, the rest older;
    the last ones against the final window): O(N * W) pair products instead of batch MuSc's
    O(N^2) (MUSC_SPEC 3, 8). Optional ``references`` (known-good images, added first) stay in the
    pool throughout, as in ``watch --reference``.

    Nothing is kept per image but its result: while at most ``window`` stream images have arrived
    their tokens are buffered, because a stream that ends there is one pool and is scored exactly
    like batch MuSc (:func:`musc_edge.core.scorer.score_tokens`, the same numbers as without a window).
    The (W+1)-th image starts a :class:`RollingScorer` (capacity W, delay W // 2): the buffer is
    pushed into it and dropped, and from then on each image goes straight in. So at most
    ``window + references`` images' tokens are ever held (:attr:`peak_held`), besides the one
    being pushed, plus the scorer's fixed-size :class:`PoolWindow` and, per reported image, its
    G x G map and two scores.
    """

    def __init__(self, grid: int, token_dims: Sequence[int], embed_dim: int, *, window: int,
                 params: MuscParams = DEFAULT_PARAMS, mem_budget_bytes: int | None = None,
                 n_references: int = 0, device: str | ScoreDevice = CPU) -> None:
        if window < 2:
            raise InputError(f"--window must be at least 2, got {window}")
        self.grid, self.token_dims, self.embed_dim = int(grid), tuple(token_dims), int(embed_dim)
        self.window = int(window)
        self.params = params
        self.mem_budget_bytes = mem_budget_bytes
        self.device = resolve_device(device)
        # Refused now, not when image W + 1 arrives: the pool's size is known from the settings.
        check_pool_memory(self.window + n_references, self.grid, self.token_dims, len(params.r_list), self.embed_dim,
                          mem_budget_bytes, self.device, what=f"--window {self.window}", reserved_slots=n_references)
        self._refs: list[tuple[tuple[np.ndarray, ...], np.ndarray]] = []
        self._buffer: list[tuple[tuple[np.ndarray, ...], np.ndarray]] = []
        self._scorer: RollingScorer | None = None
        self._maps: list[np.ndarray | None] = []
        self._raw: list[float] = []
        self._final: list[float] = []
        self.peak_held = 0  #: most images whose tokens were held at once (references included)

    def __len__(self) -> int:
        """Stream images pushed so far."""
        return len(self._maps)

    @property
    def held(self) -> int:
        """Images whose tokens are held now (the buffer and the references before the scorer starts)."""
        return len(self._refs) + len(self._buffer)

    def add_reference(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """A known-good image that seeds the pool and is never reported; before the first push."""
        if self._maps:
            raise StateError("reference images must be added before the first stream image")
        self._refs.append((tuple(tokens), np.asarray(embedding)))
        self.peak_held = max(self.peak_held, self.held)

    def push(self, tokens: Sequence[np.ndarray], embedding: np.ndarray) -> None:
        """Add the next image: tokens (1 + G*G, C_l) per tapped layer, embedding (D,)."""
        seq = len(self._maps)
        self._maps.append(None)
        self._raw.append(np.nan)
        self._final.append(np.nan)
        if self._scorer is None and len(self._buffer) < self.window:
            self._buffer.append((tuple(tokens), np.asarray(embedding)))
            self.peak_held = max(self.peak_held, self.held)
            return
        if self._scorer is None:  # image W + 1: more than one window after all
            self._start()
        self._record(self._scorer.push(self._scorer.prepare(seq, tokens, embedding)))

    def finish(self) -> Scores:
        """Report the images still pending and return every stream image's scores, in order."""
        n = len(self._maps)
        if self._scorer is None:  # the whole stream fits one window: batch MuSc over it
            images = self._refs + self._buffer
            if len(images) < 2:
                raise InputError(f"MuSc scores images against each other and needs >= 2, got {len(images)}")
            pool = score_tokens([np.stack([img[0][layer] for img in images]) for layer in range(len(self.token_dims))],
                                np.stack([img[1] for img in images]), params=self.params, device=self.device)
            skip = len(self._refs)
            self._refs, self._buffer = [], []
            return Scores(pool.patch_maps[skip:], pool.image_scores_raw[skip:], pool.image_scores[skip:])
        self._record(self._scorer.flush())
        if any(m is None for m in self._maps):  # cannot happen: delay < window and flush reports the rest
            raise StateError(f"stream scoring reported {sum(m is not None for m in self._maps)} of {n} images")
        return Scores(np.stack(self._maps), np.asarray(self._raw, np.float64), np.asarray(self._final, np.float64))

    def _start(self) -> None:
        """More images than one window: from now on each image goes through the rolling scorer."""
        self._scorer = RollingScorer(self.grid, self.token_dims, self.embed_dim, capacity=self.window,
                                     delay=self.window // 2, min_pool=2, n_references=len(self._refs),
                                     params=self.params, mem_budget_bytes=self.mem_budget_bytes, device=self.device)
        n_refs = len(self._refs)
        for i in range(n_refs):  # popped as they go in: their LNAMD features now live in the pool
            tokens, embedding = self._refs.pop(0)
            self._scorer.add_reference(self._scorer.pool.prepare(i - n_refs, tokens, embedding))
        for seq in range(len(self._buffer)):
            tokens, embedding = self._buffer.pop(0)
            self._record(self._scorer.push(self._scorer.prepare(seq, tokens, embedding)))

    def _record(self, emissions: list[Emission]) -> None:
        for e in emissions:
            self._maps[e.seq], self._raw[e.seq], self._final[e.seq] = e.patch_map, e.raw_score, e.image_score


def stream_scores(layer_tokens: Sequence[np.ndarray], embedding: np.ndarray, *, window: int,
                  params: MuscParams = DEFAULT_PARAMS, mem_budget_bytes: int | None = None,
                  device: str | ScoreDevice = CPU) -> Scores:
    """Score N images, held in memory, in their given order as a stream (:class:`CentredStream`).

    Each image is scored against a centred window (``window // 2`` newer images, the rest older;
    the last ones against the final window), so the scoring costs O(N * W) pair products instead
    of batch MuSc's O(N^2). With N <= window the whole set is one pool and this is
    :func:`musc_edge.core.scorer.score_tokens`.
    layer_tokens: (N, 1 + G*G, C_l) per tapped layer; embedding: (N, D). Returns Scores in order.
    """
    embedding = np.asarray(embedding)
    stream = CentredStream(patch_grid(layer_tokens[0].shape[1]), [t.shape[2] for t in layer_tokens],
                           embedding.shape[1], window=window, params=params, mem_budget_bytes=mem_budget_bytes,
                           device=device)
    for i in range(embedding.shape[0]):
        stream.push([t[i] for t in layer_tokens], embedding[i])
    return stream.finish()
