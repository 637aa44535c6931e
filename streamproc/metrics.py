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
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter
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
    from streamproc.inspect import GroupStatus

__all__ = ("TRIM_CUT_UNACKED", "ConsumerCollector")

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
