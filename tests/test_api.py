"""The public API: every exported name resolves, and type checkers see each one (the
TYPE_CHECKING imports in bnprobe/__init__.py list exactly the lazily exported names)."""

from __future__ import annotations

import ast
from pathlib import Path

import bnprobe


def test_every_exported_name_resolves_to_its_module() -> None:
    for name in bnprobe.__all__:
        value = getattr(bnprobe, name)
        if name != "__version__":
            assert value.__module__ == bnprobe._EXPORTS[name], name


def test_type_checkers_see_every_export() -> None:
    tree = ast.parse(Path(bnprobe.__file__).read_text())
    guarded = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "TYPE_CHECKING")
    seen = {alias.name: f"bnprobe.{node.module}" for node in guarded.body if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert seen == bnprobe._EXPORTS
    assert sorted(bnprobe.__all__) == sorted([*bnprobe._EXPORTS, "__version__"])
