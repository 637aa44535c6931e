"""Dead letters: list, show, replay and purge a group's DLQ streams (one per topic).

A dead letter keeps the original entry's fields verbatim and adds ``dlq_*`` fields: reason
(``permanent``, ``retries_exhausted``, ``poison``, or a decode reason such as
``unknown_type``), exception type and message, attempts, deliveries, consumer, group, topic,
the original entry id and the time.

Replay sends the original fields back with the event id unchanged, and deletes the dead letter
in the same script. By default it goes to the group's own retry stream, so only the group that
failed sees it again; ``to_topic=True`` appends it to the topic stream for every group (groups
that already applied it drop it by their dedup window).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis.asyncio as aioredis

from streamproc import _scripts
from streamproc.concern import Concern
from streamproc.keys import Keys

__all__ = ("DeadLetter", "dead_letters", "purge", "replay")


class DeadLetter:
    __slots__ = ("dlq_id", "fields", "topic")

    def __init__(self, topic: str, dlq_id: str, fields: dict[bytes, bytes]) -> None:
        self.topic, self.dlq_id, self.fields = topic, dlq_id, fields

    def get(self, name: str) -> str:
        return self.fields.get(name.encode(), b"").decode(errors="replace")

    def original(self) -> dict[bytes, bytes]:
        return {k: v for k, v in self.fields.items() if not k.startswith(b"dlq_")}

    def as_dict(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "dlq_id": self.dlq_id,
            "fields": {
                k.decode(errors="replace"): v.decode(errors="replace")
                for k, v in self.fields.items()
            },
        }


async def dead_letters(
    client: aioredis.Redis,
    keys: Keys,
    concern: Concern,
    *,
    count: int = 100,
    types: Iterable[str] = (),
    ids: Iterable[str] = (),
) -> list[DeadLetter]:
    """Dead letters of a group, oldest first, optionally only some event types or ids
    (an id matches the event id, the original entry id or the DLQ entry id)."""
    want_types, want_ids = set(types), set(ids)
    out: list[DeadLetter] = []
    for topic in keys.all_partitions(concern.topics):
        rows: Any = await client.xrange(keys.dlq(topic, concern.group), count=count)
        for dlq_id, fields in rows:
            d = DeadLetter(topic, dlq_id.decode(), fields)
            if want_types and d.get("type") not in want_types:
                continue
            if want_ids and not want_ids & {d.get("id"), d.get("dlq_entry_id"), d.dlq_id}:
                continue
            out.append(d)
    return out[:count]


async def replay(
    client: aioredis.Redis,
    keys: Keys,
    concern: Concern,
    letters: Iterable[DeadLetter],
    *,
    to_topic: bool = False,
) -> list[str]:
    """Replay dead letters; returns the new entry ids (a letter already gone is skipped)."""
    out = []
    for d in letters:
        target = keys.stream(d.topic) if to_topic else keys.retry_stream(d.topic, concern.group)
        args: list[Any] = [d.dlq_id]
        for k, v in d.original().items():
            if k not in (b"attempt", b"origin"):
                args += (k, v)
        new_id = await _scripts.DLQ_REPLAY(client, [keys.dlq(d.topic, concern.group), target], args)
        if new_id:
            out.append(new_id.decode())
    return out


async def purge(client: aioredis.Redis, keys: Keys, concern: Concern) -> int:
    """Delete every dead letter of the group; returns how many there were."""
    total = 0
    for topic in keys.all_partitions(concern.topics):
        key = keys.dlq(topic, concern.group)
        total += int(await client.xlen(key))
        await client.delete(key)
    return total
