"""The cluster-event processor (WORKLOADS.md §1) on a real Redis, through the real runtime."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from consumers import cluster_events
from consumers.cluster_events import classify_pending, recommend_memory_limit
from schemas import (
    NodeNotReady,
    Notification,
    OOMKilled,
    PodPending,
    PodPendingClassified,
    RightSizingRecommendation,
)
from schemas.metrics import (
    DAILY_TTL_S,
    cluster_daily_key,
    daily_key,
    day_of,
    pool_interruptions_key,
)
from schemas.risky_pools import REPORTS_KEPT_S
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.event import derived_id
from tests.helpers import entries, spot

MIB = 1 << 20


@pytest.fixture
def processor(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> Consumer:
    return Consumer(
        cluster_events.CONCERN,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="t"),
    )


async def run_all(consumer: Consumer) -> None:
    await consumer.ensure_groups()
    while await consumer.process_once():
        pass


async def emitted(client: aioredis.Redis, keys: Keys, codec: Codec[Any]) -> list[Any]:
    return [codec.decode(f) for _, f in await entries(client, keys.stream("notify"))]


async def test_spot_interruption_flags_the_pool_and_notifies_once(
    processor: Consumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    """One cluster's interruption makes the pool risky for that cluster (its report); the
    flag for every cluster waits for a second cluster and source (schemas.risky_pools)."""
    event = spot(1, node_name="ip-10-0-0-1")
    await producer.publish(event)
    await run_all(processor)
    pool = keys.state("risky-pool", "m5.large", "eu-west-1a")
    reports = keys.state("risky-pool-reports", "m5.large", "eu-west-1a")
    assert await client.get(pool) is None
    assert await client.zrange(reports, 0, -1) == [b'["","c1"]']
    assert 0 < await client.ttl(reports) <= REPORTS_KEPT_S
    [note] = await emitted(client, keys, codec)
    assert isinstance(note, Notification)
    assert note.id == derived_id(event.id, "notify")
    assert note.cause_id == event.id
    assert note.severity == "warning"
    assert "risky for this cluster" in note.body
    # the same interruption reported again (agent retry): no second notification
    await client.xadd(keys.stream("cluster"), codec.encode(event))  # type: ignore[arg-type]
    await run_all(processor)
    assert len(await emitted(client, keys, codec)) == 1


async def test_interruptions_and_oom_kills_are_counted_on_their_day_once(
    processor: Consumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    """The weekly report's ``spot_interruptions`` and ``oom_kills``, all clusters and per
    cluster, on the UTC day the event occurred; and the pool's interruptions for the
    optimizer's risk score. A redelivered event counts once."""
    earlier = datetime(2025, 6, 15, 23, 59, 59, tzinfo=UTC)  # not today
    first = msgspec.structs.replace(spot(1), occurred_at=earlier)
    await producer.publish(first)
    await producer.publish(spot(2))
    await producer.publish(
        OOMKilled(
            cluster_id="c2",
            namespace="ns",
            pod="p",
            container="c",
            memory_limit_bytes=MIB,
            occurred_at=earlier,
        )
    )
    await run_all(processor)
    await client.xadd(keys.stream("cluster"), codec.encode(first))  # type: ignore[arg-type]
    await run_all(processor)
    day = daily_key(keys, "2025-06-15")
    assert await client.hgetall(day) == {b"spot_interruptions": b"1", b"oom_kills": b"1"}
    assert await client.hgetall(cluster_daily_key(keys, "c1", "2025-06-15")) == {
        b"spot_interruptions": b"1"
    }
    assert await client.hgetall(cluster_daily_key(keys, "c2", "2025-06-15")) == {b"oom_kills": b"1"}
    today = day_of(datetime.now(UTC))
    assert await client.hget(daily_key(keys, today), "spot_interruptions") == b"1"
    assert await client.hgetall(pool_interruptions_key(keys, "2025-06-15")) == {
        b"m5.large/eu-west-1a": b"1"
    }
    assert 0 < await client.ttl(day) <= DAILY_TTL_S


async def test_node_not_ready_after_an_interruption_is_explained_by_it(
    processor: Consumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    await producer.publish(spot(1, node_name="n-1"))
    await run_all(processor)  # the mark exists once the interruption is settled
    await producer.publish(NodeNotReady(cluster_id="c1", node_name="n-1"))
    await producer.publish(NodeNotReady(cluster_id="c1", node_name="n-2", reason="kubelet"))
    await run_all(processor)
    for node, category in (("n-1", b"interruption"), ("n-2", b"unexpected")):
        key = cluster_events.not_ready_key(keys, "cluster", "c1", node)
        assert await client.get(key) == category
        assert 0 < await client.ttl(key) <= 3600  # input from agents never makes a lasting key
    notes = await emitted(client, keys, codec)
    critical = [n for n in notes if n.severity == "critical"]
    assert [n.title for n in critical] == ["Node n-2 not ready"]


async def test_oom_killed_emits_a_right_sizing_recommendation(
    processor: Consumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    event = OOMKilled(
        cluster_id="c1",
        namespace="shop",
        pod="api-7d9",
        container="api",
        workload="api",
        memory_limit_bytes=512 * MIB,
        memory_peak_bytes=600 * MIB,
    )
    await producer.publish(event)
    await run_all(processor)
    [rec] = await emitted(client, keys, codec)
    assert isinstance(rec, RightSizingRecommendation)
    assert rec.recommended_limit_bytes == 900 * MIB
    assert rec.workload == "api"


async def test_pod_pending_is_classified(
    processor: Consumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    await producer.publish(
        PodPending(
            cluster_id="c1",
            namespace="ml",
            pod="train-0",
            message="0/5 nodes are available: 5 Insufficient nvidia.com/gpu.",
        )
    )
    await run_all(processor)
    [out] = await emitted(client, keys, codec)
    assert isinstance(out, PodPendingClassified)
    assert out.category == "insufficient_gpu"


@pytest.mark.parametrize(
    ("limit", "peak", "restarts", "expected"),
    [
        (512 * MIB, 0, 0, 768 * MIB),  # 1.5x
        (100 * MIB, 0, 0, 164 * MIB),  # at least +64 MiB
        (512 * MIB, 600 * MIB, 0, 900 * MIB),  # from the observed peak
        (512 * MIB, 0, 3, 1024 * MIB),  # 2x once it keeps dying
        (1000, 0, 0, 65 * MIB),  # rounded up to a whole MiB
    ],
)
def test_recommended_memory_limit(limit: int, peak: int, restarts: int, expected: int) -> None:
    assert recommend_memory_limit(limit, peak, restarts) == expected


@pytest.mark.parametrize(
    ("message", "category"),
    [
        ("0/3 nodes are available: 3 Insufficient cpu.", "insufficient_cpu"),
        ("0/3 nodes are available: 1 Insufficient memory, 2 Insufficient cpu.", "insufficient_cpu"),
        ("0/3 nodes are available: 3 Insufficient memory.", "insufficient_memory"),
        ("0/2 nodes are available: 2 node(s) had untolerated taint {gpu: true}.", "taints"),
        (
            "0/4 nodes are available: 4 node(s) didn't match Pod's node affinity/selector.",
            "node_selector",
        ),
        ('persistentvolumeclaim "data" not found', "volume"),
        ("", "unknown"),
    ],
)
def test_pending_reasons(message: str, category: str) -> None:
    assert classify_pending(message) == category
