"""CPU and memory of processes (from /proc, Linux) and of Redis (INFO)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

__all__ = ("cpu_s", "redis_cpu_s", "redis_memory", "rss_bytes")

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far; 0.0 when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    # fields after "(comm)": state is field 3; utime, stime are fields 14, 15
    rest = stat.rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) * _TICK_S


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (VmRSS); 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


async def redis_memory(client: aioredis.Redis) -> int:
    """Redis ``used_memory`` in bytes."""
    info: dict[str, Any] = await client.info("memory")
    return int(info["used_memory"])


async def redis_cpu_s(client: aioredis.Redis) -> float:
    """Redis server CPU seconds (user + system, main thread and children)."""
    info: dict[str, Any] = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])
