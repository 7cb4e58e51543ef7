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


# ------------------------------------------------------------------------ streaming, order, memory
def collected(model_path: Path, paths: list[Path]):
    """Tokens (float16, as score keeps them) and embeddings of ``paths``, readable ones in order."""
    import numpy as np

    from musc_edge.runtime.model import load_model
    from musc_edge.runtime.pipeline import iter_features

    tokens, emb, names = [], [], []
    with load_model(model_path, "cpu") as m:
        for batch in iter_features(paths, m, 3):
            if batch.features is not None:
                tokens.append([t.astype(np.float16) for t in batch.features.tokens])
                emb.append(batch.features.embedding)
                names += [p.name for p in batch.paths]
    layers = [np.concatenate([b[i] for b in tokens]) for i in range(len(tokens[0]))]
    return layers, np.concatenate(emb), names


def test_streamed_folder_equals_stream_scores_on_collected_tokens_in_either_order(tmp_path) -> None:
    """The batch-by-batch stream gives the in-memory stream's scores, in name or mtime order."""
    import os

    import numpy as np

    from musc_edge.core.window import stream_scores

    model_path, m = tiny_model(tmp_path / "model")
    m.close()
    data = tmp_path / "parts"
    data.mkdir()
    n = 17
    for i in range(n):  # written in reverse name order: mtime order is the reverse of name order
        p = write_png(data / f"p{i:02d}.png", part_image(i, defect=(i in (3, 11))))
        os.utime(p, ns=(10**18 - i * 10**9, 10**18 - i * 10**9))
    (data / "p07b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x01" * 40)  # unreadable: skipped, order kept
    names = sorted(p.name for p in data.iterdir())
    for order, listing in (("name", names), ("mtime", [x for x in reversed(names) if x != "p07b.png"] + ["p07b.png"])):
        out = tmp_path / f"w5_{order}"
        assert main(["score", str(data), "--model", str(model_path), "--quiet", "--out", str(out), "--window", "5",
                     "--batch", "3", "--order", order]) == 0
        with open(out / "scores.csv") as f:
            rows = list(csv.DictReader(f))
        tokens, emb, kept = collected(model_path, [data / x for x in listing])
        assert [Path(r["path"]).name for r in rows] == kept and len(kept) == n  # rows in stream order
        ref = stream_scores(tokens, emb, window=5)
        np.testing.assert_allclose([float(r["raw_score"]) for r in rows], ref.image_scores_raw, rtol=0, atol=1e-6)
        np.testing.assert_allclose([float(r["image_score"]) for r in rows], ref.image_scores, rtol=0, atol=1e-6)
        run = json.loads((out / "run.json").read_text())
        assert run["settings"]["order"] == order and run["settings"]["window"] == 5
        assert run["counts"] == {"found": n + 1, "scored": n, "skipped": 1}
    # the order is what the window sees: the same images in another order get other windows
    assert read_scores(tmp_path / "w5_name", "raw_score") != read_scores(tmp_path / "w5_mtime", "raw_score")


def peak_traced(fn) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_window_memory_does_not_grow_with_the_folder(tmp_path) -> None:
    """Structural bound: the streamed pool's peak memory is that of W images, whatever N is.

    A model with wide tokens (8 x 8 patches, 2 x 512 channels: 133 kB per image as float16) makes
    the tokens dominate. Scoring 30 or 200 images through a window of 8 peaks at about the same
    traced memory, far below the 200 images' tokens that the batch pool's feature stage holds.
    """
    import numpy as np

    from musc_edge import MuscParams
    from musc_edge.core.pools import BatchPool, StreamPool
    from musc_edge.score.folder import ScoreSettings, _extract, score_folder
    from musc_edge.datasets import discover

    model_path, m = tiny_model(tmp_path / "model", image_size=64, patch_size=8, token_dims=(512, 512))
    tokens_per_image = (1 + m.meta.grid ** 2) * sum(m.meta.token_dims) * 2
    for n in (30, 200):
        folder = tmp_path / f"n{n}"
        folder.mkdir()
        for i in range(n):
            write_png(folder / f"p{i:03d}.png", part_image(i, size=(64, 64)))
    settings = ScoreSettings(batch_size=8, params=MuscParams(r_list=(1,)), window=8, progress=False)
    peaks = {n: peak_traced(lambda n=n: score_folder(tmp_path / f"n{n}", model_path, tmp_path / f"out{n}",
                                                     settings, extractor=m)) for n in (30, 200)}
    all_tokens = 200 * tokens_per_image  # 27 MB
    assert peaks[200] < 1.25 * peaks[30], peaks  # flat in N
    assert peaks[200] < all_tokens / 3, (peaks, all_tokens)
    # The same feature stage feeding the batch pool holds every image's tokens: the bound can fail.
    dataset = discover(tmp_path / "n200")
    batch_settings = ScoreSettings(batch_size=8, params=MuscParams(r_list=(1,)), progress=False)
    batch_peak = peak_traced(lambda: _extract(dataset, m, batch_settings, BatchPool(m.meta, 200, batch_settings.params)))
    assert batch_peak > all_tokens > 3 * peaks[200]
    # and the stream never held more than W images' tokens
    pool = StreamPool(m.meta, settings.window, settings.params)
    _extract(dataset, m, settings, pool)
    assert pool.stream.peak_held == 8 and len(pool.stream) == 200
    assert np.isfinite(pool.finish().image_scores).all()
    m.close()


def mvtec_category(root: Path, n_good: int = 6, n_defect: int = 4) -> Path:
    """test/good and one defect type whose parts all carry the same defect (listed as a block)."""
    for kind, n in (("good", n_good), ("blob", n_defect)):
        (root / "test" / kind).mkdir(parents=True)
        for i in range(n):
            write_png(root / "test" / kind / f"{i:03d}.png", part_image(50 + i if kind == "good" else 80 + i,
                                                                       defect=kind == "blob"))
    return root


def test_window_on_a_grouped_mvtec_category_warns_once_and_references_help(tmp_path, capsys, caplog) -> None:
    import os

    model_path, m = tiny_model(tmp_path / "model")
    m.close()
    data = mvtec_category(tmp_path / "cat")
    base = ["score", str(data), "--model", str(model_path), "--quiet", "--window", "4"]
    def warned() -> list[str]:  # the one-line warnings logged (to stderr under the CLI) since last asked
        lines = [r.getMessage() for r in caplog.records if "listed by defect type" in r.getMessage()]
        caplog.clear()
        return lines

    assert main(base + ["--out", str(tmp_path / "grouped")]) == 0
    lines = warned()
    assert len(lines) == 1 and "\n" not in lines[0] and "--reference DIR" in lines[0] and "--order mtime" in lines[0]
    run = json.loads((tmp_path / "grouped" / "run.json").read_text())
    assert any("listed by defect type" in w for w in run["warnings"])

    # production order (mtimes interleaving good and defective parts): no warning
    files = sorted((data / "test").rglob("*.png"), key=lambda p: (p.name, p.parent.name))
    for i, p in enumerate(files):
        os.utime(p, ns=(10**18 + i * 10**9, 10**18 + i * 10**9))
    assert main(base + ["--out", str(tmp_path / "mtime"), "--order", "mtime"]) == 0
    assert warned() == []
    # batch mode: no warning either (every image sees all the others)
    assert main(base[:-2] + ["--out", str(tmp_path / "batch")]) == 0
    assert warned() == []

    # Known-good references seed every window: the repeated defect stands out again.
    refs = tmp_path / "refs"
    refs.mkdir()
    for i in range(4):
        write_png(refs / f"ref_{i}.png", part_image(200 + i))
    assert main(base + ["--out", str(tmp_path / "refs_out"), "--reference", str(refs)]) == 0
    assert warned() == []
    with open(tmp_path / "refs_out" / "scores.csv") as f:
        scored = [r["path"] for r in csv.DictReader(f)]
    assert len(scored) == 10 and not any("ref_" in p for p in scored)  # references are never scored
    metrics = {k: json.loads((tmp_path / k / "metrics.json").read_text())["image_raw"]["auroc"]
               for k in ("grouped", "refs_out")}
    assert metrics["refs_out"] > metrics["grouped"], metrics
    run = json.loads((tmp_path / "refs_out" / "run.json").read_text())
    assert run["counts"]["references"] == 4 and run["settings"]["reference"] == str(refs)

    # --reference without --window is a one-line usage error
    capsys.readouterr()
    assert main(base[:-2] + ["--out", str(tmp_path / "bad"), "--reference", str(refs)]) == 2
    assert "--reference needs --window" in capsys.readouterr().err
