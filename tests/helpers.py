"""Small helpers shared by the tests (fixtures are in conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Consumer, Keys

__all__ = ("MakeConsumer", "entries", "free_port", "pending", "spot")

MakeConsumer = Callable[..., Consumer]


def spot(i: int, **kw: Any) -> SpotInterruption:
    """A spot interruption with instance id ``i-<i>``."""
    return SpotInterruption(
        cluster_id="c1",
        key="c1",
        instance_id=f"i-{i}",
        instance_type="m5.large",
        availability_zone="eu-west-1a",
        **kw,
    )


async def pending(client: aioredis.Redis, keys: Keys, group: str = "g") -> int:
    """Entries of topic ``cluster`` that ``group`` read and did not ack."""
    return int((await client.xpending(keys.stream("cluster"), group))["pending"])


async def entries(client: aioredis.Redis, key: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """XRANGE of a whole stream, typed (redis-py's own reply type is a loose union)."""
    rows: Any = await client.xrange(key)
    return [(i, f) for i, f in rows]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
