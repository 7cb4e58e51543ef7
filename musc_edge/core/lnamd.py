"""LNAMD: layer-normalised, neighbour-aggregated patch descriptors (MUSC_SPEC 2).

Per image and tapped layer the (C, G, G) token map is layer-normalised as one block, averaged over
an r x r neighbourhood (zero padding counted in the mean, as ``avg_pool2d(count_include_pad=True)``
and the released code's unfold + adaptive_avg_pool1d both do), then every patch vector is
L2-normalised so that MSM can use ``||a - b||^2 = 2 - 2 a.b``.

float32 compute, written against the Python array API (numpy, or CuPy on a GPU). The token layout
stays (N, G, G, C) throughout (channels last), so the pooling is two separable box sums along the
grid axes and no transpose is needed.
"""

from __future__ import annotations

import math
from typing import Any

from array_api_compat import array_namespace

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


def _box_sum_axis(xp: Any, x: Any, r: int, axis: int) -> Any:
    """Sum over a window of r along ``axis`` (stride 1, zero padding r // 2 both sides)."""
    pad = r // 2
    n = x.shape[axis]
    zshape = list(x.shape)
    zshape[axis] = pad
    zeros = xp.zeros(tuple(zshape), dtype=x.dtype, device=getattr(x, "device", None))
    xpad = xp.concat([zeros, x, zeros], axis=axis)

    def window(start: int) -> tuple:
        idx = [slice(None)] * x.ndim
        idx[axis] = slice(start, start + n)
        return tuple(idx)

    out = xp.asarray(xpad[window(0)], copy=True)
    for s in range(1, r):
        out += xpad[window(s)]
    return out


def layer_norm_map(x: Any) -> Any:
    """Layer-normalise one image's whole (G*G, C) map together (no affine, eps 1e-5), float32.

    Mean and variance are accumulated in float64 (float16 inputs and large maps keep their
    digits); the output is float32.
    """
    xp = array_namespace(x)
    x64 = xp.astype(x, xp.float64)
    mean = float(xp.mean(x64))
    var = float(xp.var(x64))
    out = xp.astype(x, xp.float32)  # a copy
    out -= mean
    out *= 1.0 / math.sqrt(var + LN_EPS)
    return out


def lnamd(tokens: Any, r: int) -> Any:
    """LNAMD features of one tapped layer (MUSC_SPEC 2).

    tokens: (N, 1 + G*G, C) float16 or float32, a numpy array or any array API array (CuPy: on
    its GPU); token 0 (CLS) is dropped.
    r: aggregation degree (odd; 1 means no aggregation).
    Returns (N, G*G, C) float32 unit vectors of the same namespace. Works one image at a time, so
    the only full-size array is the output (no float64 copy of the layer).
    """
    xp = array_namespace(tokens)
    if tokens.ndim != 3:
        raise InputError(f"tokens must be (N, 1 + G*G, C), got shape {tuple(tokens.shape)}")
    if int(r) < 1 or int(r) % 2 == 0:
        raise InputError(f"aggregation degree r must be an odd integer >= 1 (1, 3, 5), got {r}")
    r = int(r)
    n, t, c = tokens.shape
    g = patch_grid(t)
    out = xp.empty((n, g * g, c), dtype=xp.float32, device=getattr(tokens, "device", None))
    for i in range(n):
        x = layer_norm_map(tokens[i, 1:, :])  # (L, C)
        if r > 1:
            x = _box_sum_axis(xp, xp.reshape(x, (g, g, c)), r, axis=0)
            x = _box_sum_axis(xp, x, r, axis=1)
            x *= 1.0 / (r * r)
            x = xp.reshape(x, (g * g, c))
        x64 = xp.astype(x, xp.float64)
        norm = xp.sqrt(xp.vecdot(x64, x64, axis=-1))
        # A zero patch (only possible for a constant map) stays zero instead of becoming NaN.
        out[i, ...] = x / xp.astype(xp.maximum(norm, xp.asarray(1e-12, dtype=xp.float64, device=getattr(norm, "device", None))),
                                    xp.float32)[:, None]
    return out
