"""``musc-edge threshold OUTDIR`` end to end: scores.csv and results.jsonl in, threshold JSON out."""

from __future__ import annotations

import json

import numpy as np

from musc_edge.cli import main
from musc_edge.core.threshold import normalised_score, read_threshold


def score_run(tmp_path, n_good: int = 80, n_bad: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = tmp_path / "score"
    out.mkdir()
    good, bad = rng.gumbel(1.0, 0.1, n_good), rng.gumbel(1.4, 0.1, n_bad)
    rows = [f"good/{i}.png,0.3,{float(v)!r},0" for i, v in enumerate(good)] + \
           [f"crack/{i}.png,0.8,{float(v)!r},1" for i, v in enumerate(bad)]
    (out / "scores.csv").write_text("path,image_score,raw_score,label\n" + "\n".join(rows) + "\n")
    return out, good, bad


def test_labelled_run_gives_the_f1_threshold_by_default(tmp_path, capsys) -> None:
    out, good, bad = score_run(tmp_path)
    assert main(["threshold", str(out)]) == 0
    printed = capsys.readouterr().out
    th = read_threshold(out / "threshold.json")
    assert th.method == "f1" and th.n_good == 80 and th.n_anomalous == 20 and th.score == "raw_score"
    assert f"threshold {th.value:.6g} on raw_score (f1, labels" in printed
    assert "written to" in printed and normalised_score(th.value, th) == 0.5
    s = np.r_[good, bad]
    assert th.measured["recall"] == np.mean(bad >= th.value)
    assert th.measured["false_reject_rate"] == np.mean(good >= th.value)
    assert json.loads((out / "threshold.json").read_text())["candidates"]["f1"]["f1"] > 0.8
    assert s.min() < th.value < s.max()


def test_target_frr_and_target_fpr_and_out(tmp_path, capsys) -> None:
    out, good, _ = score_run(tmp_path)
    dest = tmp_path / "line3.json"
    assert main(["threshold", str(out), "--target-frr", "0.05", "--out", str(dest)]) == 0
    th = read_threshold(dest)
    assert th.method == "false_reject_rate" and th.target == 0.05 and np.mean(good >= th.value) <= 0.05
    assert "recall" in capsys.readouterr().out
    assert main(["threshold", str(out), "--target-fpr", "0.001"]) == 0
    captured = capsys.readouterr()
    assert "cannot resolve a rate of 0.001" in captured.err and "Gumbel" in captured.err
    assert read_threshold(out / "threshold.json").basis == "gumbel-fit"


def test_a_watch_run_is_taken_as_known_good(tmp_path, capsys) -> None:
    out = tmp_path / "watch"
    out.mkdir()
    raw = np.random.default_rng(1).gumbel(1.0, 0.05, 200)
    (out / "results.jsonl").write_text("".join(json.dumps({"seq": i, "path": f"{i}.png", "raw_score": float(v),
                                                           "image_score": 0.5}) + "\n" for i, v in enumerate(raw)))
    assert main(["threshold", str(out), "--target-fpr", "0.01"]) == 0
    captured = capsys.readouterr()
    assert "taking all 200 images as known-good" in captured.err
    th = read_threshold(out / "threshold.json")
    assert th.method == "false_alarm_rate" and th.basis == "empirical" and np.sum(raw >= th.value) == 2


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys) -> None:
    out = tmp_path / "watch"
    out.mkdir()
    (out / "results.jsonl").write_text(json.dumps({"seq": 0, "raw_score": 1.0, "image_score": 0.0}) + "\n"
                                       + json.dumps({"seq": 1, "raw_score": 1.1, "image_score": 1.0}) + "\n")
    cases = [([str(out)], "no labels, so no F1-optimal threshold"),
             ([str(out), "--target-frr", "0.1"], "needs labels of both kinds"),
             ([str(out), "--target-fpr", "1.5"], "between 0 and 1"),
             ([str(out), "--target-fpr", "0.1", "--target-frr", "0.1"], "not both"),
             ([str(tmp_path / "missing")], "does not exist"),
             ([str(tmp_path)], "neither scores.csv")]
    for args, message in cases:
        assert main(["threshold", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err, (args, err)
        assert "Traceback" not in err
    assert main(["threshold", str(out), "--score", "image_score", "--target-fpr", "0.5"]) == 0
    assert "relative to its pool" in capsys.readouterr().err
