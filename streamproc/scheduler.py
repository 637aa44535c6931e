"""Runtime schedules: recurring ticks added, changed and removed while the system runs.

The static table (``App(schedules=...)``) is code; per-entity jobs (poll this worker every
5 minutes, for as long as it exists) are data. ``Scheduler`` keeps them in Redis and the
ticker leader fires them with the static table's guarantees::

    s = Scheduler(ctx.redis, ctx.keys)
    await s.add("worker.w-17", every="5 min", event=WorkerPollTick, key="w-17")
    await s.remove("worker.w-17")

**Storage** (two keys, whatever the number of schedules): hash ``<p>:ticker:{ticker}:defs``
(name → definition, compact JSON) and sorted set ``<p>:ticker:{ticker}:due`` (name scored by
its next scheduled time, epoch ms). ``add`` is an idempotent upsert: an unchanged definition
keeps its next time, so a handler that runs again (a retry, a redelivery) changes nothing.

**Spread**: an interval schedule's instants are ``offset + k * interval`` with the offset a
stable hash of its name, so 100,000 schedules every 5 minutes fire ~333 per second all along
rather than 100,000 at :00. ``spread=False`` aligns to the epoch like the static table.

**Firing** (``RuntimeFirer``, run by the ticker leader between its static steps): one script
reads up to ``batch`` names whose time has come (``ZRANGE … BYSCORE LIMIT``, O(log n + due)),
and their definitions; the leader applies each one's missed-tick policy
(``schedule.plan_fires``) and builds its ticks; a second script, guarded by the lease token
(fencing), XADDs each schedule's ticks *and* moves its score to the next time, but only if its
score is still the one read (compare-and-set). Publish and record are one atomic step, so a
scheduled time fires exactly once across replicas and crashes with no dedup marker per tick: a
leader that dies before the script leaves the score as it was (its successor fires that
time), one that dies after has fired and recorded. A schedule removed or changed between the
two scripts is left alone (its score moved). Tick ids are ``tick_id(name, scheduled time)``.

**On Redis Cluster** the topic streams are in other slots than the ``{ticker}`` keys, so the
fire script writes the ticks to the leader's outbox ``<p>:ticker:{ticker}:outbox`` (a stream
in the ``{ticker}`` slot) with the same atomic record, and the leader then moves them to their
topics through a Producer (dedup by tick id) and deletes them from the outbox. A leader that
dies in between leaves them in the outbox: the next leader's step publishes them first, and a
tick published twice is one entry (the producer's marker), within its dedup window.

Runtime ticks skip the producer's backpressure wait (like the static table's, they are small
and a poll missed while a group lags is what ``missed="latest"`` is for).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from streamproc._lease import Lease
from streamproc._lua import Lua
from streamproc.codec import WIRE_FIELDS, Codec
from streamproc.connection import is_cluster
from streamproc.errors import ConfigError
from streamproc.keys import Keys
from streamproc.printable import NO_CONTROL_PATTERN, printable
from streamproc.producer import Producer
from streamproc.schedule import (
    Cron,
    Every,
    MissedPolicy,
    Tick,
    Trigger,
    cron,
    every,
    from_ms,
    plan_fires,
    tick_id_ms,
)

__all__ = ("SCHEDULE_NAME_RE", "RuntimeFirer", "ScheduleInfo", "Scheduler")

log = structlog.get_logger("streamproc.scheduler")

#: Runtime schedule names: like topic names, plus ':' (``worker:w-17``), up to 128 characters.
SCHEDULE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}")
_KEY_MAX = 256
_NO_CONTROL_RE = re.compile(NO_CONTROL_PATTERN)
_FIELDS = 2 * len(WIRE_FIELDS)

# KEYS: defs, due. ARGV: name, definition, next ms. 1 = created or changed, 0 = unchanged.
_ADD = Lua("""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] and redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
""")
# KEYS: defs, due. ARGV: name.
_REMOVE = Lua("""
local n = redis.call('HDEL', KEYS[1], ARGV[1])
return n + redis.call('ZREM', KEYS[2], ARGV[1])
""")
# KEYS: defs, due. ARGV: now ms, limit. {name, score, definition or false, ...} of due ones,
# then the earliest score after now ('' when none).
_CLAIM = Lua("""
local due = redis.call('ZRANGE', KEYS[2], '-inf', ARGV[1], 'BYSCORE', 'LIMIT', 0, ARGV[2],
  'WITHSCORES')
local out = {}
for i = 1, #due, 2 do
  out[#out + 1] = due[i]
  out[#out + 1] = due[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], due[i])
end
local later = redis.call('ZRANGE', KEYS[2], '(' .. ARGV[1], '+inf', 'BYSCORE', 'LIMIT', 0, 1,
  'WITHSCORES')
out[#out + 1] = later[2] or ''
return out
""")
# KEYS: lease, due, defs, then the topic streams. ARGV: token, then per schedule: name, score
# read, definition read, next score, number of ticks, then per tick: its stream's index in KEYS
# and FIELDS args. A schedule fires only if its score and its definition are still the ones
# read (a change that lands on the same next time is a change too). Returns {ticks written,
# schedules changed or removed meanwhile} or -1 when the lease is not ours.
_FIRE = Lua(f"""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local a, written, moved = 2, 0, 0
while a <= #ARGV do
  local name, n = ARGV[a], tonumber(ARGV[a + 4])
  local cur = redis.call('ZSCORE', KEYS[2], name)
  local ours = cur and tonumber(cur) == tonumber(ARGV[a + 1])
    and redis.call('HGET', KEYS[3], name) == ARGV[a + 2]
  if ours then redis.call('ZADD', KEYS[2], ARGV[a + 3], name) else moved = moved + 1 end
  a = a + 5
  for _ = 1, n do
    if ours then
      redis.call('XADD', KEYS[tonumber(ARGV[a])], '*', unpack(ARGV, a + 1, a + {_FIELDS}))
      written = written + 1
    end
    a = a + {_FIELDS + 1}
  end
end
return {{written, moved}}
""")


class _Def(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A runtime schedule as stored (compact: ~60 bytes for an interval schedule)."""

    event: str
    key: str
    #: Interval and offset in ms (interval schedules), or 0 with ``cron`` set.
    interval_ms: int = 0
    offset_ms: int = 0
    cron: str = ""
    tz: str = "UTC"
    missed: MissedPolicy = "latest"
    grace_ms: int = 30_000
    catch_up_max: int = 10


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(_Def)


class _Planned:
    """A stored definition as ``plan_fires`` reads it (the trigger is built only when asked:
    interval plans are integer arithmetic on the definition)."""

    __slots__ = ("_trigger", "d")

    def __init__(self, d: _Def) -> None:
        if not d.cron and d.interval_ms < 10:
            raise ConfigError(f"interval must be >= 10 ms, got {d.interval_ms} ms")
        self.d = d
        self._trigger: Trigger | None = None

    @property
    def trigger(self) -> Trigger:
        if self._trigger is None:
            d = self.d
            self._trigger = (
                Cron(d.cron, d.tz) if d.cron else Every(d.interval_ms / 1000, d.offset_ms / 1000)
            )
        return self._trigger

    @property
    def missed(self) -> MissedPolicy:
        return self.d.missed

    @property
    def grace_s(self) -> float:
        return self.d.grace_ms / 1000

    @property
    def catch_up_max(self) -> int:
        return self.d.catch_up_max

    def plan_ms(self, score: int, now_ms: int) -> tuple[list[int], int, int] | None:
        """What to fire at ``now_ms`` for the due time ``score``: (times to fire, oldest
        first; times passed over; the next time), all epoch ms; None when not due.

        ``schedule.plan_fires`` with integer arithmetic for intervals (the ticker's hot path
        at hundreds of fires per second), the same answers."""
        d = self.d
        if d.cron:
            times, passed, newest = plan_fires(self, from_ms(score - 1), from_ms(now_ms))
            if newest is None:
                return None
            nxt = self.trigger.next_after(max(newest, from_ms(now_ms)))
            return [_ms(t) for t in times], passed, _ms(nxt)
        step, off = d.interval_ms, d.offset_ms
        first = -(-(score - off) // step)  # the first instant at or after the score
        last = (now_ms - off) // step
        if last < first:
            return None
        count = last - first + 1
        latest = last * step + off
        if d.missed == "catch_up":
            n = min(count, d.catch_up_max)
            fire = [(k * step + off) for k in range(last - n + 1, last + 1)]
        elif d.missed == "skip" and now_ms - latest > d.grace_ms:
            fire = []
        else:
            fire = [latest]
        return fire, count - len(fire), latest + step


class ScheduleInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A runtime schedule as ``get`` and ``list`` show it."""

    name: str
    #: ``every 300s (offset 117.2s)`` or ``cron '0 9 * * 1' UTC``.
    trigger: str
    #: The tick's event type name.
    event: str
    key: str
    missed: MissedPolicy
    #: The next scheduled time (None when the definition has no score: being removed).
    next_at: datetime | None


def _spread_offset_ms(name: str, interval_ms: int) -> int:
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % interval_ms


def check_schedule_name(name: str) -> str:
    if not isinstance(name, str) or not SCHEDULE_NAME_RE.fullmatch(name):
        raise ConfigError(
            f"schedule name {str(name)[:80]!r}: expected 1-128 characters of letters, digits, "
            "'_', '.', ':', '-', starting with a letter or digit"
        )
    return name


def _trigger_text(d: _Def) -> str:
    if d.cron:
        return f"cron {d.cron!r} {d.tz}"
    return f"every {d.interval_ms / 1000:g}s (offset {d.offset_ms / 1000:g}s)"


class Scheduler:
    """Adds, changes, removes and reads runtime schedules (any process, any role)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client, self.keys = client, keys
        self._keys = [keys.ticker_defs(), keys.ticker_due()]

    async def add(
        self,
        name: str,
        *,
        event: type[Tick],
        every: str | float | None = None,
        cron: str | None = None,
        tz: str = "UTC",
        key: str = "",
        missed: MissedPolicy = "latest",
        grace_s: float = 30.0,
        catch_up_max: int = 10,
        spread: bool = True,
    ) -> bool:
        """Create or change ``name`` (an upsert); True when it was created or changed.

        Exactly one of ``every`` (``"5 min"``, seconds) and ``cron`` (``"0 9 * * 1"``,
        ``"Mon 09:00"``, in ``tz``). The ticks are ``event`` (a ``Tick`` subclass in the
        application's registry) with ``key`` (default: the name). An unchanged definition keeps
        its next time; a changed one is next due at its next time from now.
        """
        d = build_def(
            name,
            event=event,
            every_spec=every,
            cron_spec=cron,
            tz=tz,
            key=key,
            missed=missed,
            grace_s=grace_s,
            catch_up_max=catch_up_max,
            spread=spread,
        )
        nxt = _Planned(d).trigger.next_after(datetime.now(UTC))
        raw = _ENCODER.encode(d)
        return bool(await _ADD(self.client, self._keys, [name, raw, _ms(nxt)]))

    async def remove(self, name: str) -> bool:
        """Stop ``name``; True when it existed. A tick already published stays published."""
        return bool(await _REMOVE(self.client, self._keys, [name]))

    async def get(self, name: str) -> ScheduleInfo | None:
        async with self.client.pipeline(transaction=False) as p:
            p.hget(self._keys[0], name)
            p.zscore(self._keys[1], name)
            raw, score = await p.execute()
        return _info(name, raw, score)

    async def count(self) -> int:
        return int(await self.client.zcard(self._keys[1]))

    async def list(
        self, *, prefix: str = "", limit: int = 100, cursor: int = 0
    ) -> tuple[list[ScheduleInfo], int]:
        """About ``limit`` schedules (those whose name starts with ``prefix``), in no order,
        and the cursor of the next page (0 at the end): HSCAN of the definitions, so listing
        costs no memory per schedule."""
        if not 1 <= limit <= 1000:
            raise ConfigError("limit: 1 to 1000")
        if prefix and not SCHEDULE_NAME_RE.fullmatch(prefix):
            raise ConfigError("prefix: letters, digits, '_', '.', ':', '-'")
        found: dict[Any, Any] = {}
        while True:
            page: Any
            cursor, page = await self.client.hscan(
                self._keys[0], cursor, match=f"{prefix}*" if prefix else None, count=limit
            )
            found.update(page)
            if not cursor or len(found) >= limit:
                break
        names = list(found)
        scores: Any = await self.client.zmscore(self._keys[1], names) if names else []
        out = [
            info
            for n, score in zip(names, scores, strict=True)
            if (info := _info(n.decode(), found[n], score)) is not None
        ]
        return sorted(out, key=lambda i: i.name), int(cursor)


def build_def(
    name: str,
    *,
    event: type[Tick],
    every_spec: str | float | None,
    cron_spec: str | None,
    tz: str,
    key: str,
    missed: MissedPolicy,
    grace_s: float,
    catch_up_max: int,
    spread: bool,
) -> _Def:
    """The stored form of a schedule, every field checked (``ConfigError("field: reason")``)."""
    check_schedule_name(name)
    if not (isinstance(event, type) and issubclass(event, Tick)):
        raise ConfigError(f"event: {getattr(event, '__name__', event)!r} is not a Tick subclass")
    if (every_spec is None) == (cron_spec is None):
        raise ConfigError("every / cron: give exactly one of them")
    if not isinstance(key, str) or len(key) > _KEY_MAX:
        raise ConfigError(f"key: at most {_KEY_MAX} characters")
    if not _NO_CONTROL_RE.search(key):  # the ticks' key: Event.key refuses them when decoded
        raise ConfigError(f"key: {printable(key)!r} holds control characters")
    if missed not in ("skip", "latest", "catch_up"):
        raise ConfigError(f"missed: {missed!r} is not skip, latest or catch_up")
    if not 1 <= catch_up_max <= 1000:
        raise ConfigError("catch_up_max: 1 to 1000")
    if not 0 <= grace_s <= 86_400:
        raise ConfigError("grace_s: 0 to 86400")
    common: dict[str, Any] = {
        "event": event.type_name(),
        "key": key,
        "missed": missed,
        "grace_ms": round(grace_s * 1000),
        "catch_up_max": catch_up_max,
    }
    if cron_spec is not None:
        try:
            c = cron(cron_spec, tz=tz)
        except ConfigError as err:
            raise ConfigError(f"{'tz' if 'time zone' in str(err) else 'cron'}: {err}") from None
        return _Def(cron=c.expr, tz=c.tz, **common)
    try:
        trigger = every(every_spec)  # type: ignore[arg-type]
    except ConfigError as err:
        raise ConfigError(f"every: {err}") from None
    interval_ms = round(trigger.interval_s * 1000)
    if interval_ms > 366 * 86_400_000:
        raise ConfigError("every: at most 366 days")
    offset = _spread_offset_ms(name, interval_ms) if spread else 0
    return _Def(interval_ms=interval_ms, offset_ms=offset, **common)


def _info(name: str, raw: bytes | None, score: float | None) -> ScheduleInfo | None:
    if raw is None:
        return None
    try:
        d = _DECODER.decode(raw)
    except msgspec.DecodeError:
        return ScheduleInfo(
            name=name, trigger="(unreadable)", event="", key="", missed="latest", next_at=None
        )
    return ScheduleInfo(
        name=name,
        trigger=_trigger_text(d),
        event=d.event,
        key=d.key or name,
        missed=d.missed,
        next_at=from_ms(int(score)) if score is not None else None,
    )


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


class FireResult(msgspec.Struct):
    #: Ticks written to their streams.
    fired: int = 0
    #: Schedules found due.
    due: int = 0
    #: Scheduled times passed over by a missed-tick policy.
    skipped: int = 0
    #: Lateness (ms) of each on-time tick written: publish time minus scheduled time.
    lateness_ms: list[float] = msgspec.field(default_factory=list)


class RuntimeFirer:
    """What the ticker leader runs for the runtime schedules (see the module's docstring)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        codec: Codec[Any],
        lease: Lease,
        *,
        node: str,
        batch: int = 500,
        poll_s: float = 0.25,
        min_step_s: float = 0.02,
    ) -> None:
        self.client, self.keys, self.codec, self.lease = client, keys, codec, lease
        self.node, self.batch, self.poll_s, self.min_step_s = node, batch, poll_s, min_step_s
        #: Batches per step at most.
        self.max_batches = 8
        #: The earliest next time seen by the last step (epoch ms; inf: none known).
        self._next_ms = float("inf")
        self._keys = [keys.ticker_defs(), keys.ticker_due()]
        self._unknown: set[str] = set()
        #: On a Redis Cluster: ticks go through the outbox and this producer (module doc).
        self._outbox: Producer | None = None
        if is_cluster(client):
            self._outbox = Producer(client, codec, keys)

    async def next_due_s(self) -> float:
        """Seconds until the earliest runtime schedule known after the last step, at least
        ``min_step_s`` (ticks due meanwhile go out together) and at most ``poll_s`` (another
        process may add an earlier one at any time)."""
        due_s = self._next_ms / 1000 - time.time()
        return min(self.poll_s, max(self.min_step_s, due_s))

    async def fire_due(self, now: datetime | None = None) -> FireResult:
        """Fire every runtime schedule due at ``now`` (batch by batch). A no-op without the
        lease; stops when the lease is lost (the fire script refuses a stale token)."""
        out = FireResult()
        self._next_ms = float("inf")
        if self._outbox is not None and self.lease.held():
            await self._drain_outbox()  # a previous leader's ticks first
        while self.lease.held():
            at = now or datetime.now(UTC)
            raw: Any = await _CLAIM(self.client, self._keys, [_ms(at), self.batch])
            later = raw.pop()
            if later:
                self._next_ms = min(self._next_ms, float(later))
            if not raw:
                break
            n = len(raw) // 3
            out.due += n
            if not await self._fire(raw, at, out):
                break
            if n < self.batch or now is not None:
                break
            if out.due >= self.batch * self.max_batches:
                # A backlog is worked off over several steps (the next one at once): the
                # static table and a stop request are not kept waiting behind it.
                self._next_ms = 0
                break
        return out

    @staticmethod
    def _plan(raw: bytes) -> _Planned | None:
        try:
            planned = _Planned(_DECODER.decode(raw))
            if planned.d.cron:
                planned.trigger  # noqa: B018 (checks the expression and the zone)
            return planned
        except (msgspec.DecodeError, ConfigError):
            return None

    async def _drain_outbox(self, count: int = 1000) -> int:
        """Publish the ticks in the outbox (Redis Cluster) to their topics, then delete them.
        Returns how many moved. The producer's marker makes a tick published again one entry."""
        assert self._outbox is not None
        key, moved = self.keys.ticker_outbox(), 0
        while True:
            rows: Any = await self.client.xrange(key, count=count)
            if not rows:
                return moved
            events = [self.codec.decode(fields) for _, fields in rows]
            await self._outbox.append(events)
            await self.client.xdel(key, *[i for i, _ in rows])
            moved += len(rows)
            if len(rows) < count:
                return moved

    async def _fire(self, raw: Sequence[Any], now: datetime, out: FireResult) -> bool:
        streams: dict[str, int] = {}
        tick_index_at: list[int] = []  # where in argv each tick's stream index is
        argv: list[Any] = [self.lease.token]
        on_time: list[float] = []
        registry = self.codec.registry
        now_ms = _ms(now)
        source, fence = f"ticker:{self.node}", self.lease.fence
        encode = self.codec.encode_flat
        for i in range(0, len(raw), 3):
            name_b, score_b, def_b = raw[i], raw[i + 1], raw[i + 2]
            name = name_b.decode()
            score = int(float(score_b))
            planned = self._plan(def_b) if def_b is not None else None
            factory: Any = None
            if planned is not None and planned.d.event in registry:
                factory = registry.get(planned.d.event)
            if factory is None or planned is None:
                # No definition (removed half-way), unreadable, or a type this application does
                # not know: move it one day on and say so; it never blocks the others.
                if name not in self._unknown:
                    self._unknown.add(name)
                    log.error("runtime_schedule_unusable", schedule=name,
                              tick_type=planned.d.event if planned else None)  # fmt: skip
                argv += (name, score_b, def_b or b"", max(score, _ms(now)) + 86_400_000, 0)
                continue
            plan = planned.plan_ms(score, now_ms)
            if plan is None:  # not due after all (a clock step): leave it as it is
                continue
            fire, skipped, nxt = plan
            if nxt < self._next_ms:
                self._next_ms = nxt
            out.skipped += skipped
            argv += (name, score_b, def_b, nxt, len(fire))
            topic = factory.topic
            index = streams.setdefault(topic, 4 + len(streams))
            key = planned.d.key or name
            grace_ms = planned.d.grace_ms
            last = len(fire) - 1
            for j, at_ms in enumerate(fire):
                late_ms = now_ms - at_ms
                event = factory(
                    id=tick_id_ms(name, at_ms),
                    key=key,
                    source=source,
                    schedule=name,
                    scheduled_for=from_ms(at_ms),
                    fence=fence,
                    missed=skipped if j == last else 0,
                    catch_up=late_ms > grace_ms,
                )
                tick_index_at.append(len(argv))
                argv.append(index)
                argv += encode(event)
                if late_ms <= grace_ms:
                    on_time.append(at_ms / 1000)
        if len(argv) == 1:
            return True
        keys = [self.lease.keys.ticker_lease(), self._keys[1], self._keys[0]]
        if self._outbox is not None:  # one stream, in the {ticker} slot: every tick's index 4
            keys.append(self.keys.ticker_outbox())
            for i in tick_index_at:
                argv[i] = 4
        else:
            keys += [self.keys.stream(t) for t in sorted(streams, key=streams.__getitem__)]
        if not self.lease.held():
            return False
        result: Any = await _FIRE(self.client, keys, argv)
        if result == -1:
            log.warning("ticker_fenced_off", fence=self.lease.fence)
            self.lease.lose()
            return False
        if self._outbox is not None:
            await self._drain_outbox()
        published = time.time()
        out.fired += int(result[0])
        out.lateness_ms += [(published - t) * 1000 for t in on_time]
        return True
