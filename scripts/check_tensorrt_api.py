"""Check, without a GPU, that every TensorRT API musc-edge calls exists in a given TensorRT release.

    pip download --no-deps -d wheels tensorrt-cu12-bindings==10.16.1.11 tensorrt-cu13-bindings==11.4.0.106
    python scripts/check_tensorrt_api.py wheels/tensorrt_cu12_bindings-*.whl wheels/tensorrt_cu13_bindings-*.whl

The bindings wheels are on PyPI, but the libraries they load (``tensorrt_libs``) come from
pypi.nvidia.com, and importing them needs a GPU driver anyway, so the bindings cannot be imported
on a plain CI machine. Their compiled module still carries every Python-visible name as a
string (pybind11 registers methods and enum members by name), so this script:

1. collects the names our code uses on TensorRT objects, from the source (``export/tensorrt.py``,
   ``runtime/backends/tensorrt.py``): attributes of ``trt`` and of the builder, network, parser,
   config, profile, timing cache, runtime, engine and execution context;
2. looks each one up among the strings of the wheel's ``tensorrt.so`` and its Python files.

Prints one JSON object per wheel (version, names missing) and exits 1 if any name is missing. A
name present is necessary, not sufficient: signatures are checked by tests/gpu on a real GPU.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = (REPO / "export" / "tensorrt.py", REPO / "runtime" / "backends" / "tensorrt.py")
#: Local names that hold TensorRT objects in those files (``self.<x>`` for the runner's).
TRT_OBJECTS = {"trt", "builder", "network", "parser", "config", "profile", "cache", "logger"}
TRT_SELF_ATTRS = {"engine", "context", "_runtime", "_trt"}
#: Defined by the bindings' Python __init__, or not a TensorRT name at all.
PYTHON_LEVEL = {"__version__", "nptype"}


def used_names(paths: tuple[Path, ...] = SOURCES) -> set[str]:
    """Attribute names our code reads from TensorRT objects (see the module docstring)."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                    and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and "trt" in ast.unparse(node.args[0]).split(".")[0]):
                names.add(str(node.args[1].value))  # getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
                continue
            if not isinstance(node, ast.Attribute):
                continue
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in TRT_OBJECTS:
                names.add(node.attr)
            elif (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name)
                  and owner.value.id == "self" and owner.attr in TRT_SELF_ATTRS):
                names.add(node.attr)
            elif (isinstance(owner, ast.Attribute) and isinstance(owner.value, ast.Name)
                  and owner.value.id == "trt"):  # trt.Logger.WARNING, trt.TensorIOMode.INPUT, ...
                names.add(node.attr)
    return names


def wheel_strings(wheel: Path) -> tuple[str, set[str]]:
    """(version, every identifier-like token in the wheel's compiled module and Python files)."""
    tokens: set[str] = set()
    version = "?"
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.endswith((".so", ".pyd")) or name.endswith(".py"):
                data = zf.read(info)
                tokens.update(t.decode() for t in re.findall(rb"[A-Za-z_][A-Za-z0-9_]{1,}", data))
            if name.endswith("METADATA"):
                m = re.search(rb"^Version: (\S+)", zf.read(info), re.M)
                version = m.group(1).decode() if m else version
    return version, tokens


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheels", nargs="+", type=Path, help="tensorrt_cu1x_bindings-*.whl files")
    args = p.parse_args(argv)
    names = sorted(used_names() - PYTHON_LEVEL)
    missing_any = False
    for wheel in args.wheels:
        if not wheel.is_file():
            print(f"error: {wheel} is not a file", file=sys.stderr)
            return 2
        version, tokens = wheel_strings(wheel)
        absent = [n for n in names if n not in tokens]
        # the linker stores a string that is the tail of another once ("INPUT" inside
        # "CONDITIONAL_INPUT"): such names are reported apart, as found by suffix
        by_suffix = [n for n in absent if any(t.endswith("_" + n) for t in tokens)]
        missing = [n for n in absent if n not in by_suffix]
        missing_any |= bool(missing)
        print(json.dumps({"wheel": wheel.name, "tensorrt": version, "names_checked": len(names),
                          "found_as_suffix": by_suffix, "missing": missing}))
    return 1 if missing_any else 0


if __name__ == "__main__":
    sys.exit(main())
