"""The CPU session every command runs on (and bench_backbone's `ort` mode times)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from musc_edge.runtime.backends.onnxruntime import open_session, session_options
from musc_edge.runtime.testing import make_tiny_model, tiny_meta


def test_defaults_are_full_optimisation_sequential_one_inter_op_thread():
    so = session_options(threads=3)
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert so.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert so.intra_op_num_threads == 3 and so.inter_op_num_threads == 1
    assert session_options().intra_op_num_threads == 0  # ORT's default: one per physical core
    with pytest.raises(RuntimeError):  # no entry set: ORT's defaults (spinning worker threads) apply
        so.get_session_config_entry("session.intra_op.allow_spinning")


def test_config_entries_reach_the_session_options():
    so = session_options(config={"session.intra_op.allow_spinning": "0", "session.set_denormal_as_zero": "1"})
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.get_session_config_entry("session.set_denormal_as_zero") == "1"


def test_passive_session_gives_the_same_outputs(tmp_path):
    path = make_tiny_model(tmp_path / "tiny.onnx")
    meta = tiny_meta()
    s = meta.image_size
    x = np.random.default_rng(0).standard_normal((2, 3, s, s), dtype=np.float32)
    spin = open_session(path, threads=1).run(None, {meta.input_name: x})
    passive = open_session(path, threads=1, config={"session.intra_op.allow_spinning": "0"}).run(None, {meta.input_name: x})
    assert len(spin) == len(passive) > 0
    for a, b in zip(spin, passive):
        np.testing.assert_array_equal(a, b)

