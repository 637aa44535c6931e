"""docs/writing-an-app.md is runnable: its code blocks are written out and its test passes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

_BLOCK = re.compile(r"```python\n# (\S+\.py)[^\n]*\n(.*?)```", re.S)


def test_the_guide_s_app_and_its_test_run(repo_root: Path, tmp_path: Path) -> None:
    page = (repo_root / "docs" / "writing-an-app.md").read_text()
    files: dict[str, str] = {}
    for name, code in _BLOCK.findall(page):
        files[name] = files.get(name, "") + code
    assert set(files) == {"orders.py", "test_orders.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{repo_root}"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_orders.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    # and the CLI loads the App by name
    listed = subprocess.run(
        [sys.executable, "-m", "streamproc", "--app", "orders:app", "dlq", "list", "nope"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 2
    assert "order-totals" in listed.stderr  # "unknown group 'nope'; known: order-totals"
