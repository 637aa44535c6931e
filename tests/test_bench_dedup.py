"""benchmarks/dedup_cost.py: a smoke run of both modes, real redis-servers and child processes,
no timing asserts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,  # a benchmark script: timed child processes, a redis-server each
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


def _dedup_cost(repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "benchmarks/dedup_cost.py", *args],
        cwd=repo_root,
        env={**os.environ, "STREAMPROC_LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )


def test_bulk_mode_measures_each_tree_with_its_own_code_and_every_effect_once(
    repo_root: Path, tmp_path: Path
) -> None:
    """``--before FOLDER`` runs the 'before' variants on that folder's streamproc (a copy here),
    'after' on this tree's; each variant applies every event's effect once (the script fails
    otherwise) and the table has both trees, both dedup settings and the three ratios."""
    tree = tmp_path / "tree"
    shutil.copytree(
        repo_root / "streamproc", tree / "streamproc", ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path / "dedup.json"
    pin = ["--pin"] if len(os.sched_getaffinity(0)) >= 2 else []  # Redis on a core of its own
    r = _dedup_cost(
        repo_root,
        "--before",
        str(tree),
        "--events",
        "1500",
        "--batch",
        "100",
        "--json",
        str(out),
        *pin,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    if pin:
        assert "# pinned: redis-server on CPU" in r.stdout
    label = f"before ({tree})"
    for row in (f"| {label} | off |", f"| {label} | on |", "| after | off |", "| after | on |"):
        assert row in r.stdout
    assert "Redis CPU on/off (target ≤ 1.3)" in r.stdout
    result = json.loads(out.read_text())
    assert set(result["variants"]) == {
        f"{t} dedup {d}" for t in (label, "after") for d in ("off", "on")
    }
    for name, v in result["variants"].items():
        [run] = v["runs"]
        want = tree if name.startswith("before") else repo_root
        assert Path(run["streamproc"]).is_relative_to(want.resolve()), run["streamproc"]
        assert run["applied"] == run["events"] == 1500
        assert v["cpu_us"] > 0
        assert v["drain_per_s"] > 0
        assert v["stream_b"] > 0
        assert any(f["family"].endswith(":stream") for f in run["families"])
    # dedup off keeps no per-event key in either tree
    for t in (label, "after"):
        assert result["variants"][f"{t} dedup off"]["keys"] < 0.01
    assert set(result["ratios"]) == {label, "after"}


def test_soak_mode_samples_memory_and_judges_the_last_half(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    r = _dedup_cost(
        repo_root,
        "--soak",
        "6",
        "--rate",
        "300",
        "--window-ms",
        "1000",
        "--sample-s",
        "1",
        "--json",
        str(out),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| t s | published | used_memory B |" in r.stdout
    soak = json.loads(out.read_text())["soak"]["after"]
    assert len(soak["samples"]) >= 6
    assert soak["published"] > 0
    published = [s["published"] for s in soak["samples"]]
    assert published == sorted(published)
    assert "slope_other_b_per_s" in soak  # window full after 2 s: the last half has a verdict
    assert isinstance(soak["flat"], bool)


@pytest.mark.skipif(
    shutil.which("valgrind") is None, reason="needs valgrind (make test installs it)"
)
def test_instruction_counts_per_event_for_dedup_off_and_on(repo_root: Path, tmp_path: Path) -> None:
    """benchmarks/dedup_instructions.py: redis-server under callgrind, each variant's published
    events drained with every effect once (the script fails otherwise); recording ids costs
    Redis instructions on the publish side, none on the drain side (within 10 %)."""
    out = tmp_path / "instr.json"
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/dedup_instructions.py",
            "--events",
            "300",
            "--window-ms",
            "10000",
            "--json",
            str(out),
            "--top",
            "5",
        ],
        cwd=repo_root,
        env={**os.environ, "STREAMPROC_LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| after | off |" in r.stdout
    assert "| after | on |" in r.stdout
    result = json.loads(out.read_text())
    off, on = result["variants"]["after dedup off"], result["variants"]["after dedup on"]
    for v in (off, on):
        assert Path(v["streamproc"]).is_relative_to(repo_root.resolve())
        assert v["publish"] > 0
        assert v["drain"] > 0
    assert on["publish"] > off["publish"]
    assert abs(on["drain"] - off["drain"]) < 0.1 * off["drain"]
    assert result["ratios"]["after"] == on["total"] / off["total"]
    # --top: the publish step's functions (libc's have names even in Debian's stripped build)
    assert on["functions"]
    assert off["functions"]
    listed = r.stdout.split("differing most, on - off, instructions per event\n", 1)[1]
    assert len(listed.strip().splitlines()) == 5, r.stdout


def test_instruction_counts_refuse_a_redis_server_that_is_not_there(repo_root: Path) -> None:
    r = subprocess.run(
        [sys.executable, "benchmarks/dedup_instructions.py", "--redis-server", "/nonexistent"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 2
    assert "--redis-server /nonexistent: not an executable file" in r.stderr


def test_record_shapes_store_each_record_and_report_against_hsetnx(
    repo_root: Path, tmp_path: Path
) -> None:
    """benchmarks/dedup_record_shapes.py: every shape stores (nearly) every record it is given
    (a cost model that dropped records would look cheap), and each row is against hsetnx."""
    out = tmp_path / "shapes.json"
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/dedup_record_shapes.py",
            "--records",
            "3000",
            "--rounds",
            "1",
            "--json",
            str(out),
        ],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads(out.read_text())["summary"]
    assert set(summary) == {"hsetnx", "hsetnx-48", "range", "bitfield", "hashtable"}
    assert summary["hsetnx"]["ratio"] == 1.0
    for shape, s in summary.items():
        assert s["stored"] >= 0.95, shape
        assert s["cpu_us"] > 0, shape
        assert f"| {shape} |" in r.stdout
    # the string tables are allocated whole before the records: their bytes include the table
    assert summary["range"]["bytes"] > 0
