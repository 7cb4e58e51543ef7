"""``musc-edge calibrate`` without the calib extra: one line naming the extra, exit 2."""

from __future__ import annotations

import subprocess
import sys

# onnx blocked in a fresh interpreter, as on a lean install (onnxruntime present, onnx missing)
SCRIPT = """
import sys
sys.modules["onnx"] = None
from musc_edge.cli import main
sys.exit(main(["calibrate", "--model", sys.argv[1], "--images", sys.argv[2], "--out", sys.argv[3]]))
"""


def test_calibrate_without_onnx_names_the_extra(tmp_path):
    (tmp_path / "images").mkdir()
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(tmp_path / "images"),
                           str(tmp_path / "m.int8.onnx")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "musc-edge[cpu,calib]" in lines[0] and "needs onnx," in lines[0]
