"""One module per CLI command; each parses flags and calls a library function."""

from __future__ import annotations

import importlib.util


def missing_modules(*modules: str) -> list[str]:
    """Those of ``modules`` that cannot be imported here (checked without importing them).

    A module stubbed out as None in ``sys.modules`` (how tests simulate an absent package) or a
    dotted name whose parent is missing counts as missing.
    """
    missing = []
    for module in modules:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(module)
    return missing
