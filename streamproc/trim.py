"""Safe trimming: never delete an entry some group has not acked.

A group is done with every entry below its *safe point*: its oldest pending entry if it has
any, else the entry after its last-delivered id. ``XTRIM MINID ~ <min of safe points>`` deletes
only whole nodes below that, so nothing a group still needs goes. An optional hard cap then
cuts to ``hard_maxlen`` entries, and says how many unacked entries it cut (log + metric).

Redis 8.2 can do this server-side (``XTRIM ... ACKED``); the 7.0 path here is what runs and is
tested.

The application declares which groups read each topic. A declared group that does not exist
yet will be created at ``0`` and must find every entry: until it exists nothing is trimmed
(a warning says which group holds trimming back); only the hard cap still cuts.
"""

from __future__ import annotations

from collections.abc import Collection

import redis.asyncio as aioredis
import structlog

from streamproc.groups import group_infos

__all__ = ("safe_point", "trim_stream")

log = structlog.get_logger("streamproc.trim")

#: (stream, group) pairs already warned about as declared but missing: one warning each
#: while the group stays missing, not one per trim interval.
_warned_missing: set[tuple[str, str]] = set()


def _succ(entry_id: bytes) -> bytes:
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or 0) + 1)


def _key(entry_id: bytes) -> tuple[int, int]:
    ms, _, seq = entry_id.partition(b"-")
    return int(ms), int(seq or 0)


async def safe_point(
    client: aioredis.Redis, stream: str, *, declared_groups: Collection[str] = ()
) -> bytes | None:
    """The lowest entry id some group still needs, or None when nothing may be trimmed.

    None when no group reads the stream, and when a group of ``declared_groups`` does not
    exist on it yet (it will start at ``0``: it needs everything).
    """
    groups = await group_infos(client, stream)
    missing = sorted(set(declared_groups) - {g.name for g in groups})
    for group in missing:
        if (stream, group) not in _warned_missing:
            _warned_missing.add((stream, group))
            log.warning(
                "trim_held_back_by_missing_group",
                stream=stream,
                group=group,
                detail="a declared group does not exist yet; nothing is trimmed until it does",
            )
    for group in declared_groups:
        if group not in missing:
            _warned_missing.discard((stream, group))
    if missing:
        return None
    points = []
    for g in groups:
        oldest = None
        if g.pending:
            # may have been acked since XINFO: then the summary has no min
            oldest = (await client.xpending(stream, g.name))["min"]
        points.append(oldest or _succ(g.last_delivered_id.encode()))
    return min(points, key=_key) if points else None


async def trim_stream(
    client: aioredis.Redis,
    stream: str,
    *,
    hard_maxlen: int = 0,
    declared_groups: Collection[str] = (),
) -> int:
    """Trim below the groups' safe point; returns entries removed (a hard cap counts too).

    While a group of ``declared_groups`` does not exist on the stream, only the hard cap
    (if any) trims.
    """
    point = await safe_point(client, stream, declared_groups=declared_groups)
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
