"""The engine is a library: nothing under ``streamproc/`` imports the application.

The application (``schemas/``, ``consumers/``, ``producers/``, ``application/``) imports the
engine, never the other way round; the CLI loads an application by name (``--app``). This
reads every engine module's source (no import) and lists each import of the application,
including ``importlib.import_module("consumers...")`` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APPLICATION = frozenset(
    {"schemas", "consumers", "producers", "application", "notifications", "spot"}
)


def _imported(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in a module, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id == "__import__")
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def application_imports(package: Path) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for line, module in _imported(tree):
            if module.split(".")[0] in APPLICATION:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return problems


def test_no_engine_module_imports_the_application() -> None:
    modules = list((ROOT / "streamproc").rglob("*.py"))
    assert len(modules) > 40  # the walk found the engine
    assert application_imports(ROOT / "streamproc") == []


def test_the_check_sees_every_form_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "streamproc"
    pkg.mkdir()
    (pkg / "bad.py").write_text(
        "import schemas\n"
        "from consumers.tasks import TASK_TYPES\n"
        "def f():\n"
        "    from producers import schedules\n"
        "    import importlib\n"
        "    return importlib.import_module('application')\n"
        "from . import schemas as fine  # relative: the engine's own\n"
        "import schemasx\n"
    )
    found = _imported(ast.parse((pkg / "bad.py").read_text()))
    flagged = sorted((line, m) for line, m in found if m.split(".")[0] in APPLICATION)
    assert flagged == [
        (1, "schemas"),
        (2, "consumers.tasks"),
        (4, "producers"),
        (6, "application"),
    ]
