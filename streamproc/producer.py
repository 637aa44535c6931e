"""Producer: appends typed events to their topic streams.

``publish`` goes through one Lua script per stream that checks the producer-side dedup state,
XADDs and records, atomically: publishing an event id (or idempotency key) twice within the
window returns the first entry id and adds nothing, and this producer's own resend of a write
whose reply was lost is recognised by its sequence (see ``_PUBLISH`` for both; no key per
event). Before writing, the producer looks at the lag of
the groups reading the topic (cached briefly) and waits, then raises BackpressureError, while a
group is above the high watermark.

A partitioned topic (``Keys(partitions=...)``) is written per partition: each event goes to
``Keys.partition(topic, key, id)``, its own stream and markers (its own slot on a cluster).

With ``ProducerSettings(durability="replicated")`` a write returns only once ``min_replicas``
replicas acknowledged it (WAIT on the connection that wrote it, per master); otherwise the
callers get a PublishError saying it is on the master only.

Group commit: calls made while a write is in flight wait for it and then go out together, one
script call per topic for all of them (up to ``coalesce_max_events``). A lone caller writes at
once; under load, many concurrent callers (the ingest's requests) share one round trip instead
of paying redis-py's per-command cost each. Each caller's events keep their order, and each
caller gets its own result or exception; a caller cancelled before its write went out writes
nothing: whether it waited for backpressure, behind a write in flight, for a connection (a full
pool, a reconnect) or for the script to be loaded again, what a group sends is decided only
once a connection is in hand. A write that went out is never sent again by the client library
(``_resp.execute`` bypasses redis-py's retry); the producer's own retry after a connection
error (``_send_in_order``) sends the same write, with the same sequences, before any later one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import redis.asyncio as aioredis
import structlog
from redis.exceptions import NoScriptError, ResponseError

from streamproc import tracing
from streamproc._backoff import Backoff
from streamproc._batch import Batcher
from streamproc._lua import Lua, with_scripts
from streamproc._resp import Command, NotReplicated, bulk, execute
from streamproc.codec import WIRE_FIELDS, Codec
from streamproc.connection import REDIS_DOWN
from streamproc.errors import BackpressureError, PublishError
from streamproc.event import Event
from streamproc.groups import group_infos, register_topics
from streamproc.keys import Keys
from streamproc.settings import ProducerSettings

__all__ = ("Produced", "Producer")

log = structlog.get_logger("streamproc.producer")

# One call per stream per write. Dedup state is kept per producer and per generation of the
# window, never as a key per event:
# - (producer, sequence): every event a Producer writes gets the next sequence number of its
#   stream; the script keeps, per producer, the highest one written and the entry ids of its
#   last call (one string ``<last>|<seq>=<id>,...`` with a short TTL). The producer retries a
#   write in order, before any later one (``_send_in_order``), so a resend after a lost reply
#   has sequences at or below that mark and is answered from it: nothing is added again,
#   whatever the event's id.
# - records by id or idempotency key (the caller's dedup=True, the default): an 8-byte digest
#   of the key, as a field of one of a generation's shard hashes ``pub:<gen>:<shard>`` with the
#   first entry id as value; a generation lasts one window and its hashes expire at the end of
#   the next one, so a record lives one to two windows (their expiry is set when the next
#   generation starts, all at once; after a gap of more than a window the next write deletes
#   them; the meta hash, a few fields a topic, does not expire). The shard count of a
#   generation is sized from the previous one's record count (about 24 records a hash: small
#   hashes stay in Redis' listpack encoding, ~30 bytes a record, and a lookup, which reads the
#   whole listpack, stays short); a first generation (no previous one) starts at
#   ``ProducerSettings.dedup_shards``. A lookup that misses and the
#   record written after the XADD are two commands; within one call they are one: after the
#   first recorded XADD ('*'), the next entry's id is known before it is written (the same ms,
#   the next sequence, what '*' would give), so an HSETNX of that id looks the record up and
#   claims it at once, and the XADD names the id. If that XADD is refused (a stream at the end
#   of its id space), the claim is deleted before the error is returned: never a record
#   without its entry. Entries of one call thus share the ms of its first recorded one.
# KEYS[1] stream, KEYS[2] this producer's sequence mark, KEYS[3] the generations' meta hash
# (g, s, n: the current generation, its shards, its records; ps, pn: the previous one's; w:
# the window).
# ARGV[1] window ms, ARGV[2] sequence TTL ms, ARGV[3] record key prefix, ARGV[4] a first
# generation's shard count, ARGV[5] the clock skew allowed (ms); then per event: '1' if
# it has a record (its digest follows) else '0', its sequence, the digest ('' when none), when
# its id was minted (epoch ms of a UUIDv7 id, 0 when unknown: a key, another kind of id), the
# number n of field and value arguments, and those n (the wire fields, then the optional trace
# context: streamproc.tracing). Returns {added, id, ...} in event order: added = 1 written,
# 0 a duplicate by its record (id = the first entry's id), 2 this producer's own resend (id =
# the entry its first send wrote; '' if that was not kept).
_FIELDS = 2 * len(WIRE_FIELDS)
_PUBLISH = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, prefix = tonumber(ARGV[1]), ARGV[3]
local out, a = {}, 6
local mark = redis.call('GET', KEYS[2]) or '0|'
local last = tonumber(string.match(mark, '^(%d+)|')) or 0
local earlier = nil  -- the last call's sequence -> entry id, read on a resend only
local function sent_before(seq)
  if earlier == nil then
    earlier = {}
    for q, id in string.gmatch(mark, '(%d+)=([^,]+)') do earlier[q] = id end
  end
  return earlier[seq] or ''
end
local g, s, ps, n, pn, m0 = 0, 0, 0, 0, 0, nil
if window > 0 then
  g = math.floor(now / window)
  local m = redis.call('HMGET', KEYS[3], 'g', 's', 'n', 'ps')
  m0 = tonumber(m[1])
  s, n, ps = tonumber(m[2]) or 0, tonumber(m[3]) or 0, tonumber(m[4]) or 0
  if m0 ~= g then
    local size = tonumber(ARGV[4])
    if m0 == g - 1 then
      -- The generation that ended lives one more window; the current one's hashes get their
      -- expiry here, at the next rotation, not on each write.
      for i = 0, s - 1 do redis.call('PEXPIREAT', prefix .. m0 .. ':' .. i, (g + 1) * window) end
      ps, pn, size = s, n, 16
      while size < n / 24 and size < 1048576 do size = size * 2 end
    else
      if m0 then  -- a gap of more than a window: the last generation is of no use any more
        for i = 0, s - 1 do redis.call('UNLINK', prefix .. m0 .. ':' .. i) end
      end
      ps, pn = 0, 0
    end
    s, n = size, 0
  end
end
local sent, top, added, h = {}, last, 0, nil
-- An id minted after this generation began (and the allowed skew) has no older record.
-- Both as 15 digits (a UUIDv7's 48-bit ms fit) and compared as strings: no number parsed per
-- event (tonumber of 13 digits is glibc's slow strtod path). Digit strings of one length
-- compare as their numbers under any collation; an unknown birth, '0', sorts first.
local young = string.format('%015d', g * window + tonumber(ARGV[5]))
-- Numbers become strings by string.format('%d'): Lua's own conversion ('%.14g') costs ~1,000
-- Redis instructions each, three times per recorded event before (callgrind).
local gp = prefix .. string.format('%d', g) .. ':'
-- The last entry id this call wrote by '*' and its records since, as ms and sequence: the next
-- recorded event's id is known before its XADD (ms-(sq+1), what '*' gives within one ms), so
-- one HSETNX both looks its record up and claims it. nil until a recorded event's XADD '*',
-- and again after any other '*' (whose id is not parsed).
local ms, sq = nil, 0
local hk = {}  -- shard -> its hash's name, this generation
local nargs = #ARGV
while a <= nargs do
  local marked, seq, d = ARGV[a] == '1', tonumber(ARGV[a + 1]), ARGV[a + 2]
  local born, k = ARGV[a + 3], tonumber(ARGV[a + 4])
  local first, resent, id = false, false, nil
  if seq <= last then
    first, resent = sent_before(ARGV[a + 1]), true
  elseif marked and window > 0 then
    local b1, b2, b3, b4 = string.byte(d, 1, 4)
    local x = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    local sh = x % s
    h = hk[sh]
    if not h then
      h = gp .. string.format('%d', sh)
      hk[sh] = h
    end
    if ps > 0 and born <= young then
      first = redis.call('HGET', prefix .. string.format('%d:%d', g - 1, x % ps), d)
    end
    if not first then
      if ms then
        id = string.format('%s-%d', ms, sq + 1)
        if redis.call('HSETNX', h, d, id) == 0 then
          first, id = redis.call('HGET', h, d), nil
        end
      else
        first = redis.call('HGET', h, d)
      end
    end
  end
  if first then
    out[#out + 1] = resent and 2 or 0
    out[#out + 1] = first
  else
    if id then  -- its record is claimed under this id: the XADD must give it that id
      local r = redis.pcall('XADD', KEYS[1], id, unpack(ARGV, a + 5, a + 4 + k))
      if type(r) == 'table' and r.err then
        redis.call('HDEL', h, d)
        return r
      end
      sq, n = sq + 1, n + 1
    else
      id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, a + 5, a + 4 + k))
      if marked and window > 0 then
        redis.call('HSET', h, d, id)
        n = n + 1
        local m1, m2 = string.match(id, '^(%d+)-(%d+)$')
        ms, sq = m1, tonumber(m2)
      else
        ms = nil
      end
    end
    out[#out + 1] = 1
    out[#out + 1] = id
    first = id
    added = added + 1
  end
  if seq > last then
    sent[#sent + 1] = ARGV[a + 1] .. '=' .. first
    if seq > top then top = seq end
  end
  a = a + 5 + k
end
if #sent > 0 then
  redis.call('SET', KEYS[2], top .. '|' .. table.concat(sent, ','), 'PX', ARGV[2])
end
if window > 0 and m0 ~= g then
  redis.call('HSET', KEYS[3], 'g', g, 's', s, 'n', n, 'ps', ps, 'pn', pn, 'w', window)
elseif window > 0 and added > 0 then
  redis.call('HSET', KEYS[3], 'n', n)
  redis.call('PEXPIRE', KEYS[3], 2 * window)
end
return out
""")


def record_digest(key: str) -> bytes:
    """The 8 bytes a record of an event id or idempotency key is stored under (fixed length
    whatever the key: a client's string never becomes part of a key name)."""
    return hashlib.blake2b(key.encode(), digest_size=8).digest()


async def find_record(
    client: aioredis.Redis, keys: Keys, topic: str, key: str, *, window_ms: int
) -> str | None:
    """The first entry id recorded for an event id or idempotency key on ``topic`` (a stream
    name: a partition of a partitioned topic), or None: for tests and ``inspect``."""
    pub = keys.published_prefix(topic)
    meta: list[Any] = await client.hmget(f"{pub}meta", ["g", "s", "ps"])
    if meta[0] is None:
        return None
    g, s, ps = int(meta[0]), int(meta[1]), int(meta[2] or 0)
    d = record_digest(key)
    for gen, size in ((g, s), (g - 1, ps)):
        if size:
            shard = int.from_bytes(d[:4], "big") % size
            first: Any = await client.hget(f"{pub}{gen}:{shard}", d)
            if first is not None:
                return first.decode() if isinstance(first, bytes) else str(first)
    return None


class DedupState(NamedTuple):
    """What a stream's producer-side dedup state holds (``streamproc inspect``)."""

    window_ms: int
    #: Records of the current and the previous generation (each lives one to two windows).
    records: int
    #: Shard hashes of the two generations, and their memory (``MEMORY USAGE`` per record of
    #: up to 32 shard hashes, times the records).
    shards: int
    bytes: int
    #: Producers with a live sequence mark on the stream.
    producers: int


async def dedup_state(client: aioredis.Redis, keys: Keys, topic: str) -> DedupState | None:
    """The producer-side dedup state of ``topic`` (a stream name), or None when it has none."""
    pub = keys.published_prefix(topic)
    raw: list[Any] = await client.hmget(f"{pub}meta", ["g", "s", "n", "ps", "pn", "w"])
    if raw[0] is None:
        return None
    _, s, n, ps, pn, window = (int(v or 0) for v in raw)
    used, held, sampled = 0, 0, 0
    async for key in client.scan_iter(match=f"{pub}[0-9]*", count=1000):
        got, fields = await client.memory_usage(key), await client.hlen(key)
        used, held, sampled = used + int(got or 0), held + int(fields), sampled + 1
        if sampled >= 32:  # a sample: shards fill alike (digests are uniform)
            break
    total = used * (n + pn) // held if held else 0
    producers = 0
    async for _ in client.scan_iter(match=f"{pub}seq:*", count=1000):
        producers += 1
    return DedupState(window, n + pn, s + ps, total, producers)


class Produced(NamedTuple):
    """Where one published event went."""

    entry_id: str
    #: The event id (or idempotency key) was already published within the dedup window;
    #: ``entry_id`` is the first entry's and nothing was added.
    duplicate: bool


_MARKED, _UNMARKED = bulk(b"1"), bulk(b"0")
_ARGS_PER_EVENT = 5 + _FIELDS  # without a trace context
_NO_DIGEST, _UNKNOWN_BIRTH = bulk(b""), bulk(b"0")
#: How far a producer's clock may run ahead of Redis' for ``minted_ms`` to hold (below).
MINTED_SKEW_MS = 60_000


def minted_ms(event_id: str) -> int:
    """When a UUIDv7 event id was minted (its first 48 bits, epoch ms), else 0 (unknown).

    A record of the id cannot have been written before then (less any clock skew), which lets
    the publish script skip the previous generation for ids minted in the current one."""
    if len(event_id) == 36 and event_id[14] == "7" and event_id[8] == "-":
        try:
            return int(event_id[:8] + event_id[9:13], 16)
        except ValueError:
            return 0
    return 0


_N_FIELDS = bulk(b"%d" % _FIELDS)
#: Builds a Produced without NamedTuple's generated __new__ (a Python frame per event).
_new = tuple.__new__


class _Part:
    """One caller's events of one topic, encoded."""

    __slots__ = ("argc", "args", "size")

    def __init__(self) -> None:
        #: Per event, packed: 1 (it has a record) or 0, its sequence, its key's digest, the
        #: number of field and value arguments, then those.
        self.args: list[bytes] = []
        self.size = 0
        self.argc = 0


class _Write:
    """One caller's events, encoded before queuing (so encoding overlaps Redis' work)."""

    __slots__ = ("caller", "order", "parts")

    def __init__(self, parts: dict[str, _Part], order: list[tuple[str, int]]) -> None:
        self.parts = parts
        #: Per event: its topic and its index among the caller's events of that topic.
        self.order = order
        #: The future the caller awaits (set when queued). Done before the write goes out =
        #: the caller was cancelled: the write is left out.
        self.caller: asyncio.Future[list[Produced]] | None = None

    @property
    def wanted(self) -> bool:
        return self.caller is None or not self.caller.done()


#: The answer for a write left out (its caller, cancelled, never reads it).
_LEFT_OUT = PublishError("left out: the caller was cancelled before the write went out")


class Producer:
    """Publishes events; safe to share between tasks of one event loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        codec: Codec[Any],
        keys: Keys,
        settings: ProducerSettings | None = None,
        *,
        retry_timeout_s: float = 10.0,
    ) -> None:
        self.client, self.codec, self.keys = client, codec, keys
        self.settings = settings or ProducerSettings()
        self.retry_timeout_s = retry_timeout_s
        self._lag_cache: dict[str, tuple[float, str, int]] = {}
        self._lag_reads: dict[str, asyncio.Future[tuple[str, int]]] = {}
        #: Every duplicate this producer saw (a running total across callers).
        self.duplicates = 0
        #: This producer's identity: with a sequence per stream, what recognises a resend.
        self.identity = uuid.uuid4().hex
        self._seqs: dict[str, int] = {}
        self._topic_of: dict[str, str] = {}  # a partition's topic (for its dedup window)
        #: How long a stream keeps this producer's sequence mark: longer than any resend.
        self.seq_ttl_ms = max(60_000, int(self.retry_timeout_s * 6_000))
        #: Topics this producer put in the registry set (``Keys.topics``): once per process.
        self._registered: set[str] = set()
        self._batcher = Batcher(
            self._write,
            max_size=self.settings.coalesce_max_events,
            size=lambda w: len(w.order),
            name="streamproc-producer-flush",
        )

    async def publish(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Append one event; return its entry id (the first one's, for a duplicate)."""
        [entry_id] = await self.publish_many([event], idempotency_keys=[idempotency_key])
        return entry_id

    async def publish_many(
        self,
        events: Sequence[Event],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Append events; return their entry ids in order."""
        return [p.entry_id for p in await self.append(events, idempotency_keys=idempotency_keys)]

    async def append(
        self,
        events: Sequence[Event],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
        dedup: Sequence[bool] | None = None,
    ) -> list[Produced]:
        """Append events; say for each where it went and whether it was a duplicate.

        ``idempotency_keys``: per event, the key its dedup marker uses instead of its id.
        ``dedup``: per event, False skips the record by id: for an id minted moments ago that
        no caller can send again (the ingest's events posted without an id). This producer's
        own resend after a lost reply is still recognised, by its sequence.
        """
        if not events:
            return []
        if idempotency_keys is not None and len(idempotency_keys) != len(events):
            raise ValueError("idempotency_keys must match events one to one")
        if dedup is not None and len(dedup) != len(events):
            raise ValueError("dedup must match events one to one")
        # the names events are stored under: a partitioned topic's partitions (Keys.partition)
        where = self._where(events)
        topics = set(where)
        backoff = Backoff(cap_s=1.0)
        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                if not topics <= self._registered:
                    await self._register(topics - self._registered)
                for topic in topics:
                    await self.wait_for_capacity(topic)
                break
            except REDIS_DOWN as e:  # nothing was written yet: safe to try again
                if time.monotonic() >= deadline:
                    raise PublishError(f"Redis unavailable for {self.retry_timeout_s}s: {e}") from e
                if backoff.attempt == 0:
                    log.warning("publish_retrying", error=str(e))
                await backoff.sleep()
        # The write itself is retried by ``_write``, in order, with the same sequences.
        return await self._queue(events, idempotency_keys, dedup, where)

    async def _register(self, topics: set[str]) -> None:
        """The first write of a topic in this process adds it to the registry set, so a
        topic that only producers know is listed too (one SADD per topic and process).
        Only listing depends on it: a refusal (an ACL without SADD) is logged, not raised."""
        try:
            await register_topics(self.client, self.keys, topics)
        except ResponseError as e:
            log.warning("topic_registry_refused", topics=sorted(topics), error=str(e))
        self._registered |= topics

    def _where(self, events: Sequence[Event]) -> list[str]:
        """Per event, the topic (or partition of a partitioned topic) it is stored under."""
        if not self.keys.partitions:
            return [e.topic for e in events]
        where = [self.keys.partition(e.topic, e.key, e.id) for e in events]
        for e, name in zip(events, where, strict=True):
            self._topic_of[name] = e.topic
        return where

    def _encode(
        self,
        events: Sequence[Event],
        idempotency_keys: Sequence[str | None] | None,
        dedup: Sequence[bool] | None,
        where: Sequence[str],
    ) -> _Write:
        window = bool(self.settings.dedup_window_ms) or bool(self.settings.dedup_windows)
        encode = self.codec.encode_resp
        seqs = self._seqs
        # The caller's trace context (none while tracing is off), the same for all its events.
        argc, count, trace = _ARGS_PER_EVENT, _N_FIELDS, b""
        if carried := tracing.carrier():
            argc, count = argc + 2 * len(carried), bulk(b"%d" % (_FIELDS + 2 * len(carried)))
            trace = b"".join(bulk(f) + bulk(v) for f, v in carried)
        parts: dict[str, _Part] = {}
        order: list[tuple[str, int]] = []
        for i, event in enumerate(events):
            topic = where[i]
            part = parts.get(topic)
            if part is None:
                part = parts[topic] = _Part()
            order.append((topic, part.size))
            part.size += 1
            part.argc += argc
            seq = seqs[topic] = seqs.get(topic, 0) + 1
            if window and (dedup is None or dedup[i]):
                key = idempotency_keys[i] if idempotency_keys is not None else None
                born = _UNKNOWN_BIRTH if key else bulk(b"%015d" % minted_ms(event.id))
                part.args += (
                    _MARKED,
                    bulk(b"%d" % seq),
                    bulk(record_digest(key or event.id)),
                    born,
                )
            else:
                part.args += (_UNMARKED, bulk(b"%d" % seq), _NO_DIGEST, _UNKNOWN_BIRTH)
            part.args.append(count)
            part.args.append(encode(event) + trace)
        return _Write(parts, order)

    def _queue(
        self,
        events: Sequence[Event],
        idempotency_keys: Sequence[str | None] | None,
        dedup: Sequence[bool] | None,
        where: Sequence[str],
    ) -> asyncio.Future[list[Produced]]:
        write = self._encode(events, idempotency_keys, dedup, where)
        write.caller = self._batcher.submit(write)
        return write.caller

    async def _write(self, group: list[_Write]) -> list[list[Produced] | Exception]:
        """One script call per topic for the whole group; each caller's results.

        What goes out is decided when the connection is in hand (``execute`` calls
        ``build``): a caller cancelled while the group waited for a connection, for a
        reconnect or for the script to be loaded again is left out and writes nothing.
        A topic whose write Redis refused fails only the callers with events in it.
        """
        sent: list[bool] = []  # per write of the group: part of what went out
        topics: list[str] = []  # one script call each, in this order
        windows = self.settings.dedup_windows
        default_window = self.settings.dedup_window_ms
        seq_ttl = b"%d" % self.seq_ttl_ms
        shards = b"%d" % self.settings.dedup_shards
        skew = b"%d" % MINTED_SKEW_MS

        def build() -> list[Command]:
            sent[:] = [w.wanted for w in group]
            by_topic: dict[str, list[_Part]] = {}
            for write, wanted in zip(group, sent, strict=True):
                if wanted:
                    for topic, part in write.parts.items():
                        by_topic.setdefault(topic, []).append(part)
            topics[:] = by_topic
            calls: list[Command] = []
            for topic, parts in by_topic.items():
                pub = self.keys.published_prefix(topic)
                keys = [
                    self.keys.stream(topic).encode(),
                    f"{pub}seq:{self.identity}".encode(),
                    f"{pub}meta".encode(),
                ]
                call = Command(
                    b"EVALSHA",
                    _PUBLISH.sha.encode(),
                    b"3",
                    *keys,
                    b"%d" % windows.get(self._topic_of.get(topic, topic), default_window),
                    seq_ttl,
                    pub.encode(),
                    shards,
                    skew,
                    route=keys[0],
                )
                for part in parts:
                    call.add_packed(b"".join(part.args), part.argc)
                calls.append(call)
            return calls

        s = self.settings
        replicas = s.min_replicas if s.durability == "replicated" else 0

        async def send() -> list[Any]:
            unreplicated: NotReplicated | None = None
            try:
                replies = await execute(
                    self.client, build, replicas=replicas, replica_timeout_ms=s.replica_timeout_ms
                )
            except NotReplicated as e:
                replies, unreplicated = e.replies, e
            for reply in replies:
                if isinstance(reply, NoScriptError):
                    raise reply  # with_scripts loads the script and sends the group again
            if unreplicated is not None:
                raise unreplicated
            return replies

        try:
            replies = await self._send_in_order(send)
        except NotReplicated as e:
            raise PublishError(
                f"not replicated (durability='replicated'): {e}; the events are on the master "
                "and may be lost if it fails now; publishing them again is deduplicated"
            ) from e
        results: dict[str, list[Produced] | PublishError] = {}
        for topic, reply in zip(topics, replies, strict=True):
            if isinstance(reply, ResponseError):
                results[topic] = PublishError(f"Redis refused the write to {topic!r}: {reply}")
                continue
            out = results[topic] = []
            for j in range(0, len(reply), 2):
                dup = reply[j] == 0
                if dup:
                    self.duplicates += 1
                out.append(_new(Produced, (reply[j + 1].decode(), dup)))
        # each caller: its results in its order, or the error of a topic it wrote to
        start = dict.fromkeys(results, 0)
        answers: list[list[Produced] | Exception] = []
        for write, wanted in zip(group, sent, strict=True):
            if not wanted:
                answers.append(_LEFT_OUT)
                continue
            failed = [r for t in write.parts if isinstance(r := results[t], PublishError)]
            if failed:
                answers.append(failed[0])
            else:
                answers.append([results[t][start[t] + at] for t, at in write.order])  # type: ignore[index]
            for topic, part in write.parts.items():
                start[topic] += part.size
        return answers

    async def _send_in_order(self, send: Callable[[], Awaitable[list[Any]]]) -> list[Any]:
        """Send a write until Redis answers, before any later write of this producer goes out
        (the batcher waits for it): a resend after a lost reply carries the same sequences, at
        or below the stream's mark for this producer, and adds nothing again. A write that did
        not go out by ``retry_timeout_s`` fails its callers with PublishError."""
        backoff = Backoff(cap_s=1.0)
        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                return await with_scripts(self.client, [_PUBLISH], send)
            except REDIS_DOWN as e:
                if time.monotonic() >= deadline:
                    raise PublishError(
                        f"Redis unavailable for {self.retry_timeout_s}s: {e}; the events may or "
                        "may not be written: publishing them again is deduplicated by id"
                    ) from e
                if backoff.attempt == 0:
                    log.warning("publish_retrying", error=str(e))
                await backoff.sleep()

    async def group_backlog(self, topic: str) -> tuple[str, int]:
        """The group with the most entries waiting on ``topic`` (lag + pending), cached.

        One XINFO GROUPS at a time per topic: callers that find the cache stale while it is
        being read wait for that read (64 concurrent requests used to send 64).
        """
        cached = self._lag_cache.get(topic)
        if cached and cached[0] > time.monotonic():
            return cached[1], cached[2]
        reading = self._lag_reads.get(topic)
        if reading is None:
            reading = self._lag_reads[topic] = asyncio.ensure_future(self._read_backlog(topic))
            reading.add_done_callback(partial(self._read_done, topic))
        return await asyncio.shield(reading)

    def _read_done(self, topic: str, reading: asyncio.Future[tuple[str, int]]) -> None:
        self._lag_reads.pop(topic, None)
        if not reading.cancelled():
            reading.exception()  # retrieved: a waiter that was cancelled cannot

    async def _read_backlog(self, topic: str) -> tuple[str, int]:
        worst = ("", 0)
        for g in await group_infos(self.client, self.keys.stream(topic)):
            backlog = (g.lag or 0) + g.pending
            if backlog > worst[1]:
                worst = (g.name, backlog)
        expires = time.monotonic() + self.settings.lag_cache_ms / 1000
        self._lag_cache[topic] = (expires, *worst)
        return worst

    async def wait_for_capacity(self, topic: str) -> None:
        """Return when every group on ``topic`` is under the watermark; else BackpressureError."""
        s = self.settings
        group, backlog = await self.group_backlog(topic)
        if backlog <= s.high_watermark:
            return
        started = time.monotonic()
        log.warning("backpressure_engaged", topic=topic, group=group, backlog=backlog)
        while True:
            waited = time.monotonic() - started
            if waited >= s.backpressure_timeout_s:
                raise BackpressureError(topic, group, backlog, s.high_watermark, waited)
            await asyncio.sleep(max(s.lag_cache_ms, 10) / 1000)
            group, backlog = await self.group_backlog(topic)
            if backlog <= s.high_watermark:
                log.info("backpressure_released", topic=topic, waited_s=round(waited, 3))
                return
