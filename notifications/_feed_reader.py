"""Stream ids, gaps and the process's XREAD waker for the live feeds (``notifications.feed``).

- ids: ``parse_id``, ``_text``, ``_before`` and ``_reply_id`` between ``<ms>-<seq>`` and
  ``StreamId`` (two ints, ordered as Redis orders entries);
- gaps: ``_info`` reads XINFO STREAM, ``gap`` decides whether entries a client had not seen
  are gone, ``_event`` and ``_gap_event`` write them as SSE;
- the waker: ``_Reader`` holds one ``XREAD COUNT 1 BLOCK`` over every open feed key and wakes
  the feeds (``_Watch``) of a key with new entries; each feed then reads for itself.

The rules are documented with the route, in ``notifications.feed``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, NamedTuple, cast

import orjson
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError

from streamproc.connection import is_cluster

# The feed's logger: the reader's lines read as the feed's, as before the split.
log = structlog.get_logger("notifications.feed")

_ID_RE = re.compile(r"([0-9]{1,20})-([0-9]{1,20})")
_MAX_PART = 2**64 - 1

StreamId = tuple[int, int]
_ZERO: StreamId = (0, 0)


# ---------------------------------------------------------------------- ids


def parse_id(text: str) -> StreamId | None:
    """``<ms>-<seq>`` as two ints, or None when it is not a stream entry id."""
    m = _ID_RE.fullmatch(text)
    if m is None:
        return None
    ms, seq = int(m[1]), int(m[2])
    return (ms, seq) if ms <= _MAX_PART and seq <= _MAX_PART else None


def _text(entry_id: StreamId) -> str:
    return f"{entry_id[0]}-{entry_id[1]}"


def _before(entry_id: StreamId) -> StreamId:
    """The greatest id below ``entry_id`` (resuming after it resumes at ``entry_id``)."""
    ms, seq = entry_id
    if seq:
        return ms, seq - 1
    return (ms - 1, _MAX_PART) if ms else _ZERO


def _reply_id(value: Any) -> StreamId:
    raw = value.decode() if isinstance(value, bytes) else str(value)
    parsed = parse_id(raw)
    if parsed is None:
        raise ResponseError(f"unexpected stream id from Redis: {raw!r}")
    return parsed


# ---------------------------------------------------------------------- gaps and events


class _Info(NamedTuple):
    """What XINFO STREAM says about a feed (a missing stream: nothing, never written)."""

    last_generated: StreamId
    first: StreamId | None
    #: Entries ever removed (trimmed or deleted): ``entries-added`` - ``length``.
    removed: int


_MISSING = _Info(_ZERO, None, 0)


def _info(reply: Any) -> _Info:
    if isinstance(reply, ResponseError) and "no such key" in str(reply).lower():
        return _MISSING
    if isinstance(reply, BaseException):
        raise reply
    fields = {(k.decode() if isinstance(k, bytes) else k): v for k, v in reply.items()}
    first = fields.get("first-entry")
    return _Info(
        last_generated=_reply_id(fields["last-generated-id"]),
        first=_reply_id(first[0]) if first else None,
        removed=int(fields["entries-added"]) - int(fields["length"]),
    )


def gap(after: StreamId, info: _Info, removed_before: int | None) -> tuple[str, StreamId] | None:
    """Whether entries after ``after`` may be gone: (reason, the position to go on from).

    ``removed_before``: the stream's removed count when this feed last read it (None: a
    client's position, never read here). Nothing removed since then (or ever) is no gap.
    Otherwise Redis 7.0 records no boundary for a trim (``max-deleted-entry-id`` follows XDEL
    only), so a position older than the oldest entry kept is a gap, even in the rare case
    that the client had seen exactly the last entry trimmed.
    """
    if after > info.last_generated:
        return "reset", info.last_generated
    if info.removed == (removed_before or 0):
        return None
    if info.first is None:  # emptied: what came after the position is gone
        return ("trimmed", info.last_generated) if after < info.last_generated else None
    return ("trimmed", _before(info.first)) if after < info.first else None


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> bytes:
    kind = fields.get(b"type", b"").replace(b"\r", b"").replace(b"\n", b"") or b"message"
    lines = fields.get(b"data", b"{}").splitlines() or [b""]  # one SSE line per line
    return (
        b"".join(
            [
                b"id: ",
                entry_id,
                b"\nevent: ",
                kind,
                b"\n",
                *(b"data: " + ln + b"\n" for ln in lines),
            ]
        )
        + b"\n"
    )


def _gap_event(reason: str, after: StreamId, resume: StreamId) -> bytes:
    data = orjson.dumps(
        {"reason": reason, "last_event_id": _text(after), "resume_id": _text(resume)}
    )
    return f"id: {_text(resume)}\nevent: gap\n".encode() + b"data: " + data + b"\n\n"


# ---------------------------------------------------------------------- the waker


class _Watch:
    """The feeds of one stream key in this process; the reader wakes them."""

    __slots__ = ("broken", "event", "feeds", "position")

    def __init__(self, position: StreamId) -> None:
        #: The newest id any feed of this key has read: where the reader waits from.
        self.position = position
        self.feeds = 0
        self.event = asyncio.Event()
        #: The reader failed: the feeds end (their clients reconnect).
        self.broken = False

    def wake(self) -> None:
        self.event.set()
        self.event = asyncio.Event()


class _Reader:
    """One ``XREAD COUNT 1 BLOCK`` over every watched key, on a connection of its own.

    Runs while any key is watched; a Redis error breaks every watch (their feeds end) and
    stops it, and the next feed starts a new one.
    """

    def __init__(self, client: aioredis.Redis, block_ms: int) -> None:
        self._client = client
        self._block_ms = block_ms
        self._watches: dict[str, _Watch] = {}
        self._task: asyncio.Task[None] | None = None

    def watch(self, key: str, position: StreamId) -> _Watch:
        w = self._watches.get(key)
        if w is None:
            w = self._watches[key] = _Watch(position)
        w.position = max(w.position, position)
        w.feeds += 1
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="notifications-feed-reader")
        return w

    def unwatch(self, key: str, w: _Watch) -> None:
        w.feeds -= 1
        if not w.feeds and self._watches.get(key) is w:
            del self._watches[key]

    def wake_all(self) -> None:
        for w in self._watches.values():
            w.wake()

    async def stop(self) -> None:
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        conn: Any = None
        try:
            while self._watches:  # checked and left with no await between: see watch()
                keys = list(self._watches)
                ids = [_text(self._watches[k].position) for k in keys]
                if conn is None:
                    conn = _own_connection(self._client, keys[0])
                await conn.send_command(
                    "XREAD", "COUNT", 1, "BLOCK", self._block_ms, "STREAMS", *keys, *ids
                )
                # BLOCK plus the usual socket timeout: the wait itself never times out.
                reply = await conn.read_response(timeout=self._block_ms / 1000 + 5.0)
                for key, entry_id in _heads(reply):
                    w = self._watches.get(key)
                    if w is not None:
                        w.position = max(w.position, entry_id)
                        w.wake()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis down, or a reply we cannot read: end every feed
            log.warning("feed_reader_failed", error=repr(e), keys=len(self._watches))
            for w in self._watches.values():
                w.broken = True
                w.wake()
            self._watches.clear()
        finally:
            self._task = None
            if conn is not None:
                await conn.disconnect()


def _own_connection(client: aioredis.Redis, key: str) -> Any:
    """A connection outside the client's pool (a blocked XREAD must not hold one of the
    pool's), to the node that holds ``key``'s slot on a Redis Cluster: every feed key shares
    the ``{feed}`` tag, so one node serves the whole read. After a failover the XREAD fails,
    the feeds end and reconnect, and the next reader asks for the slot's node again."""
    if is_cluster(client):
        node: Any = cast(RedisCluster, client).get_node_from_key(key)
        return node.connection_class(**node.connection_kwargs)
    return cast(Any, client.connection_pool).make_connection()  # untyped in redis-py


def _heads(reply: Any) -> list[tuple[str, StreamId]]:
    """(key, newest id) per stream of a raw XREAD reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out = []
    for key, entries in pairs:
        if entries:
            name = key.decode() if isinstance(key, bytes) else str(key)
            out.append((name, _reply_id(entries[-1][0])))
    return out
