"""Containers: the proof that they run (docker/test-containers.sh, where podman or docker
works), and what a container needs of every role without one (a prompt stop while waiting)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then closed: connects are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("command", "sig"),
    [
        (["consume", "cluster-events"], signal.SIGTERM),
        (["ticker"], signal.SIGTERM),
        (["ingest", "--port", str(_closed_port())], signal.SIGINT),
    ],
    ids=["consume-SIGTERM", "ticker-SIGTERM", "ingest-SIGINT"],
)
def test_a_role_waiting_for_redis_stops_on_a_signal(
    repo_root: Path, command: list[str], sig: signal.Signals
) -> None:
    """A role started before its Redis (a container before the redis service is up) waits for
    it, 30 s by default; SIGTERM/SIGINT during that wait end it with exit 0 and one line
    saying so. Before, SIGTERM hit the default action (fatal, or ignored as PID 1 in a
    container: `podman stop` waited 10 s and killed it) and SIGINT printed a traceback."""
    env = {
        **os.environ,
        "REDIS_URL": f"redis://127.0.0.1:{_closed_port()}/0",
        "STREAMPROC_LOG_JSON": "1",
    }
    with subprocess.Popen(
        [sys.executable, "-m", "streamproc", *command],
        cwd=repo_root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            seen: list[str] = []
            assert proc.stderr is not None
            for line in proc.stderr:  # the role gives up by itself after 30 s: this loop ends
                seen.append(line)
                if "waiting_for_redis" in line:
                    break
            assert any("waiting_for_redis" in line for line in seen), "".join(seen)[-3000:]
            proc.send_signal(sig)
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    err = "".join(seen) + err
    assert proc.returncode == 0, err[-3000:]
    assert f"streamproc: stopped by {sig.name} while waiting for Redis" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert "error: cannot reach Redis" not in err  # it did not run out its 30 s instead


@pytest.mark.slow
@pytest.mark.serial
@pytest.mark.timeout(1800)
def test_image_builds_and_bridge_compose_stack_works(repo_root: Path) -> None:
    """docker/test-containers.sh: build, compose up on the bridge network, each role healthy,
    one event ingest → consumer → notification, 3 consumer replicas, down. Skips (with the
    script's reason) where no engine works: CI machines have no podman."""
    if os.environ.get("STREAMPROC_SKIP_CONTAINERS"):
        pytest.skip("STREAMPROC_SKIP_CONTAINERS is set")
    if not (shutil.which("podman") or shutil.which("docker")):
        pytest.skip("neither podman nor docker is installed")
    done = subprocess.run(
        ["bash", str(repo_root / "docker" / "test-containers.sh")],
        capture_output=True,
        text=True,
        timeout=1750,
        check=False,
    )
    if done.returncode == 77:
        why = (done.stderr.strip().splitlines() or ["(no reason given)"])[-1]
        pytest.skip(f"containers cannot run here: {why}")
    assert done.returncode == 0, done.stderr[-6000:]
    assert "PASS:" in done.stdout, done.stdout[-3000:]
