"""Dead letters: list, show, replay and purge a group's DLQ streams (one per topic).

A dead letter keeps the original entry's fields verbatim and adds ``dlq_*`` fields: reason
(``REASONS``: ``permanent``, ``retries_exhausted``, ``poison``, ``effect_failed``, or a decode
reason such as ``unknown_type``), exception type and message, attempts, deliveries, consumer,
group, topic, the original entry id and the time.

Replay sends the original fields back with the event id unchanged, and deletes the dead letter
in the same script, which also counts it (field ``dlq_replayed`` of ``Keys.replays``). By
default it goes to the group's own retry stream, so only the group that failed sees it again;
``to_topic=True`` appends it to the topic stream for every group: a new entry, so every group
reading the topic handles it, including those that applied it before (consumers recognise a
repeat by the pending list, not by event id: README, Guarantees). A letter that did not
decode (``DeadLetter.undecodable``) fails the same way again unless the code changed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

import orjson
import redis.asyncio as aioredis

from streamproc import _scripts
from streamproc.concern import Concern
from streamproc.keys import Keys

__all__ = (
    "DECODE_REASONS",
    "REASONS",
    "DeadLetter",
    "dead_letters",
    "purge",
    "replay",
    "replayed_count",
    "selection_summary",
    "total",
)

#: Reasons for which the entry did not decode (``Codec.decode``'s, and the consumer's
#: ``unknown_type`` for a type it has no handler for; ``bad_retry_record``: the retry record
#: itself was unreadable). Replaying one fails the same way unless the code changed.
DECODE_REASONS = frozenset(
    (
        "unknown_type",
        "missing_field",
        "bad_json",
        "invalid",
        "too_large",
        "id_mismatch",
        "bad_retry_record",
    )
)
#: Every reason the engine writes (``dlq_reason``).
REASONS: tuple[str, ...] = (
    "permanent",
    "retries_exhausted",
    "poison",
    "effect_failed",
    *sorted(DECODE_REASONS),
)

_PAGE = 500


class DeadLetter:
    __slots__ = ("dlq_id", "fields", "topic")

    def __init__(self, topic: str, dlq_id: str, fields: dict[bytes, bytes]) -> None:
        self.topic, self.dlq_id, self.fields = topic, dlq_id, fields

    def get(self, name: str) -> str:
        return self.fields.get(name.encode(), b"").decode(errors="replace")

    def original(self) -> dict[bytes, bytes]:
        return {k: v for k, v in self.fields.items() if not k.startswith(b"dlq_")}

    @property
    def reason(self) -> str:
        return self.get("dlq_reason")

    @property
    def undecodable(self) -> bool:
        """The entry did not decode: a replay fails the same way unless the code changed."""
        return self.reason in DECODE_REASONS or self.get("dlq_error_type") == "DecodeError"

    @property
    def at_ms(self) -> int:
        """When it was dead-lettered: Redis' clock, from the DLQ entry id."""
        return int(self.dlq_id.split("-", 1)[0])

    def payload(self) -> str | None:
        """The ``data`` field as indented JSON; None when it is not JSON."""
        try:
            data = orjson.loads(self.fields.get(b"data", b""))
        except orjson.JSONDecodeError:
            return None
        return orjson.dumps(data, option=orjson.OPT_INDENT_2).decode()

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
    count: int | None = 100,
    types: Iterable[str] = (),
    reasons: Iterable[str] = (),
    ids: Iterable[str] = (),
) -> list[DeadLetter]:
    """Dead letters of a group, oldest first per topic, optionally only some event types,
    reasons or ids (an id matches the event id, the original entry id or the DLQ entry id);
    at most ``count`` (None: every one that matches)."""
    want_types, want_reasons, want_ids = set(types), set(reasons), set(ids)
    out: list[DeadLetter] = []
    for topic in keys.all_partitions(concern.topics):
        key, start = keys.dlq(topic, concern.group), "-"
        while count is None or len(out) < count:
            rows: Any = await client.xrange(key, min=start, count=_PAGE)
            for dlq_id, fields in rows:
                d = DeadLetter(topic, dlq_id.decode(), fields)
                if want_types and d.get("type") not in want_types:
                    continue
                if want_reasons and d.reason not in want_reasons:
                    continue
                if want_ids and not want_ids & {d.get("id"), d.get("dlq_entry_id"), d.dlq_id}:
                    continue
                out.append(d)
            if len(rows) < _PAGE:
                break
            start = "(" + rows[-1][0].decode()
    return out if count is None else out[:count]


async def total(client: aioredis.Redis, keys: Keys, concern: Concern) -> int:
    """How many dead letters the group has, over all its topics."""
    n = 0
    for topic in keys.all_partitions(concern.topics):
        n += int(await client.xlen(keys.dlq(topic, concern.group)))
    return n


async def replayed_count(client: aioredis.Redis, keys: Keys, concern: Concern) -> int:
    """How many of the group's dead letters were replayed (CLI and dashboard), ever."""
    n = 0
    for topic in keys.all_partitions(concern.topics):
        n += int(await client.hget(keys.replays(topic, concern.group), "dlq_replayed") or 0)
    return n


def selection_summary(letters: Iterable[DeadLetter]) -> list[str]:
    """One line per (type, reason) of a selection, most first: ``   3  cluster.x (permanent)``."""
    by_kind = Counter((d.get("type") or "(no type)", d.reason or "(no reason)") for d in letters)
    return [f"{n:>4}  {kind} ({reason})" for (kind, reason), n in by_kind.most_common()]


async def replay(
    client: aioredis.Redis,
    keys: Keys,
    concern: Concern,
    letters: Iterable[DeadLetter],
    *,
    to_topic: bool = False,
) -> list[str]:
    """Replay dead letters, each counted in ``Keys.replays``' ``dlq_replayed``; returns the
    new entry ids (a letter already gone is skipped, and not counted)."""
    out = []
    for d in letters:
        target = keys.stream(d.topic) if to_topic else keys.retry_stream(d.topic, concern.group)
        args: list[Any] = [d.dlq_id]
        for k, v in d.original().items():
            if k not in (b"attempt", b"origin"):
                args += (k, v)
        counter = keys.replays(d.topic, concern.group)
        new_id = await _scripts.DLQ_REPLAY(
            client, [keys.dlq(d.topic, concern.group), target, counter], args
        )
        if new_id:
            out.append(new_id.decode())
    return out


async def purge(
    client: aioredis.Redis,
    keys: Keys,
    concern: Concern,
    letters: Iterable[DeadLetter] | None = None,
) -> int:
    """Delete the given dead letters, or (None) every dead letter of the group; returns how
    many were deleted."""
    deleted = 0
    if letters is not None:
        for d in letters:
            deleted += int(await client.xdel(keys.dlq(d.topic, concern.group), d.dlq_id))
        return deleted
    for topic in keys.all_partitions(concern.topics):
        key = keys.dlq(topic, concern.group)
        deleted += int(await client.xlen(key))
        await client.delete(key)
    return deleted
