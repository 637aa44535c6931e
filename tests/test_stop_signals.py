"""Stop signals, over real processes: a role's first SIGTERM drains it, the same signal sent
twice at once (a process group's and its parent's forward of it: ``make run``, a systemd unit)
is still that one graceful stop, and a second one later exits at once; ``streamproc up``'s
supervisor forwards one SIGTERM whatever it is sent at once, and kills on a later second."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from streamproc._supervise import SAME_STOP_S

ROOT = Path(__file__).resolve().parent.parent

#: A role in miniature: the stop handlers of every streamproc role, then a drain of argv[1] s.
ROLE = textwrap.dedent(
    """
    import asyncio, sys
    from streamproc.cli import install_stop_handlers

    async def main() -> None:
        stop = asyncio.Event()
        def on_stop() -> None:
            print("stop", flush=True)
            stop.set()
        install_stop_handlers(on_stop)
        print("ready", flush=True)
        await stop.wait()
        await asyncio.sleep(float(sys.argv[1]))
        print("drained", flush=True)

    asyncio.run(main())
    """
)

SUPERVISOR = textwrap.dedent(
    """
    import sys
    from streamproc._supervise import supervise
    role, drain = sys.argv[1], sys.argv[2]
    sys.exit(supervise([[sys.executable, role, drain], [sys.executable, role, drain]]))
    """
)

pytestmark = pytest.mark.timeout(60)


def _start(script: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], line: str, count: int = 1) -> list[str]:
    """Read the process' output until ``line`` was printed ``count`` times."""
    assert proc.stdout is not None
    seen: list[str] = []
    while sum(s == line for s in seen) < count:
        got = proc.stdout.readline()
        assert got, f"exited before printing {line!r} x{count}: {seen}"
        seen.append(got.strip())
    return seen


@pytest.fixture
def role(tmp_path: Path) -> Path:
    path = tmp_path / "role.py"
    path.write_text(ROLE)
    return path


def test_the_same_stop_signal_twice_is_one_graceful_stop(role: Path) -> None:
    proc = _start(role, "1.0")
    _wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    # Once the first is handled (two at once would merge into one: signals do not queue),
    # the second within the window: the parent's forward of the group's SIGTERM.
    _wait_for(proc, "stop")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "drained" in out.splitlines()
    assert "stop_signal_repeated" in out
    assert "stopping_now" not in out


def test_a_second_stop_signal_later_exits_at_once(role: Path) -> None:
    proc = _start(role, "600")  # a drain that would outlast the test
    _wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "stop")  # the first was handled: the next one comes later than the window
    time.sleep(SAME_STOP_S + 0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 130, out
    assert "stopping_now" in out
    assert "drained" not in out


def test_the_supervisor_forwards_one_sigterm_for_a_signal_sent_twice(
    role: Path, tmp_path: Path
) -> None:
    sup = tmp_path / "supervisor.py"
    sup.write_text(SUPERVISOR)
    proc = _start(sup, str(role), "1.0")
    _wait_for(proc, "ready", 2)
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "stop", 2)  # forwarded: the supervisor handled the first
    proc.send_signal(signal.SIGTERM)  # make's forward of the same stop, within the window
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert out.splitlines().count("drained") == 2, out
    assert "stop_signal_repeated" not in out  # each child got one SIGTERM
    assert "stopping_now" not in out


def test_the_supervisor_kills_its_children_on_a_second_signal_later(
    role: Path, tmp_path: Path
) -> None:
    sup = tmp_path / "supervisor.py"
    sup.write_text(SUPERVISOR)
    proc = _start(sup, str(role), "600")
    _wait_for(proc, "ready", 2)
    proc.send_signal(signal.SIGTERM)
    _wait_for(proc, "stop", 2)
    time.sleep(SAME_STOP_S + 0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 1, out  # killed children are not a clean stop
    assert "drained" not in out
