"""Blocking task functions for tests/test_task_queues.py: module-level, so a spawned child
process imports them by name."""

from __future__ import annotations

import time
from typing import Any

from streamproc.tasks import SoftTimeLimit


def sleepy(payload: dict[str, Any]) -> dict[str, Any]:
    """Sleeps in steps; at the soft limit returns how far it got (partial results)."""
    done = 0
    try:
        for _ in range(int(payload.get("steps", 600))):
            time.sleep(0.05)
            done += 1
    except SoftTimeLimit:
        return {"partial": True, "steps_done": done}
    return {"partial": False, "steps_done": done}


def stubborn(payload: dict[str, Any]) -> str:
    """Ignores the soft limit and blocks on: only the hard limit ends it."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            time.sleep(0.05)
        except SoftTimeLimit:
            continue
    return "never"


def add(payload: dict[str, Any]) -> int:
    return int(payload["a"]) + int(payload["b"])
