"""Each cluster's live feed: a Redis stream that the ingest service streams to viewers (SSE).

``<p>:state:{feed}:<cluster>`` holds what a cluster's people follow live: its notifications as
they are fanned out, and progress that concerns it. Every entry has the fields ``type`` (what
happened: ``notify.notification``, ``task.progress`` ...) and ``data`` (a JSON object); its
stream entry id is the SSE event id, so a viewer that reconnects with ``Last-Event-ID``
resumes right after the last entry it saw. The stream is trimmed to about ``maxlen`` entries
and expires ``FEED_TTL_S`` after its last entry: cluster ids come from agents, so a feed nobody
writes to any more goes (issue 17 item 5).

Writers: ``feed_effect`` inside a handler (the entry is written once, atomically with the
event's ack, however often the handler runs), or ``append`` elsewhere.

Every feed shares the hash tag ``{feed}``: the ingest's one blocking XREAD over all watched
feeds must stay in one slot on a Redis Cluster. There, a handler's effects may only touch its
topic's slot, so ``feed_effect`` appends at once instead (before the ack: a redelivery after
a crash can append the same entry again, which a viewer sees twice; nothing is lost). Before
``{feed}`` the keys were ``<p>:state:feed:<cluster>``; feeds are live views that expire in
7 days, so the old ones are left to expire.
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson
import redis.asyncio as aioredis

from streamproc.concern import Context
from streamproc.connection import is_cluster
from streamproc.keys import NAME_RE, Keys

__all__ = ("FEED_TTL_S", "append", "feed_effect", "feed_key", "trim")

#: A feed expires this long after its last entry.
FEED_TTL_S = 7 * 24 * 3600


def feed_key(keys: Keys, cluster_id: str) -> str:
    """The feed stream of a cluster (ids that are not plain names are hashed)."""
    part = (
        cluster_id
        if NAME_RE.fullmatch(cluster_id)
        else "h-" + hashlib.sha256(cluster_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    )
    return keys.state("{feed}", part)


def _fields(kind: str, data: dict[str, Any]) -> tuple[str, bytes]:
    return kind, orjson.dumps(data)


async def feed_effect(ctx: Context, cluster_id: str, kind: str, data: dict[str, Any]) -> None:
    """Append to the cluster's feed once, with the handled event's ack; on a Redis Cluster
    (the feed is in another slot than the event) at once, at least once."""
    if is_cluster(ctx.redis):
        await append(ctx.redis, ctx.keys, cluster_id, kind, data)
        return
    kind, body = _fields(kind, data)
    key = feed_key(ctx.keys, cluster_id)
    ctx.effect("XADD", key, "*", "type", kind, "data", body)
    ctx.effect("EXPIRE", key, FEED_TTL_S)


async def append(
    client: aioredis.Redis,
    keys: Keys,
    cluster_id: str,
    kind: str,
    data: dict[str, Any],
    *,
    maxlen: int = 10_000,
) -> str:
    """Append now (outside a handler's effects); the entry id."""
    kind, body = _fields(kind, data)
    key = feed_key(keys, cluster_id)
    async with client.pipeline(transaction=False) as pipe:
        pipe.xadd(key, {"type": kind, "data": body}, maxlen=maxlen, approximate=True)
        pipe.expire(key, FEED_TTL_S)
        entry, _ = await pipe.execute()
    return entry.decode() if isinstance(entry, bytes) else str(entry)


async def trim(client: aioredis.Redis, keys: Keys, cluster_id: str, maxlen: int) -> None:
    """Keep about ``maxlen`` entries (XTRIM ~: cheap, whole macro nodes only)."""
    await client.xtrim(feed_key(keys, cluster_id), maxlen=maxlen, approximate=True)
