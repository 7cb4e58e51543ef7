"""Batch composition of the MuSc scorer: tokens -> patch maps -> image scores (MUSC_SPEC 2-5).

``score_tokens`` is the public entry point used by the CLI, the runtime and the window scorer.
It runs LNAMD then MSM for one (layer, r) at a time and adds the result into one running
(N, L) float64 sum, so peak memory is one LNAMD array plus MSM's budget, never all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .device import ScoreDevice, resolve_device
from .errors import InputError
from .lnamd import lnamd, patch_grid
from .msm import check_interval, msm
from .params import DEFAULT_PARAMS, MuscParams
from .rscin import rscin
from .types import Scores

__all__ = ["score_tokens", "upsample_map", "validate_layer_tokens"]


def validate_layer_tokens(layer_tokens: Sequence[np.ndarray]) -> tuple[int, int]:
    """Check the tapped-layer token arrays once, where they enter; return (N, G).

    Every layer must be (N, 1 + G*G, C_l) with the same N and G (C may differ between layers),
    float16/float32/float64, finite, and N >= 2.
    """
    if isinstance(layer_tokens, np.ndarray):
        raise InputError(
            "layer_tokens must be a sequence of (N, 1 + G*G, C) arrays, one per tapped layer; "
            f"got one array of shape {layer_tokens.shape}: wrap it in a list"
        )
    layers = list(layer_tokens)
    if not layers:
        raise InputError("layer_tokens is empty: pass at least one tapped layer's tokens")
    n_ref = g_ref = None
    for i, t in enumerate(layers):
        t = np.asarray(t)
        if t.ndim != 3:
            raise InputError(f"layer {i}: tokens must be (N, 1 + G*G, C), got shape {t.shape}")
        if not np.issubdtype(t.dtype, np.floating):
            raise InputError(f"layer {i}: tokens must be float16/float32, got dtype {t.dtype}")
        try:
            g = patch_grid(t.shape[1])
        except InputError as exc:
            raise InputError(f"layer {i}: tokens shape {t.shape}: {exc}") from None
        n = t.shape[0]
        if n_ref is None:
            n_ref, g_ref = n, g
        elif n != n_ref or g != g_ref:
            raise InputError(
                f"layer {i}: shape {t.shape} disagrees with layer 0 (N={n_ref}, grid {g_ref}x{g_ref}); "
                "all tapped layers must come from the same images and grid"
            )
        if not all(np.isfinite(image).all() for image in t):  # per image: no layer-sized mask
            raise InputError(
                f"layer {i}: tokens contain NaN or inf (shape {t.shape}); check the backbone export "
                "(float16 overflow?) and the input images"
            )
    if n_ref < 2:
        raise InputError(f"MuSc scores a pool against itself: need at least 2 images, got {n_ref}")
    return int(n_ref), int(g_ref)


def score_tokens(
    layer_tokens: Sequence[np.ndarray],
    embeddings: np.ndarray | None = None,
    *,
    params: MuscParams = DEFAULT_PARAMS,
    mem_budget_bytes: int = 1 << 30,
    device: str | ScoreDevice | None = "cpu",
    precision: str = "exact",
    progress: Callable[[int, int], None] | None = None,
    exclude: np.ndarray | None = None,
    valid: np.ndarray | None = None,
) -> Scores:
    """Score a pool of images from their tapped-layer tokens (MUSC_SPEC 2-5).

    layer_tokens: one (N, 1 + G*G, C_l) array per tapped layer, float16 or float32; token 0 (CLS)
        is dropped.
    embeddings: (N, D) L2-normalised image embeddings for RsCIN, or None (then
        ``image_scores == image_scores_raw``).
    params: r list, MSM interval and RsCIN k list (:class:`musc_edge.core.params.MuscParams`);
    mem_budget_bytes: MSM's extra-memory bound.
    device: where to score: ``cpu``, ``cuda`` (CuPy; each layer's tokens are uploaded once, LNAMD,
        MSM, the map mean and RsCIN run there and only the maps and scores come back), ``auto``,
        or a :class:`~musc_edge.core.device.ScoreDevice`. precision: ``exact`` or ``fast``
        (:mod:`musc_edge.core.device`).
    exclude: optional (N, N) bool, ``exclude[i, j]``: image j does not score image i (see
        :func:`musc_edge.core.msm.msm`); None: every other image scores every image.
    valid: optional (N, G*G) bool, the patches that belong to the image (False: padding of a
        letterboxed input, docs/runtime.md "Input geometry"). The raw image score is the maximum
        over the valid patches only (MUSC_SPEC 4 over the image, not its padding), and RsCIN
        re-scores those. Every patch is still scored and stays in ``patch_maps``, and invalid
        patches remain candidates when other images' patches look for their nearest patch
        (padding is uniform, far from any texture). None: every patch is valid.
    progress: called as ``progress(done, total)`` with ``done`` of ``total`` (layer, r) MSM calls
        finished, first with ``done = 0``; each call is one O(N^2) pass, the natural unit of the
        work. The caller draws the bar, so the core needs no progress library.
    Returns :class:`musc_edge.core.types.Scores` (numpy float64 arrays).
    """
    dev = resolve_device(device, precision)
    n, g = validate_layer_tokens(layer_tokens)
    check_interval(n, params.interval)
    if embeddings is not None:
        e = np.asarray(embeddings)
        if e.ndim != 2 or e.shape[0] != n:
            raise InputError(f"embeddings must be (N, D) with N = {n} (one per image), got shape {e.shape}")
        if not np.isfinite(e).all():
            raise InputError(f"embeddings (shape {e.shape}) contain NaN or inf")

    mask = None
    if valid is not None:
        mask = np.asarray(valid)
        if mask.shape != (n, g * g) or mask.dtype != np.bool_:
            raise InputError(f"valid must be an (N, G*G) = ({n}, {g * g}) bool array, got {mask.dtype} {mask.shape}")
        if not mask.any(axis=1).all():
            raise InputError(f"valid leaves image {int(np.flatnonzero(~mask.any(axis=1))[0])} with no patch to score")

    xp = dev.xp
    total = xp.zeros((n, g * g), dtype=xp.float64)
    count = 0
    n_calls = len(layer_tokens) * len(params.r_list)
    if progress is not None:
        progress(0, n_calls)
    for tokens in layer_tokens:
        t = dev.asarray(tokens)  # one upload per layer on a GPU; the host array itself on the CPU
        for r in params.r_list:
            z = lnamd(t, r)
            total += msm(z, params.interval, mem_budget_bytes=mem_budget_bytes, precision=dev.precision,
                         radius=params.match_radius, exclude=exclude)
            count += 1
            del z
            if progress is not None:
                progress(count, n_calls)
        del t
    maps = xp.reshape(total / count, (n, g, g))
    flat = xp.reshape(maps, (n, g * g))
    if mask is not None:
        flat = xp.where(dev.asarray(mask), flat, -xp.inf)
    raw = xp.max(flat, axis=1)
    final = raw if embeddings is None else rscin(raw, dev.asarray(embeddings), params.k_list)
    maps, raw = dev.to_host(maps), dev.to_host(raw)
    final = raw.copy() if embeddings is None else dev.to_host(final)
    return Scores(patch_maps=maps, image_scores_raw=raw, image_scores=final)


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) bilinear weights with align_corners=True: out i samples in at i*(n_in-1)/(n_out-1)."""
    if n_out == 1 or n_in == 1:
        src = np.zeros(n_out)
    else:
        src = np.arange(n_out, dtype=np.float64) * ((n_in - 1) / (n_out - 1))
    return linear_weights(src, n_in)


def linear_weights(src: np.ndarray, n_in: int) -> np.ndarray:
    """(len(src), n_in) linear-interpolation weights: row i samples the input at position src[i]
    (in input cells; the two neighbours, clamped to the input)."""
    n_out = len(src)
    i0 = np.clip(np.floor(src).astype(np.int64), 0, n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def upsample_map(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (align_corners=True) of (G, G) or (N, G, G) maps to (h, w) (MUSC_SPEC 4).

    Separable: ``Ry @ m @ Rx.T`` with two small interpolation matrices is exactly bilinear
    interpolation, any output size (including the original non-square image size). float32 out.
    """
    m = np.asarray(maps)
    if m.ndim not in (2, 3):
        raise InputError(f"maps must be (G, G) or (N, G, G), got shape {m.shape}")
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise InputError(f"size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"size must be positive (height, width), got {size!r}")
    ry = _interp_matrix(m.shape[-2], h).astype(np.float32)
    rx = _interp_matrix(m.shape[-1], w).astype(np.float32)
    return np.matmul(np.matmul(ry, m.astype(np.float32)), rx.T)
