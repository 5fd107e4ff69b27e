"""The package layout's rules (README "Where things are"), checked on the source: which package
may import which, and the size limits that keep modules readable."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "civt_cache"
#: package -> packages it must never import
FORBIDDEN = {
    "data": {"views", "cache", "loader", "train", "stages", "bench"},
    "views": {"cache", "loader", "train", "stages", "bench"},
    "cache": {"loader", "train", "stages", "bench"},
    "loader": {"stages", "bench"},
    "train": {"stages", "bench"},
    "models": {"cache", "loader", "train", "stages", "bench"},
    "stages": {"bench"},
}


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(PACKAGE)): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """Every module name imported anywhere in the file (also inside functions)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module if node.level == 0 else "." * node.level + node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_packages_import_only_downwards() -> None:
    bad = []
    for rel, tree in _modules().items():
        parts = rel.split("/")
        own = parts[0] if len(parts) > 1 else None
        for name in _imports(tree):
            assert not name.startswith("."), f"{rel}: relative import {name}; use civt_cache.<package>"
            if name == "tests" or name.startswith("tests."):
                bad.append(f"{rel} imports the tests ({name})")
            if not name.startswith("civt_cache."):
                continue
            target = name.split(".")[1]
            if target in FORBIDDEN.get(own, set()):
                bad.append(f"{rel} imports {name}")
            if own == "stages" and target == "stages" and name.split(".")[2:3] != [parts[1][:-3]]:
                bad.append(f"{rel} imports another stage ({name})")
    assert not bad, "\n".join(bad)


def test_module_and_function_sizes() -> None:
    long = []
    for rel, tree in _modules().items():
        lines = len((PACKAGE / rel).read_text().splitlines())
        if lines > 400:
            long.append(f"{rel}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{rel}: {node.name} is {node.end_lineno - node.lineno + 1} lines")
    assert not long, "\n".join(long)
