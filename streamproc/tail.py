"""Follow a topic's events live, as an observer: XREAD, no consumer group, nothing acked.

``follow`` yields decoded entries from a start id (``$`` = only what arrives from now on,
resolved once to the stream's last id so nothing between two reads is missed). Entries that
do not decode are yielded too, with the reason, so ``tail`` shows what consumers would
dead-letter. ``check_topic`` refuses a topic nobody declared and that has no stream (a typo
would otherwise wait forever), naming the known ones. ``format_pretty`` / ``format_json``
turn one into a line; both show control characters of the entry (an ESC in a key or id,
say) as escapes, never raw on the terminal.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Collection, Iterable
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis

from streamproc.codec import Codec
from streamproc.errors import ConfigError, DecodeError
from streamproc.groups import registered_topics
from streamproc.keys import Keys
from streamproc.printable import printable, printable_json

__all__ = ("TailEntry", "check_topic", "follow", "format_json", "format_pretty", "start_id")


class TailEntry(msgspec.Struct, frozen=True, kw_only=True):
    entry_id: str
    type: str
    id: str
    ts: str
    key: str
    #: The decoded event's fields (as JSON values); the raw fields when it did not decode.
    data: dict[str, Any]
    #: Why it did not decode (a DecodeError reason), "" when it did.
    error: str = ""


def _text(value: bytes | None) -> str:
    return (value or b"").decode(errors="replace")


async def start_id(client: aioredis.Redis, stream: str, start: str) -> str:
    """``$`` resolved to the stream's current last entry id (``0-0`` when empty or missing)."""
    if start != "$":
        return start
    last: Any = await client.xrevrange(stream, count=1)
    return _text(last[0][0]) if last else "0-0"


async def check_topic(
    client: aioredis.Redis, keys: Keys, topic: str, declared: Iterable[str]
) -> None:
    """ConfigError naming the known topics unless ``topic`` is one: ``declared`` (the app's
    event types and groups), in the registry set ``Keys.topics()``, or with a stream."""
    known = sorted({*declared, *await registered_topics(client, keys)})
    if topic in known or await client.exists(keys.stream(topic)):
        return
    raise ConfigError(f"unknown topic {topic!r}; known: {', '.join(known) or '(none)'}")


def _decode(codec: Codec[Any], entry_id: bytes, fields: dict[bytes, bytes]) -> TailEntry:
    common = {
        "entry_id": _text(entry_id),
        "type": _text(fields.get(b"type")),
        "id": _text(fields.get(b"id")),
        "ts": _text(fields.get(b"ts")),
        "key": _text(fields.get(b"key")),
    }
    try:
        event = codec.decode(fields)
    except DecodeError as e:
        raw = {_text(k): _text(v) for k, v in fields.items()}
        return TailEntry(**common, data=raw, error=e.reason)
    data = msgspec.to_builtins(event)
    data.pop("type", None)
    return TailEntry(**common, data=data)


async def follow(
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    topic: str,
    *,
    start: str = "$",
    types: Collection[str] = (),
    block_ms: int = 1000,
    stop: asyncio.Event | None = None,
) -> AsyncGenerator[TailEntry, None]:
    """Entries of ``topic`` after ``start``, forever (or until ``stop`` is set)."""
    stream = keys.stream(topic)
    cursor = await start_id(client, stream, start)
    wanted = {t.encode() for t in types}
    while stop is None or not stop.is_set():
        reply: Any = await client.xread({stream: cursor}, count=100, block=block_ms)
        for _, entries in reply or ():
            for entry_id, fields in entries:
                cursor = _text(entry_id)
                if wanted and fields.get(b"type") not in wanted:
                    continue
                yield _decode(codec, entry_id, fields)


def format_json(entry: TailEntry) -> str:
    """One JSON object per line (for ``jq``).

    JSON writes C0 controls as ``\\u001b``; the others (DEL, C1, bidi overrides) are
    ``\\u`` escapes too, so a terminal shows the line as text and ``jq`` reads the same values.
    """
    return printable_json(orjson.dumps(msgspec.to_builtins(entry)).decode())


def format_pretty(entry: TailEntry, *, color: bool = False) -> str:
    """``time  type  key  id`` then the event's fields, compact; every value from the entry
    with its control characters escaped (only this function's own colours are raw)."""
    bold, dim, red, reset = ("\x1b[1m", "\x1b[2m", "\x1b[31m", "\x1b[0m") if color else ("",) * 4
    ts, type_, key, id_ = map(printable, (entry.ts, entry.type, entry.key, entry.id))
    when = ts[11:23] if len(ts) >= 23 else ts
    skip = {"id", "occurred_at", "key", "source"}
    body = printable(
        " ".join(f"{k}={orjson.dumps(v).decode()}" for k, v in entry.data.items() if k not in skip)
    )
    head = f"{dim}{when}{reset} {bold}{type_}{reset} key={key} {dim}{id_}{reset}"
    if entry.error:
        head += f" {red}UNDECODABLE ({printable(entry.error)}){reset}"
    return f"{head}\n    {body}" if body else head
