"""Run a set of child processes as one unit (``streamproc up``, ``ingest --workers N``)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from types import FrameType

__all__ = ("SAME_STOP_S", "supervise")

#: A stop signal this soon after the first is the same stop sent twice, not a second one: a
#: process group's signal and the parent's forward of it (``make`` forwards its SIGTERM to its
#: child; systemd's default ``KillMode=control-group`` signals every process of the unit).
SAME_STOP_S = 1.0


def supervise(commands: Sequence[Sequence[str]], env: Mapping[str, str] | None = None) -> int:
    """Start every command; stop them all when one ends or on SIGTERM/SIGINT.

    Children get their own process group, so a Ctrl-C in the terminal reaches this process
    alone: it forwards one SIGTERM (each child drains and exits); a second signal, more than
    ``SAME_STOP_S`` after the first, kills them. Returns 0 when every child exited cleanly (0
    or by that SIGTERM), else 1.
    """
    children: list[subprocess.Popen[bytes]] = []
    stopping = False
    first_at = 0.0

    def stop(_signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping, first_at
        now = time.monotonic()
        if stopping and now - first_at < SAME_STOP_S:
            return  # the same stop, sent twice (or a handler run again while it forwards)
        kill = stopping
        if not stopping:  # set before forwarding: a signal landing mid-loop is not a second
            stopping, first_at = True, now
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGKILL if kill else signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for argv in commands:
            children.append(subprocess.Popen(list(argv), env=env, process_group=0))
            print(f"started: {' '.join(argv[2:])} (pid {children[-1].pid})", flush=True)
        # Any child ending stops the others: a half-running system is not "up".
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
        if not stopping:
            stop(signal.SIGTERM, None)
        codes = [c.wait() for c in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
