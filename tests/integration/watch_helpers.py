"""Helpers for the watch tests: a tiny model, line-like images, a daemon running in a thread."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from musc_edge.watch.daemon import WatchConfig, WatchDaemon
from musc_edge.watch.journal import read_jsonl
from musc_edge.runtime.model import load_model
from musc_edge.runtime.testing import make_tiny_model


def config(tmp_path: Path, **kw) -> WatchConfig:
    """A small, fast watch setup under ``tmp_path`` (folder ``in/``, output ``out/``)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "in").mkdir(exist_ok=True)
    base = dict(folder=tmp_path / "in", out_dir=tmp_path / "out", window=6, min_pool=3, stable_s=0.1)
    return WatchConfig(**{**base, **kw})


def tiny_model(folder: Path, **meta_kwargs):
    from musc_edge.runtime.testing import tiny_meta

    path = make_tiny_model(folder / "tiny.onnx", meta=tiny_meta(**meta_kwargs) if meta_kwargs else None)
    return path, load_model(path, "cpu")


def part_image(seed: int, defect: bool = False, size: tuple[int, int] = (40, 48)) -> np.ndarray:
    """A grey textured part; a defect is a bright square."""
    rng = np.random.default_rng(seed)
    img = (rng.random(size) * 40 + 100).astype(np.uint8)
    if defect:
        img[8:20, 10:22] = 250
    return img


def write_png(path: Path, img: np.ndarray) -> Path:
    ok, buf = cv2.imencode(".png", img)
    assert ok
    path.write_bytes(buf.tobytes())
    return path


def results(out_dir: Path) -> list[dict]:
    """The complete lines of results.jsonl (a line cut by a crash is not one)."""
    return read_jsonl(out_dir / "results.jsonl")


def wait_for(condition, timeout: float = 30.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def first_occurrences(seqs: list[int]) -> list[int]:
    """The seqs in the order they first arrived (at-least-once delivery may repeat some)."""
    seen: set[int] = set()
    return [s for s in seqs if not (s in seen or seen.add(s))]


class ThreadedDaemon:
    """Run a WatchDaemon in a thread, in real time; ``stop()`` sets its stop flag and re-raises its error.

    For the end-to-end tests (inotify, threads, real waits); behaviour tests step a daemon on a fake
    clock instead (tests/unit/watch/watch_fakes.py).
    """

    def __init__(self, config: WatchConfig, model, sinks=()) -> None:
        self.daemon = WatchDaemon(replace(config, tick_s=0.01), model, sinks=sinks)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.daemon.run()
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            self.error = e

    def stop(self, raise_error: bool = True):
        self.daemon.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "daemon did not stop"
        if raise_error and self.error is not None:
            raise self.error
        return self.daemon.summary

    def __enter__(self) -> "ThreadedDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.stop(raise_error=exc[0] is None)
