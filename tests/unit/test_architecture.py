"""The package's architecture, checked: the core stands alone, and imports run one way.

STYLE.md, "Imports in one direction": CLI -> apps -> calibration / export -> runtime / datasets /
outputs -> core. A function-level import that reaches back up is the same dependency, hidden, so
the AST walk below collects every import statement of every file (module level, function level,
under ``if TYPE_CHECKING``, relative ones resolved), plus ``importlib.import_module("...")`` with a
literal name and ``"module:attr"`` registry strings naming one of our modules.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# --- the table ------------------------------------------------------------------------------------

#: setuptools ``package-dir`` of pyproject.toml: import prefix -> folder of the repository.
PACKAGE_DIRS: dict[str, str] = {
    "musc_edge": "musc_edge",
    "musc_edge.runtime": "runtime",
    "musc_edge.export": "export",
    "musc_edge.calibration": "calibration",
}

#: Layers, lowest first. Each layer holds one or more groups (name -> module prefixes). A module may
#: import its own group and any group of a LOWER layer; groups side by side in one layer may not
#: import each other. A prefix matches the module itself and its submodules, except "musc_edge",
#: which names only the top-level package's ``__init__`` (it lazily imports the core, and
#: ``from musc_edge import __version__`` is allowed from anywhere).
LAYERS: tuple[dict[str, tuple[str, ...]], ...] = (
    {"core": ("musc_edge.core", "musc_edge")},
    {"runtime": ("musc_edge.runtime",), "datasets": ("musc_edge.datasets",), "outputs": ("musc_edge.outputs",)},
    {"calibration": ("musc_edge.calibration",)},
    {"export": ("musc_edge.export",)},
    {"score": ("musc_edge.score",), "watch": ("musc_edge.watch",)},
    {"cli": ("musc_edge.cli", "musc_edge.__main__")},
)

#: Prefixes matched exactly (the module itself only, not its submodules).
EXACT = frozenset({"musc_edge", "musc_edge.__main__"})

#: Third-party packages the core must run without (blocked in a subprocess).
BLOCKED_FOR_CORE = ("cv2", "click", "watchdog", "onnxruntime", "torch", "open_clip", "tqdm")


# --- mapping files to modules, and modules to layers ------------------------------------------------

def source_files() -> dict[str, Path]:
    """Every module of the package: dotted name -> file (the package-dir mapping applied)."""
    modules: dict[str, Path] = {}
    # the longest prefix owns a folder: musc_edge.runtime lives in runtime/, not musc_edge/runtime/
    for prefix, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        base = REPO / folder
        for path in sorted(base.rglob("*.py")):
            if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(base).parts):
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([prefix, *parts])
            modules.setdefault(name, path)
    return modules


def group_of(module: str) -> tuple[int, str] | None:
    """(layer index, group name) of one of our modules; None for a module the table does not cover."""
    best: tuple[int, int, str] | None = None
    for level, groups in enumerate(LAYERS):
        for group, prefixes in groups.items():
            for prefix in prefixes:
                hit = module == prefix or (prefix not in EXACT and module.startswith(prefix + "."))
                if hit and (best is None or len(prefix) > best[0]):
                    best = (len(prefix), level, group)
    return None if best is None else (best[1], best[2])


def is_ours(module: str) -> bool:
    return module == "musc_edge" or module.startswith("musc_edge.")


# --- collecting imports ---------------------------------------------------------------------------

def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    package = module if is_package else module.rpartition(".")[0]
    parts = package.split(".")
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = ".".join(parts[: len(parts) - (level - 1)])
    return f"{base}.{target}" if target else base


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``, at any depth of the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import name` imports the submodule pkg.name when there is one
                found.append((sub if sub in known else base, node.lineno))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                found.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ":" in node.value:
            # registry strings, "musc_edge.export.clip:build": imported by name later
            target = node.value.split(":", 1)[0]
            if target in known:
                found.append((target, node.lineno))
    return found


def violations() -> tuple[list[str], list[str]]:
    """(violations, modules the table does not place), each as printable lines."""
    modules = source_files()
    known = set(modules)
    bad, unplaced = [], []
    for module, path in sorted(modules.items()):
        here = group_of(module)
        if here is None:
            unplaced.append(f"{module} ({path.relative_to(REPO)}): in no layer of LAYERS")
            continue
        for target, line in sorted(set(imports_of(module, path, known)), key=lambda t: (t[1], t[0])):
            if not is_ours(target):
                continue
            where = f"{path.relative_to(REPO)}:{line}"
            if group_of(target) is None:
                unplaced.append(f"{module} -> {target} ({where}): the imported module is in no layer")
                continue
            why = judge(module, target)
            if why is not None:
                bad.append(f"{module} -> {target} ({where}): {why}")
    return bad, unplaced


def judge(importer: str, target: str) -> str | None:
    """Why ``importer`` may not import ``target`` (both placed in LAYERS); None when it may."""
    here, there = group_of(importer), group_of(target)
    assert here is not None and there is not None, (importer, target)
    if there[1] == here[1] or there[0] < here[0]:
        return None
    why = "a layer above it" if there[0] > here[0] else "a sibling group of the same layer"
    return f"{here[1]} imports {there[1]}, {why}"


# --- tests ----------------------------------------------------------------------------------------

def test_package_dirs_match_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert config["tool"]["setuptools"]["package-dir"] == PACKAGE_DIRS


def test_the_walk_sees_every_folder_and_hidden_imports() -> None:
    modules = source_files()
    for name in ("musc_edge", "musc_edge.core.scorer", "musc_edge.runtime.model", "musc_edge.runtime.backends.base",
                 "musc_edge.export.tensorrt", "musc_edge.calibration.report", "musc_edge.cli.commands.score"):
        assert name in modules, name
    assert modules["musc_edge.runtime.model"] == REPO / "runtime" / "model.py"
    # a function-level relative import is found and resolved
    found = imports_of("musc_edge.runtime.model", modules["musc_edge.runtime.model"], set(modules))
    assert "musc_edge.runtime.backends.onnxruntime" in {m for m, _ in found}
    # `from . import flat` names the submodule
    found = imports_of("musc_edge.datasets", modules["musc_edge.datasets"], set(modules))
    assert "musc_edge.datasets.flat" in {m for m, _ in found}
    # the CLI's lazy registry strings count as imports
    found = imports_of("musc_edge.cli", modules["musc_edge.cli"], set(modules))
    assert "musc_edge.cli.commands.score" in {m for m, _ in found}


def test_layer_rules_on_examples() -> None:
    assert group_of("musc_edge") == (0, "core")
    assert group_of("musc_edge.core.msm") == (0, "core")
    assert group_of("musc_edge.cli.commands.score") == (5, "cli")
    assert group_of("musc_edge.something_new") is None  # a new subpackage must be placed in the table
    assert judge("musc_edge.score.folder", "musc_edge.datasets.base") is None
    assert judge("musc_edge.export.tensorrt", "musc_edge.calibration.quantize") is None  # export sits above
    assert judge("musc_edge.datasets.visa", "musc_edge") is None  # `from musc_edge import __version__`
    assert judge("musc_edge.core.msm", "musc_edge") is None
    assert "a layer above" in judge("musc_edge.calibration.report", "musc_edge.score.folder")
    assert "a layer above" in judge("musc_edge.core.metrics", "musc_edge.datasets")
    assert "sibling" in judge("musc_edge.runtime.testing", "musc_edge.datasets")
    assert "sibling" in judge("musc_edge.watch.daemon", "musc_edge.score")
    assert "a layer above" in judge("musc_edge.calibration.reader", "musc_edge.export.onnx")


def test_a_hidden_import_is_found(tmp_path) -> None:
    """A function-level, relative import reaching up is collected and resolved like any other."""
    path = tmp_path / "report.py"
    path.write_text("def f():\n    from ..score import folder\n    from .. import watch\n", encoding="utf-8")
    known = {"musc_edge.score", "musc_edge.score.folder", "musc_edge.watch"}
    found = imports_of("musc_edge.calibration.report", path, known)
    assert found == [("musc_edge.score.folder", 2), ("musc_edge.watch", 3)]
    assert judge("musc_edge.calibration.report", "musc_edge.score.folder") is not None


def test_every_module_is_placed_in_a_layer() -> None:
    _, unplaced = violations()
    assert not unplaced, "modules missing from LAYERS:\n  " + "\n  ".join(unplaced)


def test_imports_run_one_way() -> None:
    bad, _ = violations()
    for line in bad:
        print(line)
    assert not bad, f"{len(bad)} import(s) against the layers (lowest first: " \
                    + " < ".join("/".join(g) for g in LAYERS) + "):\n  " + "\n  ".join(bad)


BLOCKER = textwrap.dedent('''
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        BLOCKED = {blocked!r}

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{{name}} is blocked: the core must not need it")
            return None

    sys.meta_path.insert(0, Blocker())
    for name in list(sys.modules):
        if name.split(".")[0] in Blocker.BLOCKED:
            del sys.modules[name]
''')


def test_core_stands_alone() -> None:
    core = sorted(m for m in source_files() if m == "musc_edge.core" or m.startswith("musc_edge.core."))
    assert len(core) > 5, core
    script = BLOCKER.format(blocked=BLOCKED_FOR_CORE) + textwrap.dedent(f'''
        for name in Blocker.BLOCKED:
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"the blocker does not block {{name}}")
        import importlib
        for name in {core!r}:
            importlib.import_module(name)

        def outside_core():
            ours = sorted(m for m in sys.modules if m == "musc_edge" or m.startswith("musc_edge."))
            return [m for m in ours if m not in ("musc_edge", "musc_edge.core") and not m.startswith("musc_edge.core.")]

        assert not outside_core(), f"importing musc_edge.core loaded {{outside_core()}}"

        import numpy as np
        import musc_edge
        rng = np.random.default_rng(0)
        layers = [rng.standard_normal((5, 1 + 16, c)).astype(np.float32) for c in (8, 12)]
        emb = rng.standard_normal((5, 6))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        s = musc_edge.score_tokens(layers, emb)
        assert s.patch_maps.shape == (5, 4, 4), s.patch_maps.shape
        assert np.isfinite(s.image_scores).all() and np.isfinite(s.patch_maps).all()
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in Blocker.BLOCKED)
        assert not leaked, leaked
        assert not outside_core(), f"scoring loaded {{outside_core()}}"
        print("ok", len({core!r}))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith(f"ok {len(core)}")
