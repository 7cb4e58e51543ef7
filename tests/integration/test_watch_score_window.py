"""``musc-edge score --window W``: a folder scored as a stream through the rolling window."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from musc_edge.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from watch_helpers import part_image, tiny_model, write_png  # noqa: E402


def read_scores(out: Path, column: str = "image_score") -> dict[str, float]:
    with open(out / "scores.csv") as f:
        return {Path(r["path"]).name: float(r[column]) for r in csv.DictReader(f)}


def test_score_window_streams_the_folder(tmp_path) -> None:
    model_path, m = tiny_model(tmp_path / "model")
    m.close()
    data = tmp_path / "parts"
    data.mkdir()
    for i in range(12):
        write_png(data / f"p{i:02d}.png", part_image(i, defect=(i == 5)))
    base = ["score", str(data), "--model", str(model_path), "--quiet"]
    assert main(base + ["--out", str(tmp_path / "batch")]) == 0
    assert main(base + ["--out", str(tmp_path / "w4"), "--window", "4"]) == 0
    assert main(base + ["--out", str(tmp_path / "w12"), "--window", "12"]) == 0
    batch, w4, w12 = (read_scores(tmp_path / k) for k in ("batch", "w4", "w12"))
    assert set(w4) == set(batch) and len(w4) == 12
    assert w12 == batch  # a window holding the whole folder is batch MuSc
    assert w4 != batch  # a window of 4: other pools, other scores
    raw = read_scores(tmp_path / "w4", "raw_score")  # comparable across windows (RsCIN is per pool)
    assert max(raw, key=raw.get) == "p05.png"  # the defect still stands out
    run = json.loads((tmp_path / "w4" / "run.json").read_text())
    assert run["settings"]["scorer"] == "rolling_window_4"
