"""Consistent-anomaly exclusion (musc_edge.core.consistent): a repeated defect is found and taken
out of its copies' intervals; ordinary pools are left alone; input errors are one line."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core import consistent
from musc_edge.core.consistent import (ConsistentOptions, clique_groups, consistent_exclusions, distance_table,
                                       exclusion_matrix, exclusions_from_table, score_tokens_consistent)
from musc_edge.core.errors import InputError
from musc_edge.core.lnamd import lnamd
from musc_edge.core.params import MuscParams
from musc_edge.core.scorer import score_tokens

G, C = 8, 16
PARAMS = MuscParams(r_list=(1,))
OPTIONS = ConsistentOptions(r=1)
DEFECT_AT = (2, 5)  # grid cell of the repeated defect


def texture_pool(rng, n, *, prototypes=12, noise=0.15):
    """(n, 1 + G*G, C) float32 tokens: every patch a random one of a few shared prototype vectors
    plus noise (a normal textured surface); token 0 (CLS) is noise."""
    protos = rng.standard_normal((prototypes, C))
    pick = rng.integers(0, prototypes, size=(n, G * G))
    patches = protos[pick] + noise * rng.standard_normal((n, G * G, C))
    cls = rng.standard_normal((n, 1, C))
    return np.concatenate([cls, patches], axis=1).astype(np.float32)


def paste_defect(tokens, rng, images, *, at=DEFECT_AT, copy_noise=0.01):
    """The same anomalous vector (far from every prototype) at the same cell of ``images``."""
    out = tokens.copy()
    defect = 4.0 * rng.standard_normal(C)
    m = 1 + at[0] * G + at[1]
    for i in images:
        out[i, m] = defect + copy_noise * rng.standard_normal(C)
    return out


def test_repeated_group_is_found_and_excluded():
    rng = np.random.default_rng(0)
    n, group = 30, [3, 7, 11, 19, 23, 28]
    tokens = paste_defect(texture_pool(rng, n), rng, group)
    exclude, groups = consistent_exclusions([tokens], PARAMS, OPTIONS)
    assert groups == (tuple(group),)
    assert exclude.shape == (n, n) and exclude.dtype == np.bool_
    expected = np.zeros((n, n), dtype=bool)
    expected[np.ix_(group, group)] = True
    np.fill_diagonal(expected, False)
    np.testing.assert_array_equal(exclude, expected)


@pytest.mark.parametrize("share", [0.2, 0.3])
def test_scores_at_the_repeated_defect_rise_above_normal_patches(share):
    rng = np.random.default_rng(1)
    n = 30
    group = sorted(rng.choice(n, size=int(share * n), replace=False).tolist())
    tokens = paste_defect(texture_pool(rng, n), rng, group)
    plain = score_tokens([tokens], params=PARAMS)
    result = score_tokens_consistent([tokens], params=PARAMS, options=OPTIONS)
    assert result.groups == (tuple(group),)
    cell = DEFECT_AT
    normal = np.ones((G, G), dtype=bool)
    normal[cell] = False
    for i in group:
        after = result.scores.patch_maps[i]
        assert after[cell] > plain.patch_maps[i][cell]
        assert after[cell] > after[normal].max()  # the copy is now its image's worst patch
    # and above every normal patch of every image outside the group
    others = [i for i in range(n) if i not in group]
    assert result.scores.patch_maps[group][:, cell[0], cell[1]].min() > result.scores.patch_maps[others].max()
    # plain MuSc at 30%: the copies vouch for each other, the defect looks normal
    if share == 0.3:
        assert plain.patch_maps[group][:, cell[0], cell[1]].max() < plain.patch_maps[others].max()


@pytest.mark.parametrize("seed", range(4))
def test_ordinary_pools_exclude_nothing(seed):
    rng = np.random.default_rng(100 + seed)
    n = 24
    textured = texture_pool(rng, n)
    gaussian = rng.standard_normal((n, 1 + G * G, C)).astype(np.float32)
    one_defect = paste_defect(textured, rng, [5])  # an ordinary, unrepeated defect
    for tokens in (textured, gaussian, one_defect):
        for options in (OPTIONS, ConsistentOptions(r=3)):
            exclude, groups = consistent_exclusions([tokens], MuscParams(), options)
            assert groups == () and not exclude.any()


def test_ordinary_pool_scores_are_plain_bit_for_bit():
    rng = np.random.default_rng(5)
    tokens = texture_pool(rng, 16)
    plain = score_tokens([tokens], params=PARAMS)
    result = score_tokens_consistent([tokens], params=PARAMS, options=OPTIONS)
    assert not result.exclude.any() and result.groups == ()
    np.testing.assert_array_equal(result.scores.patch_maps, plain.patch_maps)


def test_similar_normal_images_are_not_a_group():
    """Near-duplicate normal photographs burn out together, but nothing is anomalous without them."""
    rng = np.random.default_rng(6)
    tokens = texture_pool(rng, 30)
    for i in (4, 9, 14, 21):
        tokens[i] = tokens[2] + 0.01 * rng.standard_normal(tokens[2].shape).astype(np.float32)
    exclude, groups = consistent_exclusions([tokens], PARAMS, OPTIONS)
    assert groups == () and not exclude.any()


def test_two_groups_and_the_last_layer_is_searched():
    rng = np.random.default_rng(7)
    n = 40
    a, b = [1, 5, 9, 13, 17], [2, 6, 10, 30, 34, 38]
    tokens = paste_defect(paste_defect(texture_pool(rng, n), rng, a, at=(1, 1)), rng, b, at=(6, 3))
    other_layer = texture_pool(rng, n)  # layer 0 holds no defect: the search runs on layer -1
    exclude, groups = consistent_exclusions([other_layer, tokens], PARAMS, OPTIONS)
    assert groups == (tuple(a), tuple(b))
    assert exclude.sum() == len(a) * (len(a) - 1) + len(b) * (len(b) - 1)
    assert consistent_exclusions([tokens, other_layer], PARAMS, OPTIONS)[1] == ()


def test_distance_table_matches_brute_force():
    rng = np.random.default_rng(8)
    z = lnamd(texture_pool(rng, 7), 1)
    table = distance_table(z, block_bytes=1)  # one image per block: every block path
    assert table.shape == (7, G * G, 7) and table.dtype == np.float32
    d = np.linalg.norm(z[:, :, None, None, :].astype(np.float64) - z[None, None, :, :, :], axis=-1)  # i, m, j, n
    brute = d.min(axis=-1)  # (i, m, j)
    for i in range(7):
        brute[i, :, i] = np.inf
    np.testing.assert_allclose(table, brute, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(distance_table(z), table)


def test_deterministic():
    rng = np.random.default_rng(9)
    tokens = paste_defect(texture_pool(rng, 25), rng, [0, 4, 8, 12])
    first = consistent_exclusions([tokens], PARAMS, OPTIONS)
    second = consistent_exclusions([tokens.copy()], PARAMS, OPTIONS)
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]


def test_clique_groups_mutual_purity_and_size():
    links = np.zeros((8, 8), dtype=np.int32)
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        links[i, j] = links[j, i] = 3
    links[3, 4] = 5  # one way only: no edge
    links[5, 6] = links[6, 5] = 2  # a pair: below min_clique + 1 = 3 images
    assert clique_groups(links) == ((0, 1, 2),)
    impure = links.copy()
    impure[2, 7] = 100  # image 2 spends most of its links outside the group
    assert clique_groups(impure) == ()
    assert clique_groups(impure, ConsistentOptions(min_purity=0.0)) == ((0, 1, 2),)


def test_exclusion_matrix_caps_chained_groups():
    n = 10
    links = np.zeros((n, n), dtype=np.int32)
    chain = list(range(7))  # larger than max_fraction * (n - 1) + 1 = 5 images
    for i, j in zip(chain, chain[1:]):
        links[i, j] = links[j, i] = 1
    exclude = exclusion_matrix([tuple(chain)], n, links)
    np.testing.assert_array_equal(exclude, (links > 0) & (links.T > 0))
    small = exclusion_matrix([(1, 2, 3)], n)
    assert small.sum() == 6 and not small.diagonal().any()


def test_table_sizes_and_tiny_pools():
    rng = np.random.default_rng(10)
    for n in (2, 3, 4):
        exclude, groups = consistent_exclusions([texture_pool(rng, n)], PARAMS, OPTIONS)
        assert exclude.shape == (n, n) and groups == ()
    assert consistent.burnout_threshold(100, 784, ConsistentOptions()) == pytest.approx(
        2.0 * np.log2(100 * 784 * (49 - 2 + 1)))


@pytest.mark.parametrize("kwargs, message", [
    ({"r": 2}, "consistent r must be an odd integer"),
    ({"min_clique": 0}, "min_clique must be an integer >= 1"),
    ({"max_fraction": 1.0}, "max_fraction must be in (0, 1)"),
    ({"burnout": 0.0}, "burnout must be > 0"),
    ({"min_patches": 0}, "min_patches must be an integer >= 1"),
    ({"min_purity": 1.5}, "min_purity must be in [0, 1]"),
    ({"layer": 1.0}, "consistent layer must be an integer"),
])
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(InputError) as info:
        ConsistentOptions(**kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_are_one_line_errors():
    rng = np.random.default_rng(11)
    tokens = texture_pool(rng, 6)
    cases = [
        (lambda: consistent_exclusions([tokens], PARAMS, ConsistentOptions(layer=2)), "out of range for 1 tapped"),
        (lambda: consistent_exclusions([tokens[:1]], PARAMS, OPTIONS), "at least 2 images"),
        (lambda: consistent_exclusions([tokens[:, :11]], PARAMS, OPTIONS), "1 + G*G"),
        (lambda: consistent_exclusions([tokens.astype(np.int32)], PARAMS, OPTIONS), "float16/float32"),
        (lambda: distance_table(np.ones((3, 4), np.float32)), "(N, L, C)"),
        (lambda: distance_table(np.ones((3, 4, 5), np.float32)), "unit vectors"),
        (lambda: exclusions_from_table(np.ones((3, 4, 5), np.float32)), "(N, L, N)"),
        (lambda: clique_groups(np.ones((3, 4))), "square (N, N)"),
        (lambda: exclusion_matrix([(0, 9)], 5), "outside the pool of 5"),
    ]
    for call, message in cases:
        with pytest.raises(InputError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_table_through_array_api_strict():
    """The table is built with the array API alone (CuPy runs the same code); the search reads it back."""
    xps = pytest.importorskip("array_api_strict", reason="array-api-strict is not installed (the [dev] extra)")
    rng = np.random.default_rng(12)
    group = [1, 4, 7, 10]
    tokens = paste_defect(texture_pool(rng, 20), rng, group)
    z = lnamd(tokens, 1)
    table = distance_table(xps.asarray(z))
    assert type(table).__module__.startswith("array_api_strict")
    np.testing.assert_array_equal(np.from_dlpack(table), distance_table(z))
    assert exclusions_from_table(table, options=OPTIONS)[1] == (tuple(group),)


def test_a_hub_of_overlapping_groups_keeps_scorers() -> None:
    """Two repeated defects sharing images (links 0-1, 0-2, 1-2, 1-3, 2-3) chain into one group
    over half the pool; images 1 and 2 would be excluded by all others. Each row is capped at
    max_clique(n) exclusions instead, so scoring never loses an image."""
    from musc_edge.core.consistent import ConsistentOptions, exclusion_matrix
    from musc_edge.core.msm import check_exclude

    links = np.zeros((4, 4), np.int64)
    for a, b in ((0, 1), (0, 2), (1, 2), (1, 3), (2, 3)):
        links[a, b] = links[b, a] = 5
    links[1, 2] = links[2, 1] = 9  # the strongest pair
    opts = ConsistentOptions()
    ex = exclusion_matrix([(0, 1, 2, 3)], 4, links, opts)
    assert ex.sum(axis=1).max() <= max(1, min(opts.max_clique(4), 2))
    assert ex[1, 2] and ex[2, 1]  # the strongest exclusion is kept
    check_exclude(ex, 4)  # no image is left without another image to score it
