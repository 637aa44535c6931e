"""Consumer groups of a stream: the one place that reads ``XINFO GROUPS``.

``group_infos(client, stream)`` gives every group of a stream as a typed ``GroupInfo``;
``group_info(client, stream, group)`` the one named. A stream that does not exist has no
groups (``[]`` / None) instead of an error.

``ensure_declared_groups(client, keys, declared)`` creates the groups an application declares
(``App.declared_groups``): every role calls it at start.

``register_topics`` adds topics to the registry set ``Keys.topics()`` (where a group is
created and where a producer first writes a topic); ``registered_topics`` reads it, so the
dashboard lists topics without SCANning the keyspace.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from streamproc.errors import StreamprocError
from streamproc.keys import Keys

__all__ = (
    "GroupInfo",
    "ensure_declared_groups",
    "group_info",
    "group_infos",
    "register_topics",
    "registered_topics",
)

log = structlog.get_logger("streamproc.groups")


class GroupInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One row of ``XINFO GROUPS``."""

    name: str
    #: Consumers known to the group (busy or not).
    consumers: int
    #: Entries delivered to the group and not acked yet (its PEL).
    pending: int
    last_delivered_id: str
    #: Entries the group has read (7.0+); None when Redis cannot tell.
    entries_read: int | None
    #: Entries not yet delivered to the group; None after trims or SETID made it unknowable.
    lag: int | None

    @property
    def backlog(self) -> int | None:
        """lag + pending: what the group has not finished; None when lag is unknown."""
        return None if self.lag is None else self.lag + self.pending


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _count(value: Any) -> int | None:
    return None if value is None else int(value)


def _row(row: dict[Any, Any]) -> GroupInfo:
    # redis-py reads the field names as text and keeps the values as they came (bytes unless
    # the client decodes responses).
    return GroupInfo(
        name=_text(row["name"]),
        consumers=int(row.get("consumers") or 0),
        pending=int(row.get("pending") or 0),
        last_delivered_id=_text(row.get("last-delivered-id") or "0-0"),
        entries_read=_count(row.get("entries-read")),
        lag=_count(row.get("lag")),
    )


async def group_infos(client: aioredis.Redis, stream: str) -> list[GroupInfo]:
    """Every group reading ``stream``, in Redis' order; [] when the stream does not exist.

    Other errors (a key of another type, a connection error) are raised as they are.
    """
    try:
        rows: list[dict[Any, Any]] = await client.xinfo_groups(stream)
    except ResponseError as e:
        if "no such key" in str(e).lower():
            return []
        raise
    return [_row(r) for r in rows]


async def group_info(client: aioredis.Redis, stream: str, group: str) -> GroupInfo | None:
    """The group ``group`` of ``stream``; None when it (or the stream) does not exist."""
    return next((g for g in await group_infos(client, stream) if g.name == group), None)


async def register_topics(client: aioredis.Redis, keys: Keys, topics: Iterable[str]) -> None:
    """Add ``topics`` to the registry set (SADD: adding one again changes nothing)."""
    names = sorted(set(topics))
    if names:
        await client.sadd(keys.topics(), *names)


async def registered_topics(client: aioredis.Redis, keys: Keys) -> list[str]:
    """The topics in the registry set, sorted (a topic whose stream is gone may be listed)."""
    members: Collection[Any] = await client.smembers(keys.topics())
    return sorted(_text(m) for m in members)


async def ensure_declared_groups(
    client: aioredis.Redis, keys: Keys, declared: Mapping[str, Collection[str]]
) -> list[tuple[str, str]]:
    """Create every declared group on its topic's stream (at id 0, MKSTREAM); the pairs created.

    A group that exists already (BUSYGROUP) is left as it is: it keeps its position. A
    group created here starts at the beginning of the stream, so it reads what is still there.
    Any other refusal is a StreamprocError naming the stream and group; connection errors
    propagate as they are.
    """
    created: list[tuple[str, str]] = []
    # a partitioned topic's groups are created on every partition (Keys.partitions_of)
    parts = {p: groups for topic, groups in declared.items() for p in keys.partitions_of(topic)}
    await register_topics(client, keys, parts)
    for topic, groups in parts.items():
        stream = keys.stream(topic)
        for group in groups:
            try:
                await client.xgroup_create(stream, group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" in str(e):
                    continue
                raise StreamprocError(f"cannot create group {group} on {stream}: {e}") from e
            created.append((topic, group))
    if created:
        log.info("groups_created", groups=[f"{t}/{g}" for t, g in created])
    return created
