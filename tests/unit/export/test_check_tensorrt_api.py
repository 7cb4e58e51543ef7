"""scripts/check_tensorrt_api.py: the names our TensorRT code uses, looked up in a bindings wheel."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
spec = importlib.util.spec_from_file_location("check_tensorrt_api", REPO / "scripts" / "check_tensorrt_api.py")
check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check)


def test_names_come_from_our_tensorrt_code():
    names = check.used_names()
    # builder, runner, enums and a getattr'd flag: a sample of each kind the AST walk must find
    assert {"create_network", "build_serialized_network", "set_timing_cache", "execute_async_v3",
            "set_tensor_address", "get_tensor_profile_shape", "WORKSPACE", "INPUT", "STRONGLY_TYPED"} <= names
    assert "astype" not in names and "ctypes" not in names  # numpy's, not TensorRT's


def _fake_wheel(path: Path, strings: list[str], version: str = "11.4.0.106") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("tensorrt_bindings/tensorrt.so", b"\x7fELF\x00" + b"\x00".join(s.encode() for s in strings))
        zf.writestr(f"tensorrt_bindings-{version}.dist-info/METADATA", f"Name: x\nVersion: {version}\n")
    return path


def test_a_missing_name_fails_and_a_tail_merged_one_is_reported_apart(tmp_path, capsys):
    names = sorted(check.used_names() - check.PYTHON_LEVEL)
    complete = [n for n in names if n != "INPUT"] + ["CONDITIONAL_INPUT"]
    ok = _fake_wheel(tmp_path / "ok.whl", complete)
    assert check.main([str(ok)]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["tensorrt"] == "11.4.0.106" and row["missing"] == [] and row["found_as_suffix"] == ["INPUT"]
    short = _fake_wheel(tmp_path / "short.whl", [n for n in complete if n != "execute_async_v3"])
    assert check.main([str(short)]) == 1
    assert json.loads(capsys.readouterr().out)["missing"] == ["execute_async_v3"]
