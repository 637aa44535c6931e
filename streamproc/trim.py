"""Safe trimming: never delete an entry some group has not acked.

A group is done with every entry below its *safe point*: its oldest pending entry if it has
any, else the entry after its last-delivered id. ``XTRIM MINID ~ <min of safe points>`` deletes
only whole nodes below that, so nothing a group still needs goes. An optional hard cap then
cuts to ``hard_maxlen`` entries, and says how many unacked entries it cut (log + metric).

Redis 8.2 can do this server-side (``XTRIM ... ACKED``); the 7.0 path here is what runs and is
tested.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

__all__ = ("safe_point", "trim_stream")

log = structlog.get_logger("streamproc.trim")


def _succ(entry_id: bytes) -> bytes:
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or 0) + 1)


def _key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def safe_point(client: aioredis.Redis, stream: str) -> bytes | None:
    """The lowest entry id some group still needs, or None when no group reads the stream."""
    try:
        groups: list[dict[str, Any]] = await client.xinfo_groups(stream)
    except ResponseError:
        return None
    points = []
    for g in groups:
        oldest = None
        if int(g["pending"]):
            # may have been acked since XINFO: then the summary has no min
            oldest = (await client.xpending(stream, g["name"]))["min"]
        points.append(oldest or _succ(g["last-delivered-id"]))
    return min(points, key=_key) if points else None


async def trim_stream(client: aioredis.Redis, stream: str, *, hard_maxlen: int = 0) -> int:
    """Trim below the groups' safe point; returns entries removed (a hard cap counts too)."""
    point = await safe_point(client, stream)
    removed = 0
    if point is not None:
        removed = int(await client.xtrim(stream, minid=point, approximate=True))
    if hard_maxlen:
        length = int(await client.xlen(stream))
        if length > hard_maxlen:
            cut = int(await client.xtrim(stream, maxlen=hard_maxlen, approximate=False))
            removed += cut
            from streamproc.metrics import TRIM_CUT_UNACKED

            TRIM_CUT_UNACKED.labels(stream=stream).inc(cut)
            log.error("hard_cap_cut_unacked", stream=stream, cut=cut, hard_maxlen=hard_maxlen)
    return removed
