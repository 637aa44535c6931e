"""Prometheus metrics (prometheus-client): named by Prometheus conventions.

Consumers count in plain integers (``ConsumerStats``), off the metrics library, so the hot
path pays nothing; ``ConsumerCollector`` turns those counters into Prometheus samples when
scraped, with the groups' lag, pending and DLQ sizes read by XINFO GROUPS and cached for
``cache_s`` (``await refresh()`` before a scrape; the HTTP server in ``streamproc.health``
does). The event-loop lag histogram is ``streamproc.offload.LOOP_LAG`` (one sampler per
process, started by the HTTP server).

| metric | type | labels |
|---|---|---|
| ``streamproc_events_consumed_total`` | counter | group, consumer |
| ``streamproc_events_acked_total`` | counter | group, consumer |
| ``streamproc_events_retried_total`` | counter | group, consumer |
| ``streamproc_events_dead_lettered_total`` | counter | group, consumer |
| ``streamproc_events_deduplicated_total`` | counter | group, consumer |
| ``streamproc_events_reclaimed_total`` | counter | group, consumer |
| ``streamproc_events_skipped_total`` | counter | group, consumer (no handler for the type) |
| ``streamproc_events_empty_total`` | counter | group, consumer (payload trimmed) |
| ``streamproc_events_settle_refused_total`` | counter | group, consumer (entry no longer pending) |
| ``streamproc_events_already_scheduled_total`` | counter | group, consumer (written before) |
| ``streamproc_events_effect_errors_total`` | counter | group, consumer (effects refused) |
| ``streamproc_events_taken_over_total`` | counter | group, consumer (held entry now another's) |
| ``streamproc_consumer_in_flight`` | gauge | group, consumer |
| ``streamproc_event_ack_latency_seconds`` | histogram | group, consumer (XADD to ack) |
| ``streamproc_consumer_ready`` | gauge | group, consumer (1: Redis reachable, groups exist) |
| ``streamproc_group_lag`` | gauge | topic, group (entries not yet delivered) |
| ``streamproc_group_pending`` | gauge | topic, group (delivered, not acked) |
| ``streamproc_group_oldest_pending_age_seconds`` | gauge | topic, group |
| ``streamproc_group_retries_waiting`` | gauge | topic, group |
| ``streamproc_group_dead_letters`` | gauge | topic, group (DLQ length) |
| ``streamproc_group_stats_age_seconds`` | gauge | (age of the cached XINFO figures) |
| ``streamproc_event_loop_lag_seconds`` | histogram | |
| ``streamproc_trim_cut_unacked_entries_total`` | counter | stream |
| ``streamproc_redis_used_memory_bytes`` | gauge | (``INFO memory`` used_memory; ingest only) |
| ``streamproc_redis_maxmemory_bytes`` | gauge | (0: maxmemory not set; ingest only) |
| ``streamproc_redis_memory_used_ratio`` | gauge | (used / maxmemory; absent when not set) |
| ``streamproc_redis_memory_alert_ratio`` | gauge | (the ratio that is high) |
| ``streamproc_redis_memory_high`` | gauge | (1 from ``redis_memory_high`` to recovery) |
| ``streamproc_redis_memory_samples_total`` | counter | (INFO memory reads that answered) |

Redis' memory is sampled by the ingest only (``RedisMemoryMonitor``, every
``RedisSettings.memory_sample_s``): the one role that ``streamproc up`` and compose always run
with a ``/metrics``, and the door attacker-chosen data comes in by. One ``INFO memory`` per
ingest process every 5 s; other roles' ``/metrics`` do not carry these gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog
from prometheus_client import REGISTRY, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from redis.exceptions import ResponseError

from streamproc.connection import REDIS_DOWN
from streamproc.consumer import LATENCY_BUCKETS_S
from streamproc.groups import group_info
from streamproc.keys import Keys

if TYPE_CHECKING:
    from streamproc.consumer import Consumer
    from streamproc.inspect import GroupStatus, RedisMemory

__all__ = ("RECOVER_MARGIN", "TRIM_CUT_UNACKED", "ConsumerCollector", "RedisMemoryMonitor")

log = structlog.get_logger("streamproc.metrics")

#: Errors that leave the cached group figures in place (their age shows they are stale).
_REFRESH_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, ResponseError)

TRIM_CUT_UNACKED = Counter(
    "streamproc_trim_cut_unacked_entries",
    "Entries a group had not acked that the hard length cap deleted",
    ["stream"],
)

#: ConsumerStats field -> (metric name without _total, help)
_COUNTERS = (
    ("read", "streamproc_events_consumed", "Entries read by the consumer (new and reclaimed)"),
    ("acked", "streamproc_events_acked", "Events handled successfully and acked"),
    ("retried", "streamproc_events_retried", "Events scheduled for a retry"),
    ("dead_lettered", "streamproc_events_dead_lettered", "Events sent to the DLQ"),
    (
        "redeliver",
        "streamproc_events_settle_redeliver",
        "Settles of entries the group will deliver again (recreated or moved back)",
    ),
    ("reclaimed", "streamproc_events_reclaimed", "Entries claimed from a stalled consumer"),
    ("skipped", "streamproc_events_skipped", "Entries of types the group has no handler for"),
    ("empty", "streamproc_events_empty", "Entries whose payload was trimmed before reading"),
    (
        "refused",
        "streamproc_events_settle_refused",
        "Settles that found the entry no longer pending (another settle applied it)",
    ),
    (
        "already_scheduled",
        "streamproc_events_already_scheduled",
        "Failures whose retry or dead letter a copy of the same settle had written",
    ),
    ("effect_errors", "streamproc_events_effect_errors", "Events whose effects Redis refused"),
    ("lost", "streamproc_events_taken_over", "Held entries a renewal found owned by another"),
)

_GROUP_GAUGES = (
    ("lag", "streamproc_group_lag", "Entries not yet delivered to the group"),
    ("pending", "streamproc_group_pending", "Entries delivered to the group and not acked"),
    (
        "oldest_pending_age_s",
        "streamproc_group_oldest_pending_age_seconds",
        "Age of the group's oldest unacked delivered entry",
    ),
    ("retries_waiting", "streamproc_group_retries_waiting", "Retries waiting for their time"),
    ("dlq", "streamproc_group_dead_letters", "Entries in the group's dead-letter stream"),
)


class ConsumerCollector:
    """Samples of the consumers of this process and of their groups (cached XINFO)."""

    def __init__(
        self,
        consumers: Sequence[Consumer],
        client: aioredis.Redis,
        keys: Keys,
        *,
        cache_s: float = 2.0,
    ) -> None:
        self.consumers, self.client, self.keys, self.cache_s = consumers, client, keys, cache_s
        self._groups: list[GroupStatus] = []
        self._read_at: float | None = None  # monotonic time of the last XINFO read
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        """Read the groups' figures from Redis unless the cached ones are fresh enough."""
        async with self._lock:
            if self._read_at is not None and time.monotonic() - self._read_at < self.cache_s:
                return
            from streamproc.inspect import group_status, server_time_ms

            try:
                now_ms = await server_time_ms(self.client)
                out = []
                for group, topics in sorted({(c.group, c.concern.topics) for c in self.consumers}):
                    for topic in topics:
                        info = await group_info(self.client, self.keys.stream(topic), group)
                        if info is not None:  # None: stream or group not there yet
                            out.append(
                                await group_status(self.client, self.keys, topic, info, now_ms)
                            )
            except _REFRESH_FAILED as e:
                log.warning("metrics_refresh_failed", error=str(e))
                return  # keep the last figures; their age shows they are stale
            self._groups, self._read_at = out, time.monotonic()

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        return list(self._families())

    def _families(self) -> Iterable[Metric]:
        labels = ["group", "consumer"]
        for field, name, doc in _COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for c in self.consumers:
                fam.add_metric([c.group, c.name], getattr(c.stats, field))
            yield fam
        in_flight = GaugeMetricFamily(
            "streamproc_consumer_in_flight", "Events read and not yet settled", labels=labels
        )
        ready = GaugeMetricFamily(
            "streamproc_consumer_ready", "1 when Redis is reachable and groups exist", labels=labels
        )
        for c in self.consumers:
            # The consumer keeps this count privately (consumer.py is the lead's); read-only.
            in_flight.add_metric([c.group, c.name], c.in_flight)
            ready.add_metric([c.group, c.name], 1.0 if c.ready else 0.0)
        yield in_flight
        yield ready
        latency = HistogramMetricFamily(
            "streamproc_event_ack_latency_seconds",
            "Time from XADD (the entry id's time) to the ack, for acked events",
            labels=labels,
        )
        for c in self.consumers:
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*(str(b) for b in LATENCY_BUCKETS_S), "+Inf"), c.stats.latency_counts, strict=True
            ):
                cumulative += count
                buckets.append((bound, cumulative))
            latency.add_metric([c.group, c.name], buckets, c.stats.latency_sum_s)
        yield latency
        for field, name, doc in _GROUP_GAUGES:
            gauge = GaugeMetricFamily(name, doc, labels=["topic", "group"])
            for g in self._groups:
                value = getattr(g, field)
                if value is not None:
                    gauge.add_metric([g.topic, g.group], float(value))
            yield gauge
        age = GaugeMetricFamily(
            "streamproc_group_stats_age_seconds", "Age of the cached group figures (XINFO)"
        )
        if self._read_at is not None:
            age.add_metric([], time.monotonic() - self._read_at)
        yield age


#: An episode of high memory ends when the ratio falls this far below the alert ratio, so a
#: Redis hovering at the threshold logs one episode, not one per sample.
RECOVER_MARGIN = 0.05


class RedisMemoryMonitor:
    """Redis' ``used_memory`` against ``maxmemory``, every ``interval_s``: gauges on
    ``/metrics`` and one ``redis_memory_high`` warning per episode.

    An episode starts at the first sample at or above ``alert_ratio`` (warning
    ``redis_memory_high``) and ends at the first below ``alert_ratio - RECOVER_MARGIN`` (info
    ``redis_memory_recovered``); samples in between log nothing. ``maxmemory`` 0 (not set)
    has no ratio and is never high. A failed read keeps the last figures (logged at debug:
    the role's own Redis errors are logged where they happen).

    ``start()`` registers the gauges (one collector per process, whatever the number of
    monitors: the latest sample of any running one) and starts sampling; ``close()`` stops.
    """

    def __init__(
        self, client: aioredis.Redis, *, alert_ratio: float = 0.8, interval_s: float = 5.0
    ) -> None:
        self.client, self.alert_ratio, self.interval_s = client, alert_ratio, interval_s
        self.memory: RedisMemory | None = None
        #: True from a ``redis_memory_high`` warning to its recovery.
        self.high = False
        #: Reads that answered (a scrape tells a stale figure by this not moving).
        self.samples = 0
        self._task: asyncio.Task[None] | None = None

    async def sample(self) -> RedisMemory | None:
        """Read ``INFO memory`` once, update the figures and log a crossing; None on failure."""
        from streamproc.inspect import redis_memory

        try:
            mem = await redis_memory(self.client, self.alert_ratio)
        except _REFRESH_FAILED as e:
            log.debug("redis_memory_read_failed", error=str(e))
            return None
        self.memory, self.samples = mem, self.samples + 1
        _MEMORY.latest = self
        ratio = mem.ratio
        fields = {
            "used_bytes": mem.used_bytes,
            "maxmemory_bytes": mem.maxmemory_bytes,
            "ratio": ratio,
            "alert_ratio": self.alert_ratio,
        }
        if not self.high and mem.high:
            self.high = True
            log.warning("redis_memory_high", policy=mem.policy, **fields)
        elif self.high and (ratio is None or ratio < self.alert_ratio - RECOVER_MARGIN):
            self.high = False
            log.info("redis_memory_recovered", **fields)
        return mem

    async def run(self) -> None:
        """Sample every ``interval_s`` until cancelled."""
        while True:
            await self.sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> RedisMemoryMonitor:
        _MEMORY.register()
        self._task = asyncio.create_task(self.run(), name="redis-memory-monitor")
        return self

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if _MEMORY.latest is self:
            _MEMORY.latest = None


class _MemoryCollector:
    """The gauges of the latest ``RedisMemoryMonitor`` sample; none while no monitor ran."""

    def __init__(self) -> None:
        self.latest: RedisMemoryMonitor | None = None
        self._registered = False

    def register(self) -> None:
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def describe(self) -> Iterable[Metric]:
        return []  # samples only once a monitor has read: no names claimed before

    def collect(self) -> Iterable[Metric]:
        monitor = self.latest
        mem = monitor.memory if monitor is not None else None
        if monitor is None or mem is None:
            return []
        gauges = [
            (
                "streamproc_redis_used_memory_bytes",
                "Redis used_memory (INFO memory)",
                mem.used_bytes,
            ),
            (
                "streamproc_redis_maxmemory_bytes",
                "Redis maxmemory; 0: not set",
                mem.maxmemory_bytes,
            ),
            (
                "streamproc_redis_memory_alert_ratio",
                "used/maxmemory at or above which Redis memory is high",
                monitor.alert_ratio,
            ),
            (
                "streamproc_redis_memory_high",
                "1 from a redis_memory_high warning to its recovery",
                1.0 if monitor.high else 0.0,
            ),
        ]
        if mem.ratio is not None:
            gauges.append(
                ("streamproc_redis_memory_used_ratio", "Redis used_memory / maxmemory", mem.ratio)
            )
        samples = CounterMetricFamily(
            "streamproc_redis_memory_samples", "INFO memory reads that answered"
        )
        samples.add_metric([], monitor.samples)
        return [*(GaugeMetricFamily(name, doc, value=float(v)) for name, doc, v in gauges), samples]


_MEMORY = _MemoryCollector()
