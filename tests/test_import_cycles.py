"""The engine has no import cycles: module-level imports between streamproc modules form a DAG.

Imports inside functions and under ``if TYPE_CHECKING:`` are not counted (they do not run at
import time). The check parses the sources; it imports nothing.
"""

from __future__ import annotations

import ast
from pathlib import Path


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _top_level_imports(
    tree: ast.Module, name: str, is_package: bool, modules: set[str]
) -> set[str]:
    """``from pkg import sub`` counts as importing ``pkg.sub`` when that is a module (Python
    loads the submodule; the package's ``__init__`` is a parent every submodule has)."""
    out: set[str] = set()
    base = name.split(".") if is_package else name.split(".")[:-1]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, ast.Try | ast.If) else [node]:
            if isinstance(sub, ast.Import):
                out.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                if sub.level:
                    anchor = base[: len(base) - sub.level + 1]
                    target = ".".join([*anchor, sub.module] if sub.module else anchor)
                else:
                    target = sub.module or ""
                subs = {f"{target}.{a.name}" for a in sub.names} & modules
                out.update(subs or {target})
                if len(subs) < len(sub.names):
                    out.add(target)
    return {m for m in out if m.split(".")[0] == "streamproc"}


def graph(repo_root: Path) -> dict[str, set[str]]:
    root = repo_root
    files = sorted((root / "streamproc").rglob("*.py"))
    modules = {_module_name(root, f): f for f in files}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        targets = _top_level_imports(tree, name, path.name == "__init__.py", set(modules))
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(edges.get(n, ())):
            if state.get(m) == 1:
                return [*stack[stack.index(m) :], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(edges):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_engine_has_no_import_cycles(repo_root: Path) -> None:
    cycle = find_cycle(graph(repo_root))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
