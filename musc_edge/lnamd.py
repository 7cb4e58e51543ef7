"""LNAMD: layer-normalised, neighbour-aggregated patch descriptors (MUSC_SPEC 2).

Per image and tapped layer the (C, G, G) token map is layer-normalised as one block, averaged over
an r x r neighbourhood (zero padding counted in the mean, as ``avg_pool2d(count_include_pad=True)``
and the released code's unfold + adaptive_avg_pool1d both do), then every patch vector is
L2-normalised so that MSM can use ``||a - b||^2 = 2 - 2 a.b``.

Pure numpy, float32 compute. The token layout stays (N, G, G, C) throughout (channels last), so
the pooling is two separable box sums along the grid axes and no transpose is needed.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError

#: LayerNorm epsilon of the released code (torch.nn.LayerNorm default).
LN_EPS = 1e-5


def patch_grid(num_tokens: int) -> int:
    """G such that ``num_tokens == 1 + G*G`` (token 0 is CLS), else :class:`InputError`.

    Why: the released code silently truncates ``sqrt`` and scores a garbled grid; a backbone
    wired to the wrong tap or a CNN without the CLS slot must be refused with the shape named.
    """
    n = int(num_tokens)
    g = math.isqrt(max(n - 1, 0))
    if n < 2 or g * g != n - 1:
        raise InputError(
            f"token count {n} is not 1 + G*G (CLS + a square patch grid); "
            "pass tokens shaped (N, 1 + G*G, C) with token 0 the CLS token"
        )
    return g


def _box_sum_axis(x: np.ndarray, r: int, axis: int) -> np.ndarray:
    """Sum over a window of r along ``axis`` (stride 1, zero padding r // 2 both sides)."""
    pad = r // 2
    n = x.shape[axis]
    widths = [(0, 0)] * x.ndim
    widths[axis] = (pad, pad)
    xp = np.pad(x, widths)

    def window(start: int) -> tuple:
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + n)
        return tuple(idx)

    out = xp[window(0)].copy()
    for s in range(1, r):
        out += xp[window(s)]
    return out


def layer_norm_map(x: np.ndarray) -> np.ndarray:
    """Layer-normalise each image's whole (G*G, C) map together (no affine, eps 1e-5), float32.

    Statistics are accumulated in float64 (cheap, N*L*C values) so float16 inputs and large maps
    do not lose digits in the mean/variance; the output is float32.
    """
    x64 = x.astype(np.float64, copy=False)
    axes = tuple(range(1, x.ndim))
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + LN_EPS)).astype(np.float32)


def lnamd(tokens: np.ndarray, r: int) -> np.ndarray:
    """LNAMD features of one tapped layer (MUSC_SPEC 2).

    tokens: (N, 1 + G*G, C) float16 or float32; token 0 (CLS) is dropped.
    r: aggregation degree (odd; 1 means no aggregation).
    Returns (N, G*G, C) float32 unit vectors.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise InputError(f"tokens must be (N, 1 + G*G, C), got shape {tokens.shape}")
    if int(r) < 1 or int(r) % 2 == 0:
        raise InputError(f"aggregation degree r must be an odd integer >= 1 (1, 3, 5), got {r}")
    r = int(r)
    n, t, c = tokens.shape
    g = patch_grid(t)
    x = layer_norm_map(tokens[:, 1:, :])  # (N, L, C) float32
    if r > 1:
        x = x.reshape(n, g, g, c)
        x = _box_sum_axis(x, r, axis=1)
        x = _box_sum_axis(x, r, axis=2)
        x *= np.float32(1.0 / (r * r))
        x = x.reshape(n, g * g, c)
    norm = np.sqrt(np.einsum("nlc,nlc->nl", x, x, dtype=np.float64))
    # A patch that is all zeros (impossible after LN unless the map is constant) stays zero.
    norm = np.maximum(norm, 1e-12).astype(np.float32)
    x /= norm[..., None]
    return np.ascontiguousarray(x, dtype=np.float32)
