"""The dashboard's data: one ``Snapshot`` of the prefix, built from Redis about every second.

The figures come from ``streamproc.inspect.collect`` (topics, groups, DLQ sizes, ticker keys),
plus what a single report cannot give and a series of them can:

- **throughput** per group: events finished on the topic stream per second, from the change
  of XINFO GROUPS ``entries-read - pending`` between two samples (server clock), so it counts
  acks, dead letters and hand-offs to the retry stream alike;
- **pending age p50/p99**: ages of the group's delivered-not-acked entries (XPENDING, first
  ``pending_sample`` of them), from their entry ids;
- **state** per group: ``streamproc.inspect.judge`` against the group's ``Limits`` (ok, busy,
  stuck, backlog): the same judgement as ``streamproc inspect``'s exit code;
- **failed/s** per group: growth of its DLQ stream's ``entries-added`` (dead letters written)
  between two samples, beside done/s;
- **ack latency p50/p99** per group: time from XADD (the entry id, Redis' clock) to ack of the
  events acked over the last ``LATENCY_WINDOW_S`` (60 s; less just after start). Each
  consumer writes its cumulative histogram to
  ``Keys.latency(group)`` every ``stats_interval_ms`` (5 s); the snapshot sums the growth of
  every consumer's histogram over the window and reports the upper bound of the bucket holding
  the percentile (1, 2, 5, 10, 25, 50, 100 ms …): a bound, not an exact value. None when
  nothing was acked in the window (or before the second sample);
- **unread topics**: a topic with entries and no consumer group reading it is flagged;
- **render pool use**: the groups reading the render topics — consumers, in flight (pending),
  waiting (lag), done/s. Slot occupancy lives inside the render process (its
  ``streamproc_offload_*`` metrics), out of this process's reach;
- **runtime schedules**: how many there are (``Scheduler.count()``), beside the static table;
- **Redis memory**: ``used_memory`` against ``maxmemory`` and the alert ratio
  (``inspect.redis_memory``: one ``INFO memory`` a snapshot), high as ``check`` and the
  ingest's ``redis_memory_high`` warning judge it; None when Redis refuses ``INFO`` (an ACL
  user without it) — the rest of the snapshot is built as usual;
- **application panels** (``App(panels=...)``, ``streamproc.dashboard.panels``): each panel's
  table, or its error.

``Sampler.snapshot()`` is shared by every open page: at most one Redis read per
``interval_s``, whatever the number of viewers.

No SCAN: the topics come from the registry set (``Keys.topics``, ``registered_topics``:
every role adds its topics when it creates its groups, a producer when it first writes one)
and the ticker's leader and last fired times from its keys by name. A snapshot's cost grows
with the topics and groups, not with the size of the keyspace.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence
from typing import Annotated, Any

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from streamproc.dashboard.panels import PanelReader, PanelView
from streamproc.groups import group_infos, registered_topics
from streamproc.inspect import (
    GroupState,
    GroupStatus,
    Health,
    LimitsOf,
    RedisMemory,
    Report,
    ScheduleStatus,
    TickerStatus,
    health,
    limits_of,
    redis_memory,
    schedule_statuses,
    server_time_ms,
    topic_status,
)
from streamproc.keys import Keys
from streamproc.schedule import Schedule
from streamproc.scheduler import Scheduler

__all__ = (
    "LATENCY_NOTE",
    "LATENCY_WINDOW_S",
    "GroupView",
    "RenderView",
    "Sampler",
    "ScheduleView",
    "Snapshot",
    "TickerView",
    "TopicView",
    "build_snapshot",
    "histogram_percentile",
    "percentile",
)

LATENCY_NOTE = (
    "publish to ack of the events acked over the last minute, from the histograms the "
    "consumers write every 5 s (upper bound of the bucket: 1, 2, 5, 10, 25, 50 ms ...); "
    "blank while nothing was acked"
)
#: Histograms of consumers silent this long are ignored (stopped or gone).
STALE_MS = 60_000
#: Latency percentiles cover the events acked over about this long (the consumers write their
#: histograms every 5 s: a window of one sample would mostly be empty and flicker).
LATENCY_WINDOW_S = 60.0
_DEFAULT_LIMITS = limits_of()


class TopicView(msgspec.Struct, kw_only=True):
    topic: str
    length: int
    last_age_s: float | None
    #: Entries appended per second since the previous sample (None on the first).
    added_per_s: float | None
    #: Consumer groups reading it; 0 with entries = nobody reads it (``unread``).
    groups: int = 0
    #: It has entries and no consumer group: what is written to it is never handled.
    unread: bool = False


class GroupView(msgspec.Struct, kw_only=True):
    topic: str
    group: str
    consumers: int
    lag: int | None
    pending: int
    backlog: int | None
    oldest_pending_age_s: float | None
    retries_waiting: int
    dlq: int
    #: Entries finished (acked, dead-lettered or sent to retry) per second; None at first.
    done_per_s: float | None
    #: Counter behind ``done_per_s`` (entries-read - pending), None before Redis 7.
    done_total: int | None
    pending_age_p50_s: float | None
    pending_age_p99_s: float | None
    #: Publish-to-ack latency of the events acked since the last sample, as bucket upper
    #: bounds (see ``Snapshot.latency_note``); None when none were.
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    #: The group's state (``inspect.judge``, over all its topics: the same on each row).
    state: GroupState = "ok"
    #: Pending entries idle past the group's ``stuck_after_s`` (not renewed).
    stuck_pending: int = 0
    longest_idle_s: float | None = None
    #: Dead letters written per second since the previous sample (None at first).
    failed_per_s: float | None = None


#: A schedule's trigger, last and next time: the report's own (one owner of the format).
ScheduleView = ScheduleStatus


class TickerView(msgspec.Struct, kw_only=True):
    leader: str | None
    leader_ttl_ms: int | None
    #: The static table (``App.schedules``).
    schedules: list[ScheduleView]
    #: How many runtime schedules there are (``streamproc.scheduler``).
    runtime_schedules: int = 0


class RenderView(msgspec.Struct, kw_only=True):
    topic: str
    group: str
    consumers: int
    in_flight: int
    waiting: int | None
    done_per_s: float | None
    dlq: int


class Snapshot(msgspec.Struct, kw_only=True):
    prefix: str
    server_time_ms: int
    interval_s: float
    topics: list[TopicView]
    groups: list[GroupView]
    dlq_total: int
    ticker: TickerView | None
    renders: list[RenderView]
    latency_note: str = LATENCY_NOTE
    #: Seconds of acks the latency percentiles cover (up to ``LATENCY_WINDOW_S``).
    latency_window_s: float = 0.0
    #: The application's panels, in ``App.panels`` order.
    panels: list[PanelView] = []
    #: Every group judged against its limits, by name (``inspect.judge``).
    health: list[Health] = []
    #: Redis' memory against maxmemory; None when Redis refused ``INFO memory``.
    redis_memory: RedisMemory | None = None


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class _Counts(msgspec.Struct, kw_only=True):
    """Raw counters of one sample: what rates are computed from."""

    at_ms: int
    added: dict[str, int]
    done: dict[tuple[str, str], int]
    #: group → consumer → cumulative ack-latency bucket counts
    latency: dict[str, dict[str, list[int]]] = {}
    #: (topic, group) → dead letters ever written (the DLQ stream's entries-added)
    failed: dict[tuple[str, str], int] = {}


class _Histogram(msgspec.Struct):
    """One consumer's field; anything else in the hash (huge, negative, junk) is skipped."""

    at: int
    bounds_ms: Annotated[list[float], msgspec.Meta(max_length=64)]
    counts: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=65)]


_decode_histogram = msgspec.json.Decoder(_Histogram).decode


async def _latency_counts(
    client: aioredis.Redis, keys: Keys, groups: set[str], now_ms: int
) -> tuple[dict[str, dict[str, list[int]]], dict[str, list[float]]]:
    """Per group: each live consumer's cumulative histogram, and the buckets' bounds."""
    counts: dict[str, dict[str, list[int]]] = {}
    bounds: dict[str, list[float]] = {}
    for group in sorted(groups):
        rows: dict[Any, Any] = await client.hgetall(keys.latency(group))
        for name, raw in rows.items():
            try:
                h = _decode_histogram(raw)
            except (msgspec.ValidationError, msgspec.DecodeError):
                continue  # not ours: never break the page over it
            if now_ms - h.at > STALE_MS or len(h.counts) != len(h.bounds_ms) + 1:
                continue
            counts.setdefault(group, {})[_text(name)] = h.counts
            bounds[group] = h.bounds_ms
    return counts, bounds


def histogram_percentile(counts: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q``-th percentile (the last bound when it
    is above every bound); None for an empty histogram."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = -(-total * q // 100)
    seen = 0
    for i, n in enumerate(counts):
        seen += n
        if seen >= rank:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


def _latency_window(now: dict[str, list[int]], before: dict[str, list[int]]) -> list[int]:
    """The events acked between two samples, summed over consumers. A consumer seen for the
    first time, or whose counters went down (it restarted), counts with its whole histogram."""
    size = len(next(iter(now.values()), []))
    window = [0] * size
    for name, counts in now.items():
        if len(counts) != size:
            continue  # another engine version's buckets
        prev = before.get(name)
        if (
            prev is None
            or len(prev) != size
            or any(a < b for a, b in zip(counts, prev, strict=True))
        ):
            prev = [0] * size
        window = [w + a - b for w, a, b in zip(window, counts, prev, strict=True)]
    return window


async def _counts(
    client: aioredis.Redis, keys: Keys, report: Report
) -> tuple[dict[str, int], dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    added: dict[str, int] = {}
    done: dict[tuple[str, str], int] = {}
    failed: dict[tuple[str, str], int] = {}
    for t in report.topics:
        for gs in t.groups:
            if gs.dlq:  # a DLQ stream exists (XLEN > 0): its entries-added counts every letter
                try:
                    dlq: dict[str, Any] = await client.xinfo_stream(keys.dlq(t.topic, gs.group))
                except ResponseError:
                    continue
                if dlq.get("entries-added") is not None:
                    failed[(t.topic, gs.group)] = int(dlq["entries-added"])
    for t in report.topics:
        stream = keys.stream(t.topic)
        try:
            info: dict[str, Any] = await client.xinfo_stream(stream)
        except ResponseError:
            continue  # deleted since collect()
        if info.get("entries-added") is not None:
            added[t.topic] = int(info["entries-added"])
        for g in await group_infos(client, stream):
            read = g.entries_read
            if read is None and g.lag is not None and t.topic in added:
                read = added[t.topic] - g.lag  # a group that has not read yet
            if read is not None:
                done[(t.topic, g.name)] = read - g.pending
    return added, done, failed


async def _pending_ages(
    client: aioredis.Redis, keys: Keys, g: GroupStatus, now_ms: int, count: int
) -> list[float]:
    if not g.pending or count <= 0:
        return []
    rows: list[dict[str, Any]] = await client.xpending_range(
        keys.stream(g.topic), g.group, min="-", max="+", count=count
    )
    return [max(0, now_ms - int(_text(r["message_id"]).partition("-")[0])) / 1000 for r in rows]


def _rate(now: int | None, before: int | None, dt_ms: int) -> float | None:
    if now is None or before is None or dt_ms <= 0:
        return None
    return round(max(0, now - before) * 1000 / dt_ms, 2)


def _ticker(report: Report, runtime_schedules: int) -> TickerView | None:
    if report.ticker is None and not report.schedules and not runtime_schedules:
        return None
    leader = report.ticker.leader if report.ticker is not None else None
    ttl = report.ticker.leader_ttl_ms if report.ticker is not None else None
    return TickerView(
        leader=leader,
        leader_ttl_ms=ttl,
        schedules=report.schedules,
        runtime_schedules=runtime_schedules,
    )


async def _ticker_status(client: aioredis.Redis, keys: Keys) -> TickerStatus | None:
    """The ticker's leader and each schedule's last fired time, from the keys the ticker
    writes (``Keys.ticker_lease``, ``Keys.ticker_last``), read by name.

    ``inspect.ticker_status`` finds whatever is under ``<prefix>:ticker:*`` with SCAN, for an
    operator's one-off look; the dashboard reads every second and knows the names.
    """
    lease, last = keys.ticker_lease(), keys.ticker_last()
    async with client.pipeline(transaction=False) as pipe:
        pipe.get(lease)
        pipe.pttl(lease)
        pipe.hgetall(last)
        leader, ttl, fired = await pipe.execute()
    if leader is None and not fired:
        return None
    return TickerStatus(
        leader=None if leader is None else _text(leader),
        leader_ttl_ms=int(ttl) if leader is not None and int(ttl) >= 0 else None,
        schedules={_text(k): {"last": _text(v)} for k, v in fired.items()},
        keys=[],
    )


async def _report(
    client: aioredis.Redis, keys: Keys, schedules: Sequence[Schedule], limits: LimitsOf
) -> Report:
    """What ``inspect.collect`` reports (without memory use and breakers), with no SCAN."""
    now_ms = await server_time_ms(client)
    found = []
    for topic in await registered_topics(client, keys):
        status = await topic_status(client, keys, topic, now_ms, memory=False, limits=limits)
        if status is not None:  # registered, but its stream is gone
            found.append(status)
    ticker = await _ticker_status(client, keys)
    return Report(
        prefix=keys.prefix,
        server_time_ms=now_ms,
        topics=found,
        ticker=ticker,
        schedules=schedule_statuses(ticker, schedules, now_ms),
    )


async def build_snapshot(
    client: aioredis.Redis,
    keys: Keys,
    *,
    previous: _Counts | None = None,
    schedules: Sequence[Schedule] = (),
    render_topics: Sequence[str] = ("renders",),
    pending_sample: int = 200,
    interval_s: float = 1.0,
    panels: PanelReader | None = None,
    limits: LimitsOf = _DEFAULT_LIMITS,
    latency_base: _Counts | None = None,
    memory_alert_ratio: float = 0.8,
) -> tuple[Snapshot, _Counts]:
    """One snapshot, and the counters the next one computes its rates against.

    ``panels``: the application's panels; a panel that fails shows its error, the rest of
    the snapshot is built as usual. ``limits``: each group's (``inspect.limits_of``).
    ``latency_base``: the sample the latency window starts at (``previous`` when None).
    ``memory_alert_ratio``: Redis memory is high at or above it (``RedisSettings``).
    """
    report = await _report(client, keys, schedules, limits)
    runtime_schedules = await Scheduler(client, keys).count()
    now_ms = report.server_time_ms
    added, done, failed = await _counts(client, keys, report)
    group_names = {g.group for t in report.topics for g in t.groups}
    latency, bounds = await _latency_counts(client, keys, group_names, now_ms)
    counts = _Counts(at_ms=now_ms, added=added, done=done, latency=latency, failed=failed)
    base = latency_base or previous
    before_latency = base.latency if base is not None else None
    latency_pcts: dict[str, tuple[float | None, float | None]] = {}
    for group, per_consumer in latency.items():
        if before_latency is None:
            continue
        window = _latency_window(per_consumer, before_latency.get(group, {}))
        latency_pcts[group] = (
            histogram_percentile(window, bounds[group], 50),
            histogram_percentile(window, bounds[group], 99),
        )
    dt_ms = now_ms - previous.at_ms if previous is not None else 0
    before_added = previous.added if previous is not None else {}
    before_done = previous.done if previous is not None else {}
    before_failed = previous.failed if previous is not None else {}
    judged = health(report)
    states = {h.group: h.state for h in judged}
    topics, groups, renders = [], [], []
    for t in report.topics:
        topics.append(
            TopicView(
                topic=t.topic,
                length=t.length,
                last_age_s=t.last_age_s,
                added_per_s=_rate(added.get(t.topic), before_added.get(t.topic), dt_ms),
                groups=len(t.groups),
                unread=t.length > 0 and not t.groups,
            )
        )
        for g in t.groups:
            key = (t.topic, g.group)
            ages = await _pending_ages(client, keys, g, now_ms, pending_sample)
            p50, p99 = percentile(ages, 50), percentile(ages, 99)
            view = GroupView(
                topic=t.topic,
                group=g.group,
                consumers=g.consumers,
                lag=g.lag,
                pending=g.pending,
                backlog=g.backlog,
                oldest_pending_age_s=g.oldest_pending_age_s,
                retries_waiting=g.retries_waiting,
                dlq=g.dlq,
                done_per_s=_rate(done.get(key), before_done.get(key), dt_ms),
                done_total=done.get(key),
                pending_age_p50_s=None if p50 is None else round(p50, 3),
                pending_age_p99_s=None if p99 is None else round(p99, 3),
                latency_p50_ms=latency_pcts.get(g.group, (None, None))[0],
                latency_p99_ms=latency_pcts.get(g.group, (None, None))[1],
                state=states.get(g.group, "ok"),
                stuck_pending=g.stuck_pending,
                longest_idle_s=g.longest_idle_s,
                failed_per_s=_rate(failed.get(key, 0), before_failed.get(key, 0), dt_ms)
                if previous is not None
                else None,
            )
            groups.append(view)
            if t.topic in render_topics:
                renders.append(
                    RenderView(
                        topic=t.topic,
                        group=g.group,
                        consumers=g.consumers,
                        in_flight=g.pending,
                        waiting=g.lag,
                        done_per_s=view.done_per_s,
                        dlq=g.dlq,
                    )
                )
    snapshot = Snapshot(
        prefix=keys.prefix,
        server_time_ms=now_ms,
        interval_s=interval_s,
        topics=topics,
        groups=groups,
        dlq_total=sum(g.dlq for g in groups),
        ticker=_ticker(report, runtime_schedules),
        renders=renders,
        latency_window_s=round((now_ms - base.at_ms) / 1000, 1) if base is not None else 0.0,
        panels=await panels.read(client, keys) if panels is not None else [],
        health=judged,
        redis_memory=await _memory(client, memory_alert_ratio),
    )
    return snapshot, counts


async def _memory(client: aioredis.Redis, alert_ratio: float) -> RedisMemory | None:
    """Redis' memory, or None where ``INFO`` is refused (NOPERM): not an outage."""
    try:
        return await redis_memory(client, alert_ratio)
    except ResponseError:
        return None


class Sampler:
    """Builds snapshots at most once per ``interval_s`` and keeps the counters between them."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        interval_s: float = 1.0,
        schedules: Sequence[Schedule] = (),
        render_topics: Sequence[str] = ("renders",),
        panels: PanelReader | None = None,
        limits: LimitsOf = _DEFAULT_LIMITS,
        memory_alert_ratio: float = 0.8,
    ) -> None:
        self.client, self.keys, self.interval_s = client, keys, interval_s
        self.schedules, self.render_topics = tuple(schedules), tuple(render_topics)
        self.panels, self.limits = panels, limits
        self.memory_alert_ratio = memory_alert_ratio
        self._counts: _Counts | None = None
        #: Earlier samples' counters, the oldest within ``LATENCY_WINDOW_S`` first.
        self._window: deque[_Counts] = deque()
        self._last: Snapshot | None = None
        self._encoded = b""
        self._at = 0.0  # monotonic time of the last build
        self._lock = asyncio.Lock()

    async def snapshot(self) -> Snapshot:
        """The latest snapshot, rebuilt when older than ~``interval_s``."""
        return (await self._refresh())[0]

    async def encoded(self) -> bytes:
        """The latest snapshot as JSON (encoded once for every viewer)."""
        return (await self._refresh())[1]

    async def _refresh(self) -> tuple[Snapshot, bytes]:
        async with self._lock:
            last = self._last
            if last is None or time.monotonic() - self._at >= self.interval_s * 0.9:
                last, self._counts = await build_snapshot(
                    self.client,
                    self.keys,
                    previous=self._counts,
                    schedules=self.schedules,
                    render_topics=self.render_topics,
                    interval_s=self.interval_s,
                    panels=self.panels,
                    limits=self.limits,
                    latency_base=self._window[0] if self._window else None,
                    memory_alert_ratio=self.memory_alert_ratio,
                )
                self._window.append(self._counts)
                while self._counts.at_ms - self._window[0].at_ms > LATENCY_WINDOW_S * 1000:
                    self._window.popleft()
                self._last, self._encoded = last, msgspec.json.encode(last)
                self._at = time.monotonic()
            return last, self._encoded
