"""Prefetching batched extraction: order, skipping unreadable files, equality with direct calls."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pytest.importorskip("onnx")

from musc_edge.runtime.model import load_model  # noqa: E402
from musc_edge.runtime.pipeline import iter_features, iter_input_batches, prefetch  # noqa: E402
from musc_edge.runtime.preprocess import load_input  # noqa: E402
from musc_edge.runtime.testing import make_tiny_model, tiny_meta  # noqa: E402


def write_images(folder, n, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        h, w = rng.integers(20, 60, 2)
        path = folder / f"img_{i:02d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        paths.append(path)
    return paths


@pytest.mark.parametrize("workers", [1, 3])
def test_features_in_order_and_equal_to_direct_calls(tmp_path, workers):
    paths = write_images(tmp_path, 7)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (tmp_path / "empty.jpg").write_bytes(b"")
    order = paths[:3] + [tmp_path / "broken.png"] + paths[3:] + [tmp_path / "empty.jpg"]
    with load_model(make_tiny_model(tmp_path / "m.onnx")) as model:
        batches = list(iter_features(order, model, batch_size=3, workers=workers))
        got = [p for b in batches for p in b.paths]
        assert got == paths
        assert [len(b) for b in batches] == [3, 3, 1]
        skipped = {p.name: reason for b in batches for p, reason in b.skipped}
        assert set(skipped) == {"broken.png", "empty.jpg"}
        assert skipped["empty.jpg"] == "empty file"
        for b in batches:
            direct = model(np.stack([load_input(p, model.meta)[0] for p in b.paths]))
            for ours, ref in zip(b.features.tokens, direct.tokens):
                np.testing.assert_array_equal(ours, ref)
            assert b.sizes == tuple(cv2.imread(str(p)).shape[:2] for p in b.paths)
            assert b.infer_s >= 0 and b.decode_s > 0


def test_all_unreadable_gives_batches_without_features(tmp_path):
    (tmp_path / "a.png").write_text("text")
    (tmp_path / "b.png").write_text("text")
    with load_model(make_tiny_model(tmp_path / "m.onnx")) as model:
        batches = list(iter_features([tmp_path / "a.png", tmp_path / "b.png"], model, batch_size=4))
    assert len(batches) == 1 and batches[0].features is None and len(batches[0].skipped) == 2


def test_input_batches_hold_at_most_batch_size(tmp_path):
    paths = write_images(tmp_path, 5)
    batches = list(iter_input_batches(paths, tiny_meta(), 2))
    assert [b.inputs.shape for b in batches] == [(2, 3, 32, 32), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert all(b.inputs.dtype == np.float32 for b in batches)


@pytest.mark.parametrize("workers", [1, 3])
def test_decoding_stays_a_bounded_distance_ahead(tmp_path, workers):
    """Parallel decoding must not read the whole list ahead of the model (memory bound)."""
    paths = write_images(tmp_path, 4)
    consumed = []

    def many():
        for i in range(200):
            consumed.append(i)
            yield paths[i % len(paths)]

    batches = iter_input_batches(many(), tiny_meta(), 2, workers=workers)
    first = next(batches)
    assert len(first.paths) == 2
    assert len(consumed) <= 2 + 2 * workers + 1
    batches.close()


def test_prefetch_runs_ahead_in_another_thread():
    produced = []

    def slow_source():
        for i in range(4):
            produced.append((i, threading.current_thread().name))
            yield i

    got = []
    for item in prefetch(slow_source(), depth=2):
        time.sleep(0.02)  # the consumer is slower: the producer is ahead
        got.append((item, len(produced)))
    assert [g[0] for g in got] == [0, 1, 2, 3]
    assert got[0][1] >= 2  # item 1 was already decoded while item 0 was consumed
    assert all(name == "musc-edge-prefetch" for _, name in produced)


def test_prefetch_reraises_producer_errors():
    def broken():
        yield 1
        raise RuntimeError("decoder exploded")

    it = prefetch(broken())
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="decoder exploded"):
        next(it)


def test_prefetch_stops_when_the_consumer_stops():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    it = prefetch(endless(), depth=2)
    assert next(it) == 0
    it.close()
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name == "musc-edge-prefetch" and t.is_alive()]
