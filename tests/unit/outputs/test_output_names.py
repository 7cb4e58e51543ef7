"""Output file names always fit the file system, with the atomic writer's temporary name
(musc_edge/outputs/writers.py, ``MAX_NAME_BYTES``): shortened with a hash, unique and stable."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from musc_edge.core.durable import atomic_write_bytes
from musc_edge.datasets import Sample
from musc_edge.outputs.writers import MAX_NAME_BYTES, fit_name, output_names

cv2 = pytest.importorskip("cv2")

LONG_CJK = "検査" * 41 + "品"  # 83 characters, 249 bytes in UTF-8: a file name that exists on disk


def sample(rel: str) -> Sample:
    return Sample(path=Path("/data") / rel, rel=rel)


def test_a_name_that_fits_is_left_alone() -> None:
    assert output_names([sample("good/000.png"), sample("a.jpg"), sample("a.bmp")]) == [
        "good/000.png", "a.jpg.png", "a.bmp.png"]


def test_long_names_are_shortened_to_fit_with_the_temporary_name(tmp_path) -> None:
    rels = [f"crack/{LONG_CJK}.jpg", f"crack/{LONG_CJK}x.jpg", "a" * 250 + ".bmp", "b" * 251 + ".tif"]
    names = output_names([sample(r) for r in rels])
    for name in names:
        leaf = os.fsencode(Path(name).name)
        assert len(leaf) <= MAX_NAME_BYTES and leaf.endswith(b".png")
        assert len(leaf) + len(b"..XXXXXXXX.tmp") <= 255  # what atomic_write_bytes creates first
    assert len(set(names)) == len(names)  # long names sharing a prefix stay apart
    assert names[0].startswith("crack/" + LONG_CJK[:10])  # recognisable: the start of the name is kept
    assert output_names([sample(r) for r in rels]) == names  # stable across runs
    for name in names:  # and writable on a real file system
        atomic_write_bytes(tmp_path / name, b"png")
        assert (tmp_path / name).read_bytes() == b"png"


def test_fit_name_never_splits_a_character_and_keeps_undecodable_bytes_writable(tmp_path) -> None:
    for n in range(200, 260):
        fitted = fit_name("é" * n + ".png")
        assert len(fitted.encode()) <= MAX_NAME_BYTES
        assert fitted.encode().decode("utf-8") == fitted
    odd = os.fsdecode(b"\xe9" * 250 + b".png")  # a Latin-1 name on a UTF-8 system
    fitted = fit_name(odd)
    assert len(os.fsencode(fitted)) <= MAX_NAME_BYTES
    atomic_write_bytes(tmp_path / fitted, b"x")


def test_score_heatmaps_with_a_long_file_name_finish_the_run(tmp_path) -> None:
    """score --heatmaps on a folder with a 249-byte name: maps written, run.json too (exit 0)."""
    from musc_edge.cli import main
    from musc_edge.runtime.testing import make_tiny_model, tiny_meta

    model = make_tiny_model(tmp_path / "tiny.onnx", meta=tiny_meta(image_size=32, patch_size=8))
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for stem in ["a", "b", "c", LONG_CJK]:
        ok, png = cv2.imencode(".png", rng.integers(90, 140, (32, 32), dtype=np.uint8))
        (data / f"{stem}.png").write_bytes(png.tobytes())
    out = tmp_path / "out"
    assert main(["score", str(data), "--model", str(model), "--out", str(out), "--heatmaps", "--quiet"]) == 0
    assert (out / "run.json").is_file()
    maps = [p.name for p in (out / "maps").iterdir()]
    assert len(maps) == 4 and any(m.startswith(LONG_CJK[:10]) for m in maps)
