"""What an operator asks first: how much is waiting, how old is it, what failed.

``collect(client, keys)`` reads, with read-only commands only (SCAN, XINFO, XPENDING summary,
XLEN, ZCARD, MEMORY USAGE, TIME, GET/HGETALL/PTTL on ticker keys, the heartbeats), a ``Report`` of

- every topic: the streams ``<prefix>:{*}:stream`` with length, age of the first and last
  entry (from the entry ids, against the server's clock), memory;
- every group on each topic: live consumers (by heartbeat, ``streamproc.presence``, not the
  names Redis remembers), pending, lag, backlog (= lag + pending: what is not yet done),
  oldest pending age, retries waiting, DLQ size; the group's retry stream counts;
- the ticker's keys (``<prefix>:ticker:*``), read tolerantly: whatever exists is shown;
- every schedule, of the application (``collect(..., schedules=app.schedules)``) or found in
  the ticker's keys: when it last fired and when it fires next (from its trigger), as
  ISO-8601 UTC and epoch ms.

``judge`` tells how one group is doing against its ``Limits`` (declared on its ``Concern``):
ok, busy (a long handler whose entries its live consumer keeps renewing), stuck (a pending
entry nobody renewed for ``stuck_after_s``, or work and no live consumer) or backlog (more
than ``max_backlog`` not finished). The dashboard colours its rows with it and ``inspect``
exits 1 on stuck or backlog (``breaches``). ``render_table`` prints the report.

``redis_memory`` reads ``INFO memory``: ``used_memory`` against ``maxmemory``, high at or above
``RedisSettings.memory_alert_ratio`` (0.8). A high Redis is a breach too (``inspect`` and
``check`` exit 1); ``maxmemory`` 0 (not set) is shown, not judged: there is no ratio. The
ingest's ``streamproc.metrics.RedisMemoryMonitor`` samples the same figures for its gauges
and the ``redis_memory_high`` log.

Ages are seconds, sizes are entries, memory is bytes; the table shows times as ISO-8601 UTC
with their distance from now (``streamproc._human``: "3 min ago", "in 45 s"), all on the
server's clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamproc import _human
from streamproc.breaker import BreakerState, breaker_states
from streamproc.concern import Concern, Limits
from streamproc.groups import GroupInfo, group_info, group_infos
from streamproc.keys import Keys
from streamproc.presence import Liveness, live_consumers, liveness
from streamproc.printable import printable
from streamproc.producer import dedup_state

if TYPE_CHECKING:
    from streamproc.schedule import Schedule

__all__ = (
    "STUCK_SAMPLE",
    "GroupState",
    "GroupStatus",
    "Health",
    "LimitsOf",
    "RedisMemory",
    "Report",
    "ScheduleStatus",
    "TickerKey",
    "TickerStatus",
    "TopicStatus",
    "breaches",
    "collect",
    "group_status",
    "health",
    "judge",
    "limits_of",
    "memory_breach",
    "memory_line",
    "redis_memory",
    "render_table",
    "schedule_statuses",
    "topics",
    "unattended",
)

#: Pending entries over the idle limit looked at per group and stream (XPENDING IDLE … COUNT).
STUCK_SAMPLE = 100

#: How a group is doing: ok; busy (a pending entry older than ``stuck_after_s`` that its
#: live consumer keeps renewing: a long handler, not a fault); stuck (a pending entry idle
#: past ``stuck_after_s``, or work waiting and no live consumer); backlog (over ``max_backlog``).
GroupState = Literal["ok", "busy", "stuck", "backlog"]
#: A group's limits by its name (``limits_of``).
LimitsOf = Callable[[str], Limits]


def limits_of(
    concerns: Mapping[str, Concern] | Iterable[Concern] = (),
    *,
    stuck_after_s: float | None = None,
    max_backlog: int | None = None,
) -> LimitsOf:
    """Each group's ``Concern.limits`` (the defaults for a group no concern declares), with
    ``stuck_after_s`` / ``max_backlog`` overriding every group's when given (CLI flags)."""
    declared = {
        c.group: c.limits
        for c in (concerns.values() if isinstance(concerns, Mapping) else concerns)
    }
    overrides: dict[str, Any] = {}
    if stuck_after_s is not None:
        overrides["stuck_after_s"] = stuck_after_s
    if max_backlog is not None:
        overrides["max_backlog"] = max_backlog

    def of(group: str) -> Limits:
        base = declared.get(group) or Limits()
        return msgspec.structs.replace(base, **overrides) if overrides else base

    return of


_DEFAULT_LIMITS = limits_of()


class GroupStatus(msgspec.Struct, kw_only=True):
    topic: str
    group: str
    #: Live consumers: online by heartbeat, or active without one (``presence.live_consumers``).
    consumers: int
    pending: int
    #: Entries not yet delivered to the group; None when Redis cannot tell (after trims/SETID).
    lag: int | None
    #: lag + pending: entries the group has not finished.
    backlog: int | None
    #: Age of the oldest entry delivered but not acked (from its entry id), None when none.
    oldest_pending_age_s: float | None
    #: Retries waiting for their time (delayed zset) and due ones not yet read (retry stream).
    retries_waiting: int
    dlq: int
    last_delivered_id: str
    #: Consumer names Redis remembers for the group (live or not).
    names: int = 0
    #: The limits it is judged by: its Concern's, or the defaults.
    limits: Limits = msgspec.field(default_factory=Limits)
    #: Pending entries idle (not delivered or renewed) longer than ``limits.stuck_after_s``,
    #: on the topic stream and the retry stream (``STUCK_SAMPLE`` at most each).
    stuck_pending: int = 0
    #: The longest idle time among those, seconds; None when none.
    longest_idle_s: float | None = None


class Health(msgspec.Struct, kw_only=True):
    """One group judged against its limits (``judge``)."""

    group: str
    topics: list[str]
    state: GroupState
    #: Why, a line each: the stuck and backlog lines are breaches, the busy one a note.
    reasons: list[str]


class DedupStatus(msgspec.Struct, kw_only=True):
    """A topic's producer-side dedup state (``streamproc.producer.dedup_state``). Consumers
    keep none per event: a group's pending list decides (README, Guarantees)."""

    window_ms: int
    #: Records by event id / idempotency key, current and previous generation.
    records: int
    shards: int
    #: Their memory, sampled (``MEMORY USAGE`` of up to 16 shard hashes a generation).
    memory_bytes: int
    #: Producers with a live sequence mark on the topic.
    producers: int


class TopicStatus(msgspec.Struct, kw_only=True):
    topic: str
    stream: str
    length: int
    first_id: str | None
    last_id: str | None
    first_age_s: float | None
    last_age_s: float | None
    memory_bytes: int | None
    groups: list[GroupStatus]
    #: None when no producer recorded anything on the topic.
    dedup: DedupStatus | None = None


class TickerKey(msgspec.Struct, kw_only=True):
    key: str
    type: str
    ttl_ms: int | None
    value: Any


class TickerStatus(msgspec.Struct, kw_only=True):
    #: The value of a lease/leader key, when one exists.
    leader: str | None
    leader_ttl_ms: int | None
    #: schedule name -> fields (e.g. last, next) found in the ticker's hashes.
    schedules: dict[str, dict[str, str]]
    keys: list[TickerKey]


class ScheduleStatus(msgspec.Struct, kw_only=True):
    """One schedule: when the ticker last dealt with it and when it is due next."""

    name: str
    #: The application's trigger (``every 300s``); None when only the ticker's keys know it.
    trigger: str | None
    #: Scheduled time of the last tick, ISO-8601 UTC (or the stored text when it is not a
    #: time); None when it never fired.
    last: str | None
    #: Next scheduled time, ISO-8601 UTC: from the trigger when the application has the
    #: schedule, else what the ticker's keys say; None when unknown.
    next: str | None
    last_ms: int | None = None
    next_ms: int | None = None


class RedisMemory(msgspec.Struct, kw_only=True):
    """``INFO memory`` judged against an alert ratio (``redis_memory``)."""

    used_bytes: int
    #: 0: ``maxmemory`` not set (no limit; ``streamproc up`` always sets one).
    maxmemory_bytes: int
    #: used / maxmemory; None when maxmemory is not set.
    ratio: float | None
    #: The ratio at or above which it is high (``RedisSettings.memory_alert_ratio``).
    alert_ratio: float
    high: bool
    policy: str | None = None


class Report(msgspec.Struct, kw_only=True):
    prefix: str
    server_time_ms: int
    topics: list[TopicStatus]
    ticker: TickerStatus | None
    #: By name: the application's schedules and any the ticker's keys hold.
    schedules: list[ScheduleStatus] = msgspec.field(default_factory=list)
    #: The circuit breakers of outside destinations (``streamproc.breaker``).
    breakers: list[BreakerState] = msgspec.field(default_factory=list)
    #: Redis' memory against maxmemory; None when not read.
    redis_memory: RedisMemory | None = None


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _id_ms(entry_id: Any) -> int:
    return int(_text(entry_id).partition("-")[0])


def _age_s(now_ms: int, entry_id: Any) -> float:
    return round(max(0, now_ms - _id_ms(entry_id)) / 1000, 3)


async def server_time_ms(client: aioredis.Redis) -> int:
    """The server's clock: entry ids are stamped with it, so ages are measured against it."""
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def redis_memory(client: aioredis.Redis, alert_ratio: float = 0.8) -> RedisMemory:
    """``used_memory`` against ``maxmemory`` (``INFO memory``: a managed Redis that forbids
    ``CONFIG GET`` still answers it), high at or above ``alert_ratio``. On a Redis Cluster,
    the node the client sends keyless commands to."""
    info: dict[str, Any] = await client.info("memory")
    used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
    ratio = used / limit if limit > 0 else None
    policy = info.get("maxmemory_policy")
    return RedisMemory(
        used_bytes=used,
        maxmemory_bytes=limit,
        ratio=None if ratio is None else round(ratio, 4),
        alert_ratio=alert_ratio,
        high=ratio is not None and ratio >= alert_ratio,
        policy=None if policy is None else str(policy),
    )


def memory_line(mem: RedisMemory) -> str:
    """``Redis memory: 812.0MiB of maxmemory 1.0GiB (79 %, alert at 80 %)``, or with
    ``maxmemory not set``."""
    if mem.ratio is None:
        return (
            f"Redis memory: {_bytes(mem.used_bytes)} used, maxmemory not set "
            "(no limit: Redis grows until the host runs out; streamproc up always sets one)"
        )
    return (
        f"Redis memory: {_bytes(mem.used_bytes)} of maxmemory {_bytes(mem.maxmemory_bytes)} "
        f"({mem.ratio:.0%}, alert at {mem.alert_ratio:.0%})"
    )


def memory_breach(mem: RedisMemory | None) -> list[str]:
    """One line when Redis' memory is high, else none."""
    if mem is None or not mem.high:
        return []
    return [
        f"{memory_line(mem)}: high; at maxmemory Redis refuses writes "
        f"(policy {mem.policy or 'unknown'}): trim, add memory or raise maxmemory"
    ]


async def topics(client: aioredis.Redis, keys: Keys) -> list[str]:
    """Every topic that has a stream under the prefix, sorted."""
    found = set()
    async for key in client.scan_iter(match=keys.stream("*"), count=1000, _type="stream"):
        found.add(keys.topic_of(_text(key)))
    return sorted(found)


async def _oldest_pending_age_s(
    client: aioredis.Redis, stream: str, group: str, now_ms: int
) -> float | None:
    # None when the entries were acked since XINFO said they were pending.
    first = (await client.xpending(stream, group))["min"]
    return None if first is None else _age_s(now_ms, first)


async def _idle_s(client: aioredis.Redis, stream: str, group: str, limits: Limits) -> list[float]:
    """Idle times (s) of pending entries nobody delivered or renewed for ``stuck_after_s``.

    A live consumer renews what it holds (XCLAIM … JUSTID resets the idle time, not the
    entry id), so a long handler's entry never shows here while its consumer lives."""
    rows: list[dict[str, Any]] = await client.xpending_range(
        stream,
        group,
        min="-",
        max="+",
        count=STUCK_SAMPLE,
        idle=int(limits.stuck_after_s * 1000),
    )
    return [int(r["time_since_delivered"]) / 1000 for r in rows]


async def group_status(
    client: aioredis.Redis,
    keys: Keys,
    topic: str,
    info: GroupInfo,
    now_ms: int,
    live: Liveness | None = None,
    limits: Limits | None = None,
) -> GroupStatus:
    """One group on one topic, from its XINFO GROUPS row plus its retry stream and DLQ;
    its live consumers from ``live`` (read here when not given); its stuck entries against
    ``limits`` (the defaults when not given)."""
    group, stream = info.name, keys.stream(topic)
    limits = limits or Limits()
    if live is None:
        live = await liveness(client, keys)
    pending, lag = info.pending, info.lag
    oldest: float | None = None
    idle: list[float] = []
    if pending:
        oldest = await _oldest_pending_age_s(client, stream, group, now_ms)
        idle = await _idle_s(client, stream, group, limits)
    retry_key = keys.retry_stream(topic, group)
    retries = int(await client.zcard(keys.delayed(topic, group)))
    retry = await group_info(client, retry_key, group)  # None: no retry stream yet
    if retry is not None:
        if retry.pending:
            age = await _oldest_pending_age_s(client, retry_key, group, now_ms)
            if age is not None:
                oldest = age if oldest is None else max(oldest, age)
            idle += await _idle_s(client, retry_key, group, limits)
        pending += retry.pending
        retries += retry.lag or 0
    return GroupStatus(
        topic=topic,
        group=group,
        consumers=await live_consumers(client, (stream,), group, live)
        if info.consumers
        else len(live.online.get(group, ())),
        pending=pending,
        lag=lag,
        backlog=None if lag is None else lag + pending,
        oldest_pending_age_s=oldest,
        retries_waiting=retries,
        dlq=int(await client.xlen(keys.dlq(topic, group))),
        last_delivered_id=info.last_delivered_id,
        names=info.consumers,
        limits=limits,
        stuck_pending=len(idle),
        longest_idle_s=max(idle) if idle else None,
    )


async def topic_status(
    client: aioredis.Redis,
    keys: Keys,
    topic: str,
    now_ms: int,
    *,
    memory: bool = True,
    live: Liveness | None = None,
    limits: LimitsOf = _DEFAULT_LIMITS,
) -> TopicStatus | None:
    stream = keys.stream(topic)
    try:
        info: dict[str, Any] = await client.xinfo_stream(stream)
    except ResponseError:
        return None  # deleted between SCAN and now
    groups = await group_infos(client, stream)
    first, last = info.get("first-entry"), info.get("last-entry")
    mem = await client.memory_usage(stream) if memory else None
    if live is None:
        live = await liveness(client, keys)
    state = await dedup_state(client, keys, topic) if memory else None
    return TopicStatus(
        topic=topic,
        stream=stream,
        length=int(info["length"]),
        first_id=_text(first[0]) if first else None,
        last_id=_text(last[0]) if last else None,
        first_age_s=_age_s(now_ms, first[0]) if first else None,
        last_age_s=_age_s(now_ms, last[0]) if last else None,
        memory_bytes=None if mem is None else int(mem),
        groups=[
            await group_status(client, keys, topic, g, now_ms, live, limits(g.name))
            for g in sorted(groups, key=lambda g: g.name)
        ],
        dedup=None
        if state is None
        else DedupStatus(
            window_ms=state.window_ms,
            records=state.records,
            shards=state.shards,
            memory_bytes=state.bytes,
            producers=state.producers,
        ),
    )


async def ticker_status(client: aioredis.Redis, keys: Keys) -> TickerStatus | None:
    """Whatever the ticker keeps under ``<prefix>:ticker:*``; None when nothing is there.

    Read tolerantly (the ticker owns the layout): a string key whose name holds ``lease`` or
    ``leader`` is the leader; a hash's fields are schedules (field = schedule name) unless the
    key names one schedule (``…:<name>`` with fields such as last/next).
    """
    names = sorted([_text(k) async for k in client.scan_iter(match=keys.ticker("*"), count=1000)])
    if not names:
        return None
    status = TickerStatus(leader=None, leader_ttl_ms=None, schedules={}, keys=[])
    base = keys.ticker("")
    for name in names:
        kind = _text(await client.type(name))
        ttl = int(await client.pttl(name))
        value: Any = None
        if kind == "string":
            value = _text(await client.get(name))
            if any(w in name[len(base) :] for w in ("lease", "leader")) and "fenc" not in name:
                status.leader, status.leader_ttl_ms = value, ttl if ttl >= 0 else None
        elif kind == "hash":
            fields = {_text(k): _text(v) for k, v in (await client.hgetall(name)).items()}
            value = fields
            rest = name[len(base) :]
            if any(w in rest for w in ("last", "next", "fired", "schedules")):
                for sched, when in fields.items():
                    what = "next" if "next" in rest else "last"
                    status.schedules.setdefault(sched, {})[what] = when
            elif {"last", "next"} & fields.keys() or "schedule" in rest:
                status.schedules[rest.rpartition(":")[2]] = fields
        status.keys.append(
            TickerKey(key=name, type=kind, ttl_ms=ttl if ttl >= 0 else None, value=value)
        )
    return status


def _iso(ms: int) -> str:
    return (
        datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


def _when_ms(text: str | None) -> int | None:
    """Epoch ms from what a ticker key holds: epoch ms (the ticker's own) or ISO-8601."""
    if not text:
        return None
    if text.isdigit():
        return int(text)
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        return None
    return int((at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp() * 1000)


def schedule_statuses(
    ticker: TickerStatus | None, schedules: Sequence[Schedule], now_ms: int
) -> list[ScheduleStatus]:
    """Last and next time of every schedule, by name; ``now_ms`` is the server's clock.

    Next comes from the trigger, after the later of now and the last fired time (as the
    ticker computes it); a schedule only the ticker's keys know keeps their ``next``.
    """
    known = {s.name: s for s in schedules}
    seen = ticker.schedules if ticker is not None else {}
    out = []
    for name in sorted(seen.keys() | known.keys()):
        fields, sched = seen.get(name, {}), known.get(name)
        last_raw = fields.get("last")
        last_ms, next_ms = _when_ms(last_raw), _when_ms(fields.get("next"))
        if sched is not None:
            after = datetime.fromtimestamp(max(now_ms, last_ms or 0) / 1000, UTC)
            next_ms = int(sched.trigger.next_after(after).timestamp() * 1000)
        out.append(
            ScheduleStatus(
                name=name,
                trigger=None if sched is None else str(sched.trigger),
                last=last_raw if last_ms is None else _iso(last_ms),
                next=None if next_ms is None else _iso(next_ms),
                last_ms=last_ms,
                next_ms=next_ms,
            )
        )
    return out


async def collect(
    client: aioredis.Redis,
    keys: Keys,
    *,
    memory: bool = True,
    schedules: Sequence[Schedule] = (),
    limits: LimitsOf = _DEFAULT_LIMITS,
    memory_alert_ratio: float = 0.8,
) -> Report:
    """A snapshot of every topic, group and the ticker under ``keys.prefix``.

    ``schedules``: the application's (``App.schedules``), so that each shows when it is
    due next, and shows at all before it first fired. ``limits``: each group's
    (``limits_of(app.concerns)``), for its stuck entries. ``memory_alert_ratio``: the
    ``used_memory / maxmemory`` that is a breach (``RedisSettings.memory_alert_ratio``).
    """
    now_ms = await server_time_ms(client)
    live = await liveness(client, keys)
    found = []
    for topic in await topics(client, keys):
        status = await topic_status(
            client, keys, topic, now_ms, memory=memory, live=live, limits=limits
        )
        if status is not None:
            found.append(status)
    ticker = await ticker_status(client, keys)
    return Report(
        prefix=keys.prefix,
        server_time_ms=now_ms,
        topics=found,
        ticker=ticker,
        schedules=schedule_statuses(ticker, schedules, now_ms),
        breakers=await breaker_states(client, keys),
        redis_memory=await redis_memory(client, memory_alert_ratio),
    )


def unattended(groups: Iterable[GroupStatus]) -> list[str]:
    """One line per group that has work waiting (lag or pending) and no live consumer on
    any of its topics: nothing will do that work."""
    live: dict[str, int] = {}
    waiting: dict[str, list[str]] = {}
    for g in groups:
        live[g.group] = max(live.get(g.group, 0), g.consumers)
        if (g.lag or 0) + g.pending > 0:
            waiting.setdefault(g.group, []).append(f"{g.topic} ({_n(g.backlog)})")
    return [
        f"{group} has work waiting and no live consumer: backlog on {', '.join(on)}"
        for group, on in sorted(waiting.items())
        if not live[group]
    ]


def judge(statuses: Sequence[GroupStatus]) -> Health:
    """How one group is doing: its rows on every topic it reads, against their ``limits``.

    The one judgement behind the dashboard's colours and ``inspect``'s exit code:

    - **stuck**: work waiting (lag or pending) and no live consumer on any of its topics, or a
      pending entry idle past ``stuck_after_s`` (delivered, then neither acked nor renewed:
      its consumer died or hangs);
    - **backlog**: more than ``max_backlog`` entries not finished (lag + pending, summed);
    - **busy**: neither, and its oldest pending entry is older than ``stuck_after_s``: a long
      handler whose consumer keeps renewing the entry (its idle time stays low while its age,
      from the entry id, grows). Not a breach;
    - **ok**: otherwise.
    """
    if not statuses:
        raise ValueError("judge needs the group's statuses")
    group, limits = statuses[0].group, statuses[0].limits
    topics = [s.topic for s in statuses]
    stuck: list[str] = unattended(statuses)
    for s in statuses:
        if s.stuck_pending:
            many = f"{s.stuck_pending}+" if s.stuck_pending >= STUCK_SAMPLE else s.stuck_pending
            entries = "entry" if s.stuck_pending == 1 else "entries"
            stuck.append(
                f"{group} on {s.topic}: {many} pending {entries} "
                f"idle {_n(s.longest_idle_s, 's')} > stuck_after_s {limits.stuck_after_s:g} "
                "(not renewed: its consumer died or hangs)"
            )
    behind: list[str] = []
    backlog = sum(s.backlog if s.backlog is not None else s.pending for s in statuses)
    if backlog > limits.max_backlog:
        behind.append(
            f"{group} on {', '.join(topics)}: backlog {backlog} > max_backlog {limits.max_backlog}"
        )
    ages = [s.oldest_pending_age_s for s in statuses if s.oldest_pending_age_s is not None]
    if stuck:
        return Health(group=group, topics=topics, state="stuck", reasons=stuck + behind)
    if behind:
        return Health(group=group, topics=topics, state="backlog", reasons=behind)
    if ages and max(ages) > limits.stuck_after_s:
        note = (
            f"{group}: oldest pending {max(ages):.1f}s old, renewed by its live consumer "
            f"(busy, not stuck: idle < stuck_after_s {limits.stuck_after_s:g})"
        )
        return Health(group=group, topics=topics, state="busy", reasons=[note])
    return Health(group=group, topics=topics, state="ok", reasons=[])


def health(report: Report) -> list[Health]:
    """Every group of the report judged (``judge``), by name."""
    by_group: dict[str, list[GroupStatus]] = {}
    for t in report.topics:
        for g in t.groups:
            by_group.setdefault(g.group, []).append(g)
    return [judge(rows) for _, rows in sorted(by_group.items())]


def breaches(report: Report) -> list[str]:
    """One line per reason a group is stuck or behind, and one when Redis' memory is high
    (empty: all is within limits). Busy groups are not breaches."""
    groups = [line for h in health(report) if h.state in ("stuck", "backlog") for line in h.reasons]
    return memory_breach(report.redis_memory) + groups


def _n(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}{unit}"
    return f"{value}{unit}"


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            break
        size /= 1024
    return f"{n}B" if unit == "B" else f"{size:.1f}{unit}"


def _at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _relative(ms: int, now_ms: int) -> str:
    """``3 min ago``, ``in 45 s``, ``now``: ``ms`` against ``now_ms`` (the server's clock)."""
    return _human.relative(_at(ms), _at(now_ms))


def _time(ms: int | None, text: str | None, now_ms: int) -> str:
    """ISO-8601 UTC and how far from now; the stored text when it is not a time."""
    if ms is None:
        return _human.when(text, _at(now_ms))
    return _human.when(_at(ms), _at(now_ms))


def _table(header: Iterable[str], rows: list[list[str]]) -> list[str]:
    head = list(header)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*head), *(fmt.format(*r) for r in rows)]


_GROUP_COLUMNS = (
    *("GROUP", "TOPIC", "CONSUMERS", "LAG", "PENDING", "BACKLOG"),
    *("OLDEST PENDING", "RETRYING", "DLQ", "STATE"),
)


def render_table(report: Report, problems: list[str] | None = None) -> str:
    """The report as terminal tables: topics, groups, ticker, then any breaches."""
    lines = [f"prefix {report.prefix}: {len(report.topics)} topic(s)"]
    if report.redis_memory is not None:
        lines.append(memory_line(report.redis_memory))
    lines.append("")
    lines += _table(
        ("TOPIC", "LENGTH", "GROUPS", "FIRST AGE", "LAST AGE", "MEMORY"),
        [
            [
                t.topic,
                str(t.length),
                str(len(t.groups)),
                _n(t.first_age_s, "s"),
                _n(t.last_age_s, "s"),
                _bytes(t.memory_bytes),
            ]
            for t in report.topics
        ],
    )
    deduped = [t for t in report.topics if t.dedup is not None]
    if deduped:
        lines.append("")
        lines += _table(
            (
                "DEDUP (PRODUCERS)",
                "WINDOW",
                "RECORDS",
                "SHARDS",
                "MEMORY",
                "PER RECORD",
                "PRODUCERS",
            ),
            [
                [
                    t.topic,
                    _human.duration(d.window_ms / 1000),
                    str(d.records),
                    str(d.shards),
                    _bytes(d.memory_bytes),
                    _bytes(d.memory_bytes // d.records) if d.records else "-",
                    str(d.producers),
                ]
                for t in deduped
                if (d := t.dedup) is not None
            ],
        )
        lines.append("consumer groups keep no dedup state per event (their pending list decides)")
    unread = [t.topic for t in report.topics if t.length and not t.groups]
    if unread:
        lines.append(f"no group reads {', '.join(unread)}: what is written there is never handled")
    groups = [g for t in report.topics for g in t.groups]
    states = {h.group: h for h in health(report)}
    lines.append("")
    if groups:
        lines += _table(
            _GROUP_COLUMNS,
            [
                [
                    g.group,
                    g.topic,
                    str(g.consumers),
                    _n(g.lag),
                    str(g.pending),
                    _n(g.backlog),
                    _n(g.oldest_pending_age_s, "s"),
                    str(g.retries_waiting),
                    str(g.dlq),
                    states[g.group].state,
                ]
                for g in groups
            ],
        )
    else:
        lines.append("no consumer groups")
    now = report.server_time_ms
    if report.ticker is not None:
        tk = report.ticker
        leader = tk.leader or "-"
        ttl = (
            f" (lease ends in {_human.duration(tk.leader_ttl_ms / 1000)})"
            if tk.leader_ttl_ms is not None
            else ""
        )
        lines += ["", f"ticker leader: {leader}{ttl}"]
        if not report.schedules:
            lines += [f"ticker keys: {', '.join(k.key for k in tk.keys)}"]
    if report.schedules:
        if report.ticker is None:
            lines += ["", "ticker: nothing in Redis yet (no leader has run)"]
        lines += _table(
            ("SCHEDULE", "TRIGGER", "LAST", "NEXT"),
            [
                [
                    s.name,
                    _human.trigger(s.trigger) if s.trigger else "-",
                    _time(s.last_ms, s.last, now),
                    _time(s.next_ms, s.next, now),
                ]
                for s in report.schedules
            ],
        )
    if report.breakers:
        lines.append("")
        lines += _table(
            ("BREAKER", "STATE", "FAILURES", "CHANGED", "HELD UNTIL", "LAST ERROR"),
            [
                [
                    b.name,
                    b.state,
                    str(b.failures),
                    _relative(b.changed_at, now) if b.changed_at else "-",
                    _relative(b.hold_until, now) if b.hold_until > now else "-",
                    b.last_error[:60] or "-",
                ]
                for b in report.breakers
            ],
        )
    busy = [line for h in states.values() if h.state == "busy" for line in h.reasons]
    if busy:
        lines += ["", "BUSY (not stuck):", *(f"  {b}" for b in busy)]
    if problems:
        lines += ["", "SLO BREACHED:", *(f"  {p}" for p in problems)]
    # Names and errors read from Redis (a breaker's last error, a leader id) are shown with
    # their control characters escaped.
    return "\n".join(map(printable, lines))
