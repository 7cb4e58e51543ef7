"""A rolling pool's memory is known before it is allocated, and a pool over the budget is refused
with the GiB it needs and the largest window that fits."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import InputError
from musc_edge.core.memory import available_memory, check_fits, parse_size, pool_footprint
from musc_edge.core.window import CentredStream, PoolWindow, RollingScorer

GIB = 1 << 30
VIT_B16 = dict(n_patches=196, token_dims=(768,) * 4, n_r=3, embed_dim=512)


def test_footprint_is_the_allocated_bytes():
    pool = PoolWindow(3, (8, 12), 5, slots=7)
    fp = pool_footprint(7, 9, (8, 12), 3, 5)
    assert fp.total == pool.nbytes


def test_vit_b16_window_4096_needs_147_gib():
    """The figure the brief quotes: (W, Q, L, W) float32 at W = 4096, Q = 12, L = 196."""
    fp = pool_footprint(4096, **VIT_B16)
    assert fp.table / GIB == pytest.approx(147.0, abs=0.1)


@pytest.mark.parametrize("budget", [GIB // 4, 2 * GIB, 11 * GIB])
def test_largest_window_that_fits_is_exact(budget):
    fp = pool_footprint(100_000, **VIT_B16)
    w = fp.largest_slots(budget)
    assert pool_footprint(w, **VIT_B16).total <= budget < pool_footprint(w + 1, **VIT_B16).total


def test_over_budget_is_one_line_naming_gib_and_largest_window():
    fp = pool_footprint(100_000, **VIT_B16)
    with pytest.raises(InputError) as e:
        check_fits(fp, 8 * GIB, what="--window 100000")
    msg = str(e.value)
    fits = fp.largest_slots(8 * GIB)
    assert "\n" not in msg and "--window 100000 needs" in msg and "GiB" in msg
    assert f"the largest --window that fits is {fits}" in msg and "--mem-budget" in msg


def test_references_count_against_the_window():
    fp = pool_footprint(1000 + 10, **VIT_B16)
    with pytest.raises(InputError) as e:
        check_fits(fp, GIB, reserved_slots=10)
    assert f"the largest --window that fits is {fp.largest_slots(GIB) - 10}" in str(e.value)


def test_the_window_classes_refuse_before_allocating():
    """PoolWindow, RollingScorer and CentredStream all check first: a 10^5-slot ViT-B/16 pool would
    need terabytes, so reaching the allocation would be a MemoryError, not this InputError."""
    for make in (lambda: PoolWindow(14, (768,) * 4, 512, 100_000, mem_budget_bytes=8 * GIB),
                 lambda: RollingScorer(14, (768,) * 4, 512, capacity=100_000, mem_budget_bytes=8 * GIB),
                 lambda: CentredStream(14, (768,) * 4, 512, window=100_000, mem_budget_bytes=8 * GIB)):
        with pytest.raises(InputError, match="over the budget of 8.0 GiB"):
            make()


def test_default_budget_is_a_share_of_available_memory():
    avail = available_memory()
    assert avail is None or avail > 0
    if avail is not None:
        with pytest.raises(InputError, match=r"50% of the .* GiB available"):
            check_fits(pool_footprint(100_000, **VIT_B16))


@pytest.mark.parametrize("text, expected", [("8GiB", 8 * GIB), ("512MiB", 512 << 20), ("2G", 2_000_000_000),
                                            ("1.5", int(1.5 * GIB)), (" 3 gib ", 3 * GIB)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "lots", "-1G", "0", "5 parsecs"])
def test_parse_size_refuses_nonsense(bad):
    with pytest.raises(InputError, match="--mem-budget expects a size"):
        parse_size(bad)


def test_a_pool_that_fits_is_allocated():
    pool = PoolWindow(2, (4,), 3, slots=4, mem_budget_bytes=1 << 20)
    assert pool.nbytes <= 1 << 20 and np.isinf(pool._d).all()
