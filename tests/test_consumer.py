"""The consumer runtime against a real Redis: delivery, order, restart, shutdown, bad entries."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import NodeNotReady, SpotInterruption
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Producer,
)
from tests.helpers import MakeConsumer, entries, pending, spot


async def test_published_events_are_handled_in_order_and_acked(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    consumer = make_consumer({SpotInterruption: handle}, concurrency=1)
    await consumer.ensure_groups()
    events = [spot(i) for i in range(250)]
    await producer.publish_many(events)
    while await consumer.process_once():
        pass
    assert seen == [e.id for e in events]
    assert await pending(client, keys) == 0
    assert consumer.stats.acked == 250


async def test_types_without_a_handler_are_acked_unread(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    await producer.publish(NodeNotReady(cluster_id="c1", node_name="n1"))
    await consumer.process_once()
    assert consumer.stats.skipped == 1
    assert await pending(client, keys) == 0


async def test_after_a_restart_own_pending_entries_are_delivered_first(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """A consumer that died after reading leaves entries pending; its successor (same name)
    re-reads them before anything new, with the delivery count raised."""
    await client.xgroup_create(keys.stream("cluster"), "g", id="0", mkstream=True)
    old = [spot(i) for i in range(3)]
    await producer.publish_many(old)
    await client.xreadgroup("g", "c1", {keys.stream("cluster"): ">"}, count=10)  # then "dies"
    new = [spot(i) for i in range(3, 5)]
    await producer.publish_many(new)

    seen: list[tuple[str, int]] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append((event.id, ctx.deliveries))

    consumer = make_consumer({SpotInterruption: handle}, concurrency=1)
    while await consumer.process_once():
        pass
    assert [s[0] for s in seen] == [e.id for e in old + new]
    assert [s[1] for s in seen] == [2, 2, 2, 1, 1]
    assert await pending(client, keys) == 0


async def test_graceful_stop_finishes_in_flight_work_and_acks_it(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    done: list[str] = []

    async def slow(event: SpotInterruption, ctx: Context) -> None:
        started.set()
        await release.wait()
        done.append(event.id)

    consumer = make_consumer({SpotInterruption: slow}, concurrency=8, block_ms=100)
    running = asyncio.create_task(consumer.run())
    await producer.publish_many([spot(i) for i in range(8)])
    await started.wait()
    consumer.stop()
    await asyncio.sleep(0.05)
    release.set()
    await running
    assert len(done) == 8
    assert await pending(client, keys) == 0


async def test_a_handler_that_swallows_the_cancellation_does_not_hang_shutdown(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """After the grace period the run's tasks are cancelled, and cancelled again if one
    swallowed it (as asyncio.wait_for did on 3.11 in the retry loop): run() returns."""
    started = asyncio.Event()
    swallowed: list[bool] = []

    async def stubborn(event: SpotInterruption, ctx: Context) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.append(True)  # and wait on, as if nothing happened
            await asyncio.Event().wait()

    consumer = make_consumer({SpotInterruption: stubborn}, block_ms=100, grace_s=0.1)
    running = asyncio.create_task(consumer.run())
    await producer.publish(spot(1))
    await started.wait()
    consumer.stop()
    await asyncio.wait_for(running, 30)  # before: waited for the handler forever
    assert swallowed == [True]
    assert await pending(client, keys) == 1  # cut off: it stays pending for a redelivery


async def test_work_cut_off_by_the_grace_period_stays_pending_not_failed(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """Cancellation at shutdown is neither a failure nor a retry: the entry stays pending."""
    started = asyncio.Event()

    async def stuck(event: SpotInterruption, ctx: Context) -> None:
        started.set()
        await asyncio.Event().wait()

    consumer = make_consumer({SpotInterruption: stuck}, grace_s=0.2, block_ms=100)
    running = asyncio.create_task(consumer.run())
    await producer.publish(spot(1))
    await started.wait()
    consumer.stop()
    await running
    assert consumer.stats.retried == consumer.stats.dead_lettered == 0
    assert await pending(client, keys) == 1
    assert await client.zcard(keys.delayed("cluster", "g")) == 0


async def test_in_flight_is_bounded(make_consumer: MakeConsumer, producer: Producer) -> None:
    gate = asyncio.Event()
    running_now: list[int] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        running_now.append(1)
        await gate.wait()

    consumer = make_consumer(
        {SpotInterruption: handle}, concurrency=50, max_in_flight=7, block_ms=50
    )
    task = asyncio.create_task(consumer.run())
    await producer.publish_many([spot(i) for i in range(40)])
    for _ in range(100):
        await asyncio.sleep(0.01)
        if len(running_now) >= 7:
            break
    await asyncio.sleep(0.2)
    assert len(running_now) == 7  # never more than max_in_flight read and unsettled
    gate.set()
    for _ in range(300):
        if consumer.stats.acked == 40:
            break
        await asyncio.sleep(0.01)
    consumer.stop()
    await task
    assert consumer.stats.acked == 40


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"type": "cluster.spot_interruption"}, "missing_field"),
        ({"type": "cluster.spot_interruption", "data": "{oops"}, "bad_json"),
        ({"type": "cluster.spot_interruption", "data": '{"cluster_id": 1}'}, "invalid"),
        ({"type": "cluster.no_such_thing", "data": "{}"}, "unknown_type"),
        ({"garbage": "\x00\xff"}, "missing_field"),
    ],
)
async def test_broken_entries_written_by_hand_are_dead_lettered_and_do_not_block(
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    fields: dict[str, str],
    reason: str,
) -> None:
    handled: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        handled.append(event.id)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    await client.xadd(keys.stream("cluster"), fields)  # type: ignore[arg-type]
    good = spot(1)
    await producer.publish(good)
    while await consumer.process_once():
        pass
    assert handled == [good.id]
    dead = await entries(client, keys.dlq("cluster", "g"))
    assert len(dead) == 1
    assert dead[0][1][b"dlq_reason"] == reason.encode()
    for k, v in fields.items():  # the original fields are kept verbatim
        assert dead[0][1][k.encode()] == v.encode()
    assert await pending(client, keys) == 0


async def test_group_that_vanished_is_recreated(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """FLUSHALL or a restart without persistence: reads answer NOGROUP; recreate and go on."""
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    consumer = make_consumer({SpotInterruption: handle}, block_ms=50)
    task = asyncio.create_task(consumer.run())
    await producer.publish(spot(1))
    for _ in range(200):
        if seen:
            break
        await asyncio.sleep(0.01)
    await client.delete(keys.stream("cluster"), keys.retry_stream("cluster", "g"))
    for _ in range(500):  # the consumer recreates stream and group (MKSTREAM)
        groups = (
            await client.xinfo_groups(keys.stream("cluster"))
            if await client.exists(keys.stream("cluster"))
            else []
        )
        if groups:
            break
        await asyncio.sleep(0.01)
    later = spot(2)
    await producer.publish(later)
    for _ in range(500):
        if later.id in seen:
            break
        await asyncio.sleep(0.01)
    consumer.stop()
    await task
    assert seen[-1] == later.id
    assert consumer.ready


async def test_a_stream_deleted_under_a_settle_is_a_vanished_group_not_a_crash(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """The stream goes (deleted, FLUSHALL) while a handler runs: its settle's XACK answers 0
    and the check whether the group was recreated (XINFO GROUPS) met a missing key, an error
    the consumer crashed on (the script ran in a pipeline, so the guard did not see 'no such
    key'). Now the settle treats it as a recreated group (nothing applied, the entry went with
    the stream), the reader recreates stream and group, and the next event is handled."""
    seen: list[str] = []
    effects = keys.state("deleted-under")

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.instance_id)
        if event.instance_id == "i-1":
            await client.delete(keys.stream("cluster"), keys.retry_stream("cluster", "g"))
        ctx.effect("HINCRBY", effects, event.instance_id, 1)

    consumer = make_consumer({SpotInterruption: handle}, block_ms=50)
    task = asyncio.create_task(consumer.run())
    try:
        await producer.publish(spot(1))
        for _ in range(500):
            if "i-1" in seen and await client.exists(keys.stream("cluster")):
                groups: Any = await client.xinfo_groups(keys.stream("cluster"))
                if groups:
                    break
            await asyncio.sleep(0.01)
        await producer.publish(spot(2))
        for _ in range(500):
            if "i-2" in seen or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done(), task.exception()  # the consumer did not crash
        assert seen == ["i-1", "i-2"]
        for _ in range(500):
            if await client.hget(effects, "i-2"):
                break
            await asyncio.sleep(0.01)
        assert await client.hgetall(effects) == {b"i-2": b"1"}  # i-1 went with its stream
    finally:
        consumer.stop()
        await task


async def test_stop_while_redis_is_down_returns_after_the_grace_period(
    tmp_path: Path, keys: Keys, codec: Codec[Any]
) -> None:
    """A reader retrying a vanished Redis must not keep a stopping consumer alive."""
    from streamproc import RedisSettings, connect
    from streamproc.embedded import EmbeddedRedis

    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    client = connect(RedisSettings(url=server.url, socket_timeout_s=5, connect_timeout_s=0.5))

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: handle}),
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(consumer="c1", block_ms=3000, grace_s=0.5),
    )
    started = asyncio.Event()
    running = asyncio.create_task(consumer.run(started=started))
    await started.wait()
    await asyncio.sleep(0.3)  # the reader is blocked in XREADGROUP now
    consumer.stop()  # stop is waiting for that read to return...
    await asyncio.sleep(0.1)
    server.stop(kill=True)  # ...which fails: Redis is gone
    await asyncio.wait_for(running, 30)  # returns instead of retrying forever
    assert not consumer.ready
    await client.aclose()
