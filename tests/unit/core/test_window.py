"""The rolling window must give the batch scorer's numbers on the same pool."""

from __future__ import annotations

import numpy as np
import pytest

from musc_edge.core.errors import InputError, StateError
from musc_edge.core.pairs import block_minima
from musc_edge.core.params import MuscParams
from musc_edge.core.scorer import score_tokens
from musc_edge.core.window import CentredStream, PoolWindow, RollingScorer, stream_scores

G = 4
DIMS = (8, 12)  # two tapped layers of different width
EMB = 6
R_LIST = (1, 3, 5)
PARAMS = MuscParams(r_list=R_LIST)


def make_image(rng: np.random.Generator) -> tuple[list[np.ndarray], np.ndarray]:
    """Tokens of one image: a shared texture plus noise (so distances are not all alike)."""
    tokens = [(np.sin(np.arange((1 + G * G) * c).reshape(1 + G * G, c)) + 0.7 * rng.standard_normal((1 + G * G, c)))
              .astype(np.float32) for c in DIMS]
    emb = rng.standard_normal(EMB)
    return tokens, (emb / np.linalg.norm(emb)).astype(np.float32)


def batch_scores(images: list[tuple[list[np.ndarray], np.ndarray]]):
    tokens = [np.stack([img[0][layer] for img in images]) for layer in range(len(DIMS))]
    emb = np.stack([img[1] for img in images])
    return score_tokens(tokens, emb, params=PARAMS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pool_equals_batch_after_random_adds_and_evictions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = PoolWindow(G, DIMS, EMB, slots=7, params=PARAMS)
    images: dict[int, tuple[list[np.ndarray], np.ndarray]] = {}
    next_seq, checks = 0, 0
    for _ in range(50):
        if len(pool) >= 2 and (len(pool) == pool.slots or rng.random() < 0.4):
            victim = int(rng.choice(pool.seqs))  # evict anywhere, not only the oldest
            pool.evict(victim)
            del images[victim]
        else:
            images[next_seq] = make_image(rng)
            pool.add(pool.prepare(next_seq, *images[next_seq]))
            next_seq += 1
        if len(pool) < 2:
            continue
        seqs, maps, raw, final = pool.score_all()
        ref = batch_scores([images[s] for s in seqs])
        np.testing.assert_allclose(maps, ref.patch_maps, rtol=0, atol=1e-5)
        np.testing.assert_allclose(raw, ref.image_scores_raw, rtol=0, atol=1e-5)
        np.testing.assert_allclose(final, ref.image_scores, rtol=0, atol=1e-5)
        checks += 1
    assert checks > 30


def test_pool_matches_authors_outputs(fixtures_dir) -> None:
    """Independent reference: the released code's maps on the small parity fixture (MUSC_SPEC 3-5)."""
    data = np.load(fixtures_dir / "musc_parity_small.npz")
    tokens = [data[k] for k in sorted(k for k in data.files if k.startswith("tokens_"))]
    n, t, _ = tokens[0].shape
    g = int(round(np.sqrt(t - 1)))
    pool = PoolWindow(g, [x.shape[2] for x in tokens], data["cls"].shape[1], slots=n,
                      params=MuscParams(r_list=tuple(int(r) for r in data["r_list"]),
                                        k_list=tuple(int(k) for k in data["k_list"])))
    for i in range(n):
        pool.add(pool.prepare(i, [x[i] for x in tokens], data["cls"][i]))
    seqs, maps, raw, final = pool.score_all()
    assert seqs == list(range(n))
    np.testing.assert_allclose(maps, data["patch_maps"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(raw, data["image_scores_raw"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(final, data["image_scores"], rtol=1e-4, atol=1e-6)


def test_prepare_rows_equal_the_pair_kernel_per_pair() -> None:
    """An entry's rows against P images, computed in blocks of slots, equal the pair kernel run on
    each pair alone (both directions), including an exact match at distance 0."""
    rng = np.random.default_rng(11)
    pool = PoolWindow(G, DIMS, EMB, slots=8, params=MuscParams(r_list=(1,)))
    images = [make_image(rng) for _ in range(7)]
    for s, img in enumerate(images):
        pool.add(pool.prepare(s, *img))
    new = ([t.copy() for t in images[3][0]], images[3][1])  # a copy of image 3: distances 0 to it
    entry = pool.prepare(7, *new)
    z_new = pool.features(new[0])
    for j, img in enumerate(images):
        z_j = pool.features(img[0])
        for q in range(len(pool.combos)):
            rows, cols = block_minima(z_new[q][None], z_j[q][None])
            np.testing.assert_allclose(entry.d_out[j, q], rows[0, :, 0], rtol=0, atol=1e-6)
            np.testing.assert_allclose(entry.d_in[j, q], cols[0, :, 0], rtol=0, atol=1e-6)
    assert np.all(entry.d_out[3] == 0.0) and np.all(entry.d_in[3] == 0.0)


def test_prepare_does_not_change_the_pool() -> None:
    rng = np.random.default_rng(3)
    pool = PoolWindow(G, DIMS, EMB, slots=4, params=PARAMS)
    for s in range(3):
        pool.add(pool.prepare(s, *make_image(rng)))
    before = pool.score_all()[1]
    entry = pool.prepare(3, *make_image(rng))
    assert entry.d_out.shape == (3, len(DIMS) * len(R_LIST), G * G)
    np.testing.assert_array_equal(pool.score_all()[1], before)
    with pytest.raises(StateError, match="without pair rows"):
        pool.add(pool.prepare(4, *make_image(rng), partners=[0, 1]))


def run_stream(scorer: RollingScorer, images, start: int = 0):
    """Push images with seqs start.. ; return {seq: emission} and the pool contents at each report."""
    reported, pools = {}, {}
    for k, img in enumerate(images):
        seq = start + k
        for e in scorer.push(scorer.prepare(seq, *img, info={"n": seq})):
            assert e.seq not in reported
            reported[e.seq] = e
            pools[e.seq] = scorer.pool.seqs
    return reported, pools


@pytest.mark.parametrize("delay", [0, 2, 5])
def test_stream_reports_each_image_once_in_order_with_batch_scores(delay: int) -> None:
    rng = np.random.default_rng(10 + delay)
    images = [make_image(rng) for _ in range(20)]
    scorer = RollingScorer(G, DIMS, EMB, capacity=6, delay=delay, min_pool=4, params=PARAMS)
    order = []
    reported, pools = {}, {}
    for seq, img in enumerate(images):
        emitted = scorer.push(scorer.prepare(seq, *img, info={"n": seq}))
        if seq + 1 < 4:
            assert emitted == []  # pool below --min-pool: nothing yet
        for e in emitted:
            assert seq - e.seq >= delay  # D newer images have arrived
            order.append(e.seq)
            reported[e.seq] = e
            pools[e.seq] = scorer.pool.seqs
    assert order == sorted(order) and len(set(order)) == len(order)
    assert order == list(range(20 - delay))  # the last D wait for newer images
    assert list(scorer.pending) == list(range(20 - delay, 20))
    for seq in (0, 3, 9, 19 - delay):
        e = reported[seq]
        pool = pools[seq]
        ref = batch_scores([images[s] for s in pool])
        i = pool.index(seq)
        np.testing.assert_allclose(e.patch_map, ref.patch_maps[i], rtol=0, atol=1e-5)
        assert e.raw_score == pytest.approx(ref.image_scores_raw[i], abs=1e-5)
        assert e.image_score == pytest.approx(ref.image_scores[i], abs=1e-5)
        assert e.info == {"n": seq} and e.pool_size == len(pool)
    flushed = scorer.flush()
    assert [e.seq for e in flushed] == list(range(20 - delay, 20))


def test_references_stay_and_are_never_reported() -> None:
    rng = np.random.default_rng(5)
    scorer = RollingScorer(G, DIMS, EMB, capacity=3, delay=0, min_pool=4, n_references=2, params=PARAMS)
    refs = [make_image(rng) for _ in range(2)]
    for i, img in enumerate(refs):
        scorer.add_reference(scorer.pool.prepare(-2 + i, *img))
    images = [make_image(rng) for _ in range(8)]
    reported, pools = run_stream(scorer, images)
    assert sorted(reported) == list(range(8)) and not scorer.pending
    assert pools[0] == [-2, -1, 0, 1]  # image 0 waited for --min-pool 4, then went with image 1
    for seq, pool in pools.items():
        assert pool[:2] == [-2, -1] and len(pool) <= 5
    e = reported[7]
    ref = batch_scores(refs + [images[s] for s in pools[7][2:]])
    np.testing.assert_allclose(e.patch_map, ref.patch_maps[pools[7].index(7)], atol=1e-5, rtol=0)
    with pytest.raises(StateError, match="before the first stream image"):
        scorer.add_reference(scorer.pool.prepare(-3, *make_image(rng)))


def test_restore_replays_the_same_pool() -> None:
    """A scorer rebuilt from its state and entries continues exactly like the original."""
    rng = np.random.default_rng(7)
    images = [make_image(rng) for _ in range(14)]
    kwargs = dict(capacity=5, delay=2, min_pool=3, params=PARAMS)
    a = RollingScorer(G, DIMS, EMB, **kwargs)
    entries = {}
    for seq, img in enumerate(images[:9]):
        entries[seq] = a.prepare(seq, *img, info={"n": seq})
        a.push(entries[seq])
    b = RollingScorer(G, DIMS, EMB, **kwargs)
    state = a.state()
    b.restore(state, {s: entries[s] for s in state["stream"]})
    rest_a, _ = run_stream(a, images[9:], start=9)
    rest_b, _ = run_stream(b, images[9:], start=9)
    assert list(rest_a) == list(rest_b)
    for seq in rest_a:  # slots may be laid out differently: BLAS rounding, no more
        np.testing.assert_allclose(rest_a[seq].patch_map, rest_b[seq].patch_map, rtol=0, atol=1e-6)
        assert rest_a[seq].image_score == pytest.approx(rest_b[seq].image_score, abs=1e-6)


@pytest.mark.parametrize("kwargs, match", [
    (dict(capacity=4, delay=4), "--delay"),
    (dict(capacity=4, min_pool=5), "--min-pool"),
    (dict(capacity=4, min_pool=1), "--min-pool"),
    (dict(capacity=0), "--window"),
])
def test_bad_settings_are_refused(kwargs, match) -> None:
    with pytest.raises(InputError, match=match):
        RollingScorer(G, DIMS, EMB, **kwargs)


def test_wrong_token_shape_is_refused() -> None:
    pool = PoolWindow(G, DIMS, EMB, slots=3)
    bad = [np.zeros((1 + 9, 8), np.float32), np.zeros((1 + 16, 12), np.float32)]
    with pytest.raises(InputError, match="does not match this pool"):
        pool.prepare(0, bad, np.ones(EMB, np.float32))


def test_stream_scores_of_a_folder_in_order() -> None:
    """score --window: every image once, each against a centred window of the sequence."""
    rng = np.random.default_rng(12)
    images = [make_image(rng) for _ in range(15)]
    tokens = [np.stack([img[0][layer] for img in images]).astype(np.float16) for layer in range(len(DIMS))]
    emb = np.stack([img[1] for img in images])
    got = stream_scores(tokens, emb, window=6, params=PARAMS)
    assert got.patch_maps.shape == (15, G, G) and np.isfinite(got.image_scores).all()
    # Image 7 was reported when 3 newer images had arrived: its pool was images 5..10.
    ref = score_tokens([t[5:11] for t in tokens], emb[5:11], params=PARAMS)
    np.testing.assert_allclose(got.patch_maps[7], ref.patch_maps[2], rtol=0, atol=1e-5)
    assert got.image_scores[7] == pytest.approx(ref.image_scores[2], abs=1e-5)
    # The last images are reported against the final window.
    ref = score_tokens([t[9:] for t in tokens], emb[9:], params=PARAMS)
    np.testing.assert_allclose(got.patch_maps[14], ref.patch_maps[5], rtol=0, atol=1e-5)
    # A folder no larger than the window is one pool: batch MuSc.
    small = stream_scores([t[:5] for t in tokens], emb[:5], window=6, params=PARAMS)
    np.testing.assert_array_equal(small.image_scores, score_tokens([t[:5] for t in tokens], emb[:5],
                                                                   params=PARAMS).image_scores)


def window_of(i: int, n: int, w: int) -> range:
    """The stream images in the pool when image i of n is reported (score --window w).

    It is reported when w // 2 newer images have arrived (or at the end); the window then holds
    the last w images that have arrived.
    """
    last = min(i + w // 2, n - 1)
    return range(max(0, last - w + 1), last + 1)


@pytest.mark.parametrize("n, w", [(13, 4), (11, 5), (9, 2)])
def test_centred_stream_scores_each_image_against_its_window_holding_at_most_w(n: int, w: int) -> None:
    """Every image equals batch MuSc over the window it was reported in; never more than W held."""
    rng = np.random.default_rng(20 + n)
    images = [make_image(rng) for _ in range(n)]
    stream = CentredStream(G, DIMS, EMB, window=w, params=PARAMS)
    for tokens, emb in images:
        stream.push(tokens, emb)
        assert stream.held <= w
    got = stream.finish()
    assert stream.peak_held == w  # the buffer fills to w, then goes into the rolling scorer
    for i in range(n):
        pool = list(window_of(i, n, w))
        ref = batch_scores([images[j] for j in pool])
        k = pool.index(i)
        np.testing.assert_allclose(got.patch_maps[i], ref.patch_maps[k], rtol=0, atol=1e-5)
        assert got.image_scores_raw[i] == pytest.approx(ref.image_scores_raw[k], abs=1e-5)
        assert got.image_scores[i] == pytest.approx(ref.image_scores[k], abs=1e-5)


def test_centred_stream_with_references() -> None:
    """References sit in every window and are never reported; a short stream is one batch pool."""
    rng = np.random.default_rng(31)
    refs = [make_image(rng) for _ in range(2)]
    images = [make_image(rng) for _ in range(9)]
    for n in (3, 9):  # n <= W: one pool of refs + stream; n > W: refs + the rolling window
        stream = CentredStream(G, DIMS, EMB, window=4, params=PARAMS)
        for tokens, emb in refs:
            stream.add_reference(tokens, emb)
        for tokens, emb in images[:n]:
            stream.push(tokens, emb)
        got = stream.finish()
        assert got.patch_maps.shape == (n, G, G) and stream.peak_held <= 2 + 4
        for i in range(n):
            pool = list(range(n)) if n <= 4 else list(window_of(i, n, 4))
            ref = batch_scores(refs + [images[j] for j in pool])
            k = 2 + pool.index(i)
            np.testing.assert_allclose(got.patch_maps[i], ref.patch_maps[k], rtol=0, atol=1e-5)
            assert got.image_scores[i] == pytest.approx(ref.image_scores[k], abs=1e-5)
    with pytest.raises(StateError, match="before the first"):
        stream.add_reference(*refs[0])
