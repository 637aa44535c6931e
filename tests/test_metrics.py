"""Consumer metrics: ConsumerStats and the groups' XINFO figures as Prometheus samples."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, generate_latest

from consumers import CONCERNS
from schemas.cluster import SpotInterruption
from streamproc import Codec, Consumer, ConsumerSettings, ConsumerStats, Keys, Producer
from streamproc.metrics import ConsumerCollector


def sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in the exposition text (None when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{want}}}" if want else name):
            return float(value)
    return None


async def test_collector_exports_consumer_counters_and_group_figures(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    consumer = Consumer(
        CONCERNS["cluster-events"],
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="m1"),
    )
    await consumer.ensure_groups()
    for n in range(2):
        await producer.publish(
            SpotInterruption(
                cluster_id="c", instance_id=f"i-{n}", instance_type="t", availability_zone="a"
            )
        )
    await client.xadd(keys.dlq("cluster", "cluster-events"), {"type": "x"})
    registry = CollectorRegistry()
    collector = ConsumerCollector([consumer], client, keys, cache_s=0)
    registry.register(collector)

    await collector.refresh()
    before = generate_latest(registry).decode()
    assert sample(before, "streamproc_group_lag", topic="cluster", group="cluster-events") == 2
    assert sample(before, "streamproc_group_dead_letters", topic="cluster", group="cluster-events")

    assert await consumer.process_once() == 2
    await collector.refresh()
    after = generate_latest(registry).decode()
    labels = {"group": "cluster-events", "consumer": "m1"}
    assert sample(after, "streamproc_events_consumed_total", **labels) == 2
    assert sample(after, "streamproc_events_acked_total", **labels) == 2
    assert sample(after, "streamproc_events_dead_lettered_total", **labels) == 0
    assert sample(after, "streamproc_consumer_in_flight", **labels) == 0
    assert sample(after, "streamproc_group_lag", topic="cluster", group="cluster-events") == 0
    assert sample(after, "streamproc_group_pending", topic="cluster", group="cluster-events") == 0
    assert "# TYPE streamproc_events_acked_total counter" in after
    assert "# TYPE streamproc_event_ack_latency_seconds histogram" in after
    assert sample(after, "streamproc_event_ack_latency_seconds_count", **labels) == 2
    inf = {**labels, "le": "+Inf"}
    assert sample(after, "streamproc_event_ack_latency_seconds_bucket", **inf) == 2


async def test_group_figures_are_cached_between_scrapes(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    consumer = Consumer(
        CONCERNS["cluster-events"], client=client, codec=codec, keys=keys, producer=producer
    )
    await consumer.ensure_groups()
    collector = ConsumerCollector([consumer], client, keys, cache_s=3600)
    await collector.refresh()
    await client.xadd(keys.stream("cluster"), {"type": "x"})
    await collector.refresh()  # within cache_s: no new XINFO
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    assert sample(text, "streamproc_group_lag", topic="cluster", group="cluster-events") == 0


@pytest.mark.parametrize(
    ("entry_id", "now_ms", "bucket"),
    [
        (b"1000-0", 1000.0, 0),  # <= 1 ms
        (b"1000-7", 1003.0, 2),  # <= 5 ms
        (b"1000-0", 1000.0 + 59_000, 14),  # <= 60 s
        (b"1000-0", 1000.0 + 3_600_000, 15),  # +Inf
        (b"5000-0", 1000.0, 0),  # a clock behind Redis' counts as 0, never negative
    ],
)
def test_ack_latency_is_taken_from_the_entry_id(
    entry_id: bytes, now_ms: float, bucket: int
) -> None:
    stats = ConsumerStats()
    stats.observe_ack(entry_id, now_ms)
    assert stats.latency_counts.index(1) == bucket
    assert sum(stats.latency_counts) == 1
    assert stats.latency_sum_s >= 0
