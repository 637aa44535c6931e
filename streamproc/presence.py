"""Consumer processes and whether they are alive: ``streamproc consumers``, ``inspect``, ``check``.

Every ``Consumer`` writes, with its heartbeat (every ``min_idle_ms / 3``), one record of its
process and group to the hash ``keys.consumers()`` (field ``<host>/<pid>/<token>/<group>``,
JSON: name, host, pid, group, started, in flight, processed/failed counts, version), and the
time it did so, on Redis' clock, to the sorted set ``keys.consumers_seen()`` — one script, so
the two agree. A process running several groups has one field per group, and is shown as one
process (its token is the same for all of them). The same script drops fields that have not
beaten for ``KEEP_MS`` (1 h) and sets both keys to expire then: nothing grows without bound.

A record is **online** when it beat within ``ONLINE_BEATS`` of its own heartbeat periods and
its consumer did not stop; a consumer that stops gracefully writes ``stopped`` at once.

``live_consumers`` counts a group's live consumers for ``inspect``/``check``: the names online
by heartbeat, plus the names ``XINFO CONSUMERS`` shows active (idle below ``min_idle_ms``)
that have no record at all (outside readers that do not heartbeat). A name Redis still
remembers but whose process stopped or went silent is not live.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from importlib import metadata
from typing import Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamproc._human import duration, when
from streamproc._lua import Lua
from streamproc.keys import Keys
from streamproc.printable import printable

__all__ = (
    "COLUMNS",
    "KEEP_MS",
    "ONLINE_BEATS",
    "GroupMember",
    "Liveness",
    "ProcessStatus",
    "Record",
    "beat",
    "live_consumers",
    "liveness",
    "processes",
    "render_table",
    "rows",
    "version",
)

#: Records silent this long are dropped (offline ones are shown until then).
KEEP_MS = 3_600_000
#: A record is online while its last beat is at most this many heartbeat periods old.
ONLINE_BEATS = 3


class Record(msgspec.Struct, kw_only=True):
    """What one consumer (one group of one process) writes with each heartbeat."""

    process: str
    name: str
    host: str
    pid: int
    group: str
    #: When the consumer started (its host's clock, epoch ms).
    started_ms: int
    in_flight: int = 0
    #: Entries done: acked, empty and skipped ones.
    processed: int = 0
    #: Handler failures: retries scheduled and dead letters written.
    failed: int = 0
    version: str = ""
    #: Its heartbeat period: online means a beat within ``ONLINE_BEATS`` of these.
    heartbeat_ms: int = 10_000
    #: Written once when the consumer stops gracefully: offline at once.
    stopped: bool = False


class GroupMember(msgspec.Struct, kw_only=True):
    group: str
    name: str
    online: bool
    in_flight: int
    processed: int
    failed: int
    last_seen_ms: int


class ProcessStatus(msgspec.Struct, kw_only=True):
    """One consumer process: its groups, summed counts, and whether any of them is alive."""

    process: str
    host: str
    pid: int
    version: str
    started_ms: int
    last_seen_ms: int
    online: bool
    in_flight: int
    processed: int
    failed: int
    groups: list[GroupMember]


class Liveness(msgspec.Struct, kw_only=True):
    """Per group: the consumer names online by heartbeat, and every name with a record."""

    online: dict[str, set[str]]
    recorded: dict[str, set[str]]


_ids: dict[int, str] = {}


def process_id() -> str:
    """``<host>/<pid>/<token>``: this process, the same for all its consumers (a new one
    after a fork)."""
    pid = os.getpid()
    if pid not in _ids:
        _ids[pid] = f"{socket.gethostname()}/{pid}/{uuid.uuid4().hex[:8]}"
    return _ids[pid]


def version() -> str:
    try:
        return metadata.version("streamproc")
    except metadata.PackageNotFoundError:
        return "unknown"


# KEYS: hash, seen zset. ARGV: field, record JSON, keep ms. Returns Redis' time (ms).
_BEAT = Lua(
    r"""
local _t = redis.call('TIME')
local now = tonumber(_t[1]) * 1000 + math.floor(tonumber(_t[2]) / 1000)
local keep = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - keep, 'LIMIT', 0, 100)
if #stale > 0 then
  redis.call('HDEL', KEYS[1], unpack(stale))
  redis.call('ZREM', KEYS[2], unpack(stale))
end
redis.call('PEXPIRE', KEYS[1], keep)
redis.call('PEXPIRE', KEYS[2], keep)
return now
"""
)

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(Record).decode


async def beat(client: aioredis.Redis, keys: Keys, record: Record) -> int:
    """Write ``record`` and its time; drop records silent for ``KEEP_MS``. Returns the time."""
    field = f"{record.process}/{record.group}"
    return int(
        await _BEAT(
            client, [keys.consumers(), keys.consumers_seen()], [field, _encode(record), KEEP_MS]
        )
    )


def _online(record: Record, seen_ms: int, now_ms: int) -> bool:
    return not record.stopped and now_ms - seen_ms <= ONLINE_BEATS * record.heartbeat_ms


async def _records(client: aioredis.Redis, keys: Keys) -> tuple[int, list[tuple[Record, int]]]:
    """Redis' time and every record not older than ``KEEP_MS`` with its last beat."""
    secs, micros = await client.time()
    now_ms = int(secs) * 1000 + int(micros) // 1000
    # Both keys share the ``{consumers}`` tag: one pipeline, one node on a cluster.
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.consumers())
        pipe.zrange(keys.consumers_seen(), 0, -1, withscores=True)
        fields, seen = await pipe.execute()
    when = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in seen}
    out = []
    for field, body in fields.items():
        at = when.get(field.decode() if isinstance(field, bytes) else field)
        if at is None or now_ms - at > KEEP_MS:
            continue
        try:
            out.append((_decode(body), at))
        except msgspec.DecodeError:
            continue  # written by a later version we cannot read: not shown
    return now_ms, out


async def processes(client: aioredis.Redis, keys: Keys) -> tuple[int, list[ProcessStatus]]:
    """Redis' time and every consumer process heard from within ``KEEP_MS``: online ones
    first, then by host and pid."""
    now_ms, records = await _records(client, keys)
    by: dict[str, list[tuple[Record, int]]] = {}
    for r, at in records:
        by.setdefault(r.process, []).append((r, at))
    out = []
    for proc, rows in by.items():
        rows.sort(key=lambda ra: ra[0].group)
        members = [
            GroupMember(
                group=r.group,
                name=r.name,
                online=_online(r, at, now_ms),
                in_flight=r.in_flight,
                processed=r.processed,
                failed=r.failed,
                last_seen_ms=at,
            )
            for r, at in rows
        ]
        first = rows[0][0]
        out.append(
            ProcessStatus(
                process=proc,
                host=first.host,
                pid=first.pid,
                version=first.version,
                started_ms=min(r.started_ms for r, _ in rows),
                last_seen_ms=max(at for _, at in rows),
                online=any(m.online for m in members),
                in_flight=sum(m.in_flight for m in members),
                processed=sum(m.processed for m in members),
                failed=sum(m.failed for m in members),
                groups=members,
            )
        )
    out.sort(key=lambda p: (not p.online, p.host, p.pid, p.process))
    return now_ms, out


async def liveness(client: aioredis.Redis, keys: Keys) -> Liveness:
    """Which consumer names of each group are online by heartbeat, and which have a record."""
    now_ms, records = await _records(client, keys)
    live = Liveness(online={}, recorded={})
    for r, at in records:
        live.recorded.setdefault(r.group, set()).add(r.name)
        if _online(r, at, now_ms):
            live.online.setdefault(r.group, set()).add(r.name)
    return live


async def live_consumers(
    client: aioredis.Redis,
    streams: Iterable[str],
    group: str,
    live: Liveness,
    *,
    idle_ms: int = 30_000,
) -> int:
    """How many consumers of ``group`` are alive: online by heartbeat, or (without any record)
    active on one of ``streams`` by ``XINFO CONSUMERS`` (idle below ``idle_ms``)."""
    names = set(live.online.get(group, ()))
    recorded = live.recorded.get(group, set())
    for stream in streams:
        try:
            rows: list[dict[Any, Any]] = await client.xinfo_consumers(stream, group)
        except ResponseError:
            continue  # no such stream or group (any more)
        for row in rows:
            name = row["name"].decode() if isinstance(row["name"], bytes) else str(row["name"])
            if name not in recorded and int(row["idle"]) < idle_ms:
                names.add(name)
    return len(names)


def _ago(ms: int) -> str:
    """``12 s ago``, ``3 min ago``, ``2 h ago`` (``streamproc._human``)."""
    return f"{duration(max(0, ms) / 1000)} ago"


#: The columns of ``rows`` (the table and the dashboard's Consumers panel).
COLUMNS = (
    *("status", "host", "pid", "groups", "in flight"),
    *("processed", "failed", "started", "version"),
)


def rows(now_ms: int, procs: list[ProcessStatus]) -> list[list[str]]:
    """One row per process, ``COLUMNS``: offline ones say when they were last seen."""
    return [
        [
            "online" if p.online else f"offline, last seen {_ago(now_ms - p.last_seen_ms)}",
            p.host,
            str(p.pid),
            ", ".join(
                f"{m.group}{'' if m.online or not p.online else ' (stopped)'} as {m.name}"
                for m in p.groups
            ),
            str(p.in_flight),
            str(p.processed),
            str(p.failed),
            when(datetime.fromtimestamp(p.started_ms / 1000, UTC), datetime.now(UTC)),
            p.version,
        ]
        for p in procs
    ]


def render_table(now_ms: int, procs: list[ProcessStatus]) -> str:
    """Processes as a terminal table: online first; offline ones say when last seen."""
    if not procs:
        return "no consumer processes heard from in the last hour"
    body = rows(now_ms, procs)
    head = [c.upper() for c in COLUMNS]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    online = sum(p.online for p in procs)
    lines = [f"{online} online, {len(procs) - online} offline", "", fmt.format(*head)]
    lines += [fmt.format(*r) for r in body]
    return "\n".join(map(printable, lines))
