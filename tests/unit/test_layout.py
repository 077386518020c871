"""The package's shape, checked statically (nothing imported): no import cycle among rayapp's
modules at import time, no module importing another module's private name, every module of
training/ under 500 lines, and one table of job kinds."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PKG = ROOT / "rayapp"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _import_time_imports(module: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """rayapp modules imported when ``module`` is imported: top-level statements only (imports
    inside functions run later; ``if TYPE_CHECKING:`` blocks never run)."""
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    is_pkg = path.name == "__init__.py"

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody"):
                    visit(getattr(node, block, []) or [])
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                continue
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("rayapp"))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(node, module, is_pkg)
                if target.startswith("rayapp"):
                    found.add(target)
                    found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods)

    visit(tree.body)
    # importing a.b.c imports the packages a and a.b first
    closed = set()
    for name in found:
        parts = name.split(".")
        closed.update(".".join(parts[: i + 1]) for i in range(len(parts)))
    return {m for m in closed if m in mods and m != module}


def test_no_import_cycle_at_import_time():
    mods = _modules()
    graph = {m: _import_time_imports(m, p, mods) for m, p in mods.items()}
    # a package importing its own submodules (``from .x import y`` in __init__) is how packages
    # re-export; the cycle that breaks is between modules that each need the other to be complete.
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not (m.startswith(d + ".") and (PKG.parent / (d.replace(".", "/") + "/__init__.py")).exists())}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                dfs(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "import cycles at import time:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_imports_another_modules_private_name():
    offenders = []
    for path in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rayapp"):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {node.module}.{a.name}"
                              for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offenders, "private names imported across modules:\n" + "\n".join(offenders)


def test_training_modules_are_under_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in (PKG / "training").rglob("*.py")
            if (n := len(p.read_text().splitlines())) >= 500}
    assert not long, f"modules of training/ at 500 lines or more: {long}"


def test_one_table_of_job_kinds():
    """Every kind the loader accepts has its recipe in rayapp.kinds, and nothing else defines a
    kind table."""
    from rayapp import kinds
    from rayapp.config.loader import load_job_dict  # noqa: F401  (the loader reads kinds)

    tables = [str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")
              if p.name != "kinds.py" and any(s in p.read_text() for s in ("JOB_KINDS = {", "RECIPES = {"))]
    assert not tables, f"kind tables outside rayapp/kinds.py: {tables}"
    assert kinds.KINDS, "rayapp.kinds has no kinds"
