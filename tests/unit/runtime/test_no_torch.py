"""The runtime works on a box without torch: import everything and run a model end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("onnx")

from musc_edge.runtime.testing import make_tiny_model  # noqa: E402

BLOCKER = textwrap.dedent('''
    import importlib.abc, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        BLOCKED = ("torch", "torchvision", "open_clip")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked: the runtime must not need it")
            return None

    sys.meta_path.insert(0, NoTorch())
    for name in list(sys.modules):
        if name.split(".")[0] in NoTorch.BLOCKED:
            del sys.modules[name]
''')


def test_runtime_runs_without_torch(tmp_path):
    import cv2
    import numpy as np

    make_tiny_model(tmp_path / "tiny.onnx")
    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((40, 30, 3), 40 * i, np.uint8))
    (tmp_path / "bad.png").write_text("nope")
    script = BLOCKER + textwrap.dedent(f'''
        try:
            import torch
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker does not work")
        import musc_edge, musc_edge.datasets, musc_edge.outputs, musc_edge.core.meta, musc_edge.core.types, musc_edge.score.folder
        import musc_edge.cli.commands.score
        import musc_edge.runtime, musc_edge.runtime.model, musc_edge.runtime.preprocess
        import musc_edge.runtime.pipeline, musc_edge.runtime.backends.base
        import musc_edge.runtime.backends.onnxruntime
        from pathlib import Path
        from musc_edge.runtime.model import load_model
        from musc_edge.runtime.pipeline import iter_features
        root = Path({str(tmp_path)!r})
        paths = sorted(root.glob("*.png"))
        with load_model(root / "tiny.onnx") as model:
            batches = list(iter_features(paths, model, batch_size=2))
        n = sum(len(b) for b in batches)
        skipped = [str(p.name) for b in batches for p, _ in b.skipped]
        assert n == 3 and skipped == ["bad.png"], (n, skipped)
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip"))
        assert not leaked, leaked
        print("ok", n)
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("ok 3")
