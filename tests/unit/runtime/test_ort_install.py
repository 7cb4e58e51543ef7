"""ONNX Runtime is an extra ([cpu] or [gpu]): missing, it is one clear line; doubled, a warning."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from musc_edge.core.errors import DeviceError
from musc_edge.runtime.backends import onnxruntime as ort_backend
from musc_edge.runtime.model import load_model
from musc_edge.runtime.testing import make_tiny_model

SAMPLE = Path(__file__).resolve().parents[3] / "examples" / "mtd_sample" / "magnetic_tile" / "test" / "good"


def test_missing_onnxruntime_names_the_extras(tmp_path, monkeypatch, capsys):
    model = make_tiny_model(tmp_path / "tiny.onnx")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the import fails...
    # ...with a package installed: a broken install, typically two packages over one folder
    with pytest.raises(DeviceError, match=r"ONNX Runtime is installed \(onnxruntime\) but cannot be imported.*"
                                          r"pip uninstall -y onnxruntime && pip install onnxruntime$"):
        load_model(model, "cpu")
    monkeypatch.setattr(ort_backend, "installed_ort_packages", lambda: [])  # ...with nothing installed
    with pytest.raises(DeviceError, match=r"ONNX Runtime is not installed.*musc-edge\[cpu\].*musc-edge\[gpu\]"):
        load_model(model, "cpu")
    from musc_edge.cli import main

    images = tmp_path / "imgs"
    images.mkdir()
    for src in sorted(SAMPLE.rglob("*.jpg"))[:3]:
        shutil.copy(src, images / src.name)
    assert main(["score", str(images), "--model", str(model), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ONNX Runtime is not installed"), err


def test_installed_packages_are_read_from_package_metadata():
    found = ort_backend.installed_ort_packages(("onnxruntime", "onnxruntime-gpu", "no-such-package-musc-edge"))
    assert "no-such-package-musc-edge" not in found
    assert found and set(found) <= {"onnxruntime", "onnxruntime-gpu"}  # this environment has one of them


def test_two_onnxruntime_packages_warn_once(monkeypatch, caplog):
    monkeypatch.setattr(ort_backend, "_clash_checked", False)
    monkeypatch.setattr(ort_backend, "installed_ort_packages", lambda: ["onnxruntime", "onnxruntime-gpu"])
    with caplog.at_level(logging.WARNING):
        ort_backend.import_onnxruntime()
        ort_backend.import_onnxruntime()
    warnings = [r.getMessage() for r in caplog.records if "overwrite each other" in r.getMessage()]
    assert len(warnings) == 1
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in warnings[0]
