"""Delivery guarantees: retries, dead letters, reclaim, dedup, trimming, backpressure."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import (
    BackpressureError,
    Codec,
    Context,
    Keys,
    Permanent,
    Producer,
    ProducerSettings,
    Retry,
    RetryPolicy,
    dlq,
)
from streamproc.trim import safe_point, trim_stream
from tests.helpers import MakeConsumer, entries, pending, spot

FAST_RETRY = {"retry": RetryPolicy(max_retries=3, base_s=0.01, cap_s=0.02)}


async def drain(consumer: Any, *, rounds: int = 200) -> None:
    """process_once until nothing is read and no retry is waiting."""
    idle = 0
    for _ in range(rounds):
        if await consumer.process_once():
            idle = 0
            continue
        idle += 1
        waiting = await consumer.client.zcard(consumer.keys.delayed("cluster", consumer.group))
        if not waiting and idle > 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("did not drain")


async def test_transient_failures_are_retried_then_succeed(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    attempts: list[int] = []

    async def flaky(event: SpotInterruption, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionResetError("upstream hiccup")

    consumer = make_consumer({SpotInterruption: flaky}, concern=FAST_RETRY)
    await consumer.ensure_groups()
    await producer.publish(spot(1))
    await drain(consumer)
    assert attempts == [0, 1, 2]
    assert consumer.stats.retried == 2
    assert consumer.stats.acked == 1
    assert await client.xlen(keys.dlq("cluster", "g")) == 0
    assert await pending(client, keys) == 0


async def test_exhausted_retries_go_to_the_dlq_with_their_story(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    async def broken(event: SpotInterruption, ctx: Context) -> None:
        raise TimeoutError("AWS did not answer")

    consumer = make_consumer({SpotInterruption: broken}, concern=FAST_RETRY)
    await consumer.ensure_groups()
    event = spot(1)
    await producer.publish(event)
    await drain(consumer)
    [(_, fields)] = await entries(client, keys.dlq("cluster", "g"))
    assert fields[b"dlq_reason"] == b"retries_exhausted"
    assert fields[b"dlq_error_type"] == b"TimeoutError"
    assert fields[b"dlq_error"] == b"AWS did not answer"
    assert fields[b"dlq_attempts"] == b"4"  # the first try and 3 retries
    assert fields[b"dlq_consumer"] == b"c1"
    assert fields[b"id"] == event.id.encode()
    assert consumer.stats.retried == 3


@pytest.mark.parametrize("error", [Permanent("bad config"), KeyError("no such cluster")])
async def test_permanent_failures_are_dead_lettered_at_once(
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    error: Exception,
) -> None:
    calls = 0

    async def fail(event: SpotInterruption, ctx: Context) -> None:
        nonlocal calls
        calls += 1
        raise error

    consumer = make_consumer(
        {SpotInterruption: fail}, concern={**FAST_RETRY, "permanent_errors": (KeyError,)}
    )
    await consumer.ensure_groups()
    await producer.publish(spot(1))
    await drain(consumer)
    assert calls == 1
    [(_, fields)] = await entries(client, keys.dlq("cluster", "g"))
    assert fields[b"dlq_reason"] == b"permanent"
    assert fields[b"dlq_error_type"] == type(error).__name__.encode()


async def test_a_waiting_retry_holds_no_slot_and_blocks_nothing(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    handled: list[str] = []
    first = spot(0)

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        if event.id == first.id:
            raise Retry("not yet", delay_s=3600)
        handled.append(event.id)

    consumer = make_consumer({SpotInterruption: handle}, concurrency=1, max_in_flight=1)
    await consumer.ensure_groups()
    later = [spot(i) for i in range(1, 6)]
    await producer.publish_many([first, *later])
    while await consumer.process_once():
        pass
    assert handled == [e.id for e in later]
    due: Any = await client.zrange(keys.delayed("cluster", "g"), 0, -1, withscores=True)
    [(_member, due_ms)] = due
    assert due_ms > (await client.time())[0] * 1000 + 3000 * 1000  # Retry(delay_s) honoured
    assert await pending(client, keys) == 0


async def test_a_scheduled_retry_survives_a_consumer_restart(
    make_consumer: MakeConsumer, producer: Producer
) -> None:
    calls: list[str] = []

    async def first_life(event: SpotInterruption, ctx: Context) -> None:
        raise Retry("later", delay_s=0.05)

    async def second_life(event: SpotInterruption, ctx: Context) -> None:
        calls.append(ctx.consumer)

    a = make_consumer({SpotInterruption: first_life}, name="a")
    await a.ensure_groups()
    await producer.publish(spot(1))
    await a.process_once()
    assert a.stats.retried == 1
    del a  # state lives in Redis only
    b = make_consumer({SpotInterruption: second_life}, name="b")
    await drain(b)
    assert calls == ["b"]


async def test_a_copy_published_twice_applies_its_effects_once(
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
) -> None:
    """The same event published again, by another producer process, is refused by the
    producer's record of its id: one entry, one run, effects once."""
    runs: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        runs.append(event.id)
        ctx.effect("HINCRBY", keys.state("effects"), event.id, 1)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    event = spot(1)
    first = await producer.publish(event)
    await drain(consumer)
    [again] = await Producer(client, codec, keys).append([event])
    assert again == (first, True)
    await drain(consumer)
    assert runs == [event.id]
    assert await client.hget(keys.state("effects"), event.id) == b"1"
    assert await client.xlen(keys.stream("cluster")) == 1
    assert await pending(client, keys) == 0


async def test_a_copy_written_around_the_producer_is_another_entry_and_runs_again(
    make_consumer: MakeConsumer, client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> None:
    """The rule, stated as a test: consumers dedup by the pending list, not by event id. A
    second entry written with XADD outside the producer (redis-cli, another tool) is another
    entry: its handler runs and its effects apply (README, Guarantees)."""
    runs = 0

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal runs
        runs += 1
        ctx.effect("HINCRBY", keys.state("effects"), event.id, 1)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    event = spot(1)
    for _ in range(2):
        await client.xadd(keys.stream("cluster"), codec.encode(event))  # type: ignore[arg-type]
    await drain(consumer)
    assert runs == 2
    assert await client.hget(keys.state("effects"), event.id) == b"2"


async def test_without_dedup_the_handler_runs_for_every_copy(
    make_consumer: MakeConsumer, client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> None:
    runs = 0

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal runs
        runs += 1

    consumer = make_consumer({SpotInterruption: handle}, dedup_window_ms=0)
    await consumer.ensure_groups()
    event = spot(1)
    for _ in range(2):
        await client.xadd(keys.stream("cluster"), codec.encode(event))  # type: ignore[arg-type]
    await drain(consumer)
    assert runs == 2


async def test_poison_entries_are_dead_lettered_after_max_deliveries(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """A message that kills its consumer every time must not loop forever."""
    await client.xgroup_create(keys.stream("cluster"), "g", id="0", mkstream=True)
    await producer.publish(spot(1))
    stream = keys.stream("cluster")
    await client.xreadgroup("g", "c1", {stream: ">"})
    for _ in range(5):  # five crashed restarts, each re-reading its pending entry
        await client.xreadgroup("g", "c1", {stream: "0"})
    runs = 0

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal runs
        runs += 1

    consumer = make_consumer({SpotInterruption: handle}, max_deliveries=5)
    await drain(consumer)
    assert runs == 0
    [(_, fields)] = await entries(client, keys.dlq("cluster", "g"))
    assert fields[b"dlq_reason"] == b"poison"
    assert fields[b"dlq_deliveries"] == b"7"


async def test_pending_entries_whose_payload_was_trimmed_are_acked_not_decoded(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    await client.xgroup_create(keys.stream("cluster"), "g", id="0", mkstream=True)
    await producer.publish_many([spot(i) for i in range(3)])
    await client.xreadgroup("g", "c1", {keys.stream("cluster"): ">"})
    await client.xtrim(keys.stream("cluster"), maxlen=0)

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        raise AssertionError("nothing to handle")

    consumer = make_consumer({SpotInterruption: handle})
    await drain(consumer)
    assert consumer.stats.empty == 3
    assert await pending(client, keys) == 0


async def test_entries_of_a_dead_consumer_are_reclaimed(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    await client.xgroup_create(keys.stream("cluster"), "g", id="0", mkstream=True)
    events = [spot(i) for i in range(4)]
    await producer.publish_many(events)
    await client.xreadgroup("g", "dead", {keys.stream("cluster"): ">"})  # then it died
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    live = make_consumer({SpotInterruption: handle}, name="live", min_idle_ms=300)
    assert await live.process_once() == 0  # not idle long enough yet
    assert seen == []
    for _ in range(100):  # a live consumer's steps, every 50 ms
        await live.process_once()
        if len(seen) == 4:
            break
        await asyncio.sleep(0.05)
    assert sorted(seen) == sorted(e.id for e in events)
    assert live.stats.reclaimed == 4
    assert await pending(client, keys) == 0


@pytest.mark.slow
async def test_a_slow_handler_far_past_min_idle_runs_once(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """The owner renews its entries on a heartbeat, so the other consumer never steals them."""
    runs: list[str] = []

    async def slow(event: SpotInterruption, ctx: Context) -> None:
        runs.append(ctx.consumer)
        await asyncio.sleep(2.0)  # ~7x min_idle

    a = make_consumer({SpotInterruption: slow}, name="a", min_idle_ms=300, block_ms=50)
    b = make_consumer({SpotInterruption: slow}, name="b", min_idle_ms=300, block_ms=50)
    await a.ensure_groups()
    await producer.publish(spot(1))
    task_a = asyncio.create_task(a.run())
    for _ in range(200):
        if runs:
            break
        await asyncio.sleep(0.01)
    task_b = asyncio.create_task(b.run())
    for _ in range(400):
        if a.stats.acked:
            break
        await asyncio.sleep(0.01)
    a.stop()
    b.stop()
    await asyncio.gather(task_a, task_b)
    assert runs == ["a"]
    assert b.stats.reclaimed == 0
    assert await pending(client, keys) == 0


async def test_gone_consumers_that_own_nothing_are_removed(
    make_consumer: MakeConsumer, client: aioredis.Redis, keys: Keys
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: handle}, consumer_expiry_ms=1)
    await consumer.ensure_groups()
    stream = keys.stream("cluster")
    entry_id = await client.xadd(stream, {"x": "1"})
    await client.xreadgroup("g", "gone", {stream: ">"})  # it worked, acked, and went away
    await client.xack(stream, "g", entry_id)
    await asyncio.sleep(0.01)
    assert "gone" in await consumer.expire_consumers()
    names = [c["name"] for c in await client.xinfo_consumers(keys.stream("cluster"), "g")]
    assert b"gone" not in names


async def test_dead_letters_replay_to_the_group_keeping_the_event_id(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    fixed = False
    handled: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        if not fixed:
            raise Permanent("bug in handler")
        handled.append(event.id)

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    event = spot(1)
    await producer.publish(event)
    await drain(consumer)
    letters = await dlq.dead_letters(client, keys, consumer.concern)
    assert [d.get("id") for d in letters] == [event.id]
    fixed = True  # the fix is deployed
    assert len(await dlq.replay(client, keys, consumer.concern, letters)) == 1
    assert await dlq.replay(client, keys, consumer.concern, letters) == []  # already gone
    await drain(consumer)
    assert handled == [event.id]
    assert await dlq.dead_letters(client, keys, consumer.concern) == []


async def test_dlq_filters_and_purge(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        raise Permanent("no")

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    events = [spot(i) for i in range(3)]
    await producer.publish_many(events)
    await drain(consumer)
    picked = await dlq.dead_letters(client, keys, consumer.concern, ids=[events[1].id])
    assert [d.get("id") for d in picked] == [events[1].id]
    assert await dlq.dead_letters(client, keys, consumer.concern, types=["cluster.other"]) == []
    assert await dlq.purge(client, keys, consumer.concern) == 3
    assert await dlq.dead_letters(client, keys, consumer.concern) == []


async def test_publishing_the_same_event_twice_adds_one_entry(
    producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    event = spot(1)
    first = await producer.publish(event)
    again = await producer.publish(event)
    assert again == first
    assert producer.duplicates == 1
    by_key = [await producer.publish(spot(i), idempotency_key="req-7") for i in range(2, 4)]
    assert by_key[0] == by_key[1]
    assert await client.xlen(keys.stream("cluster")) == 2


async def test_trimming_never_deletes_what_a_slow_group_has_not_acked(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    fast = make_consumer({SpotInterruption: handle}, group="fast", batch=1000)
    slow = make_consumer({SpotInterruption: handle}, group="slow", batch=50)
    await fast.ensure_groups()
    await slow.ensure_groups()
    ids = await producer.publish_many([spot(i) for i in range(1000)])
    await drain(fast)
    await slow.process_once()  # slow acks 50
    stream = keys.stream("cluster")
    await client.xreadgroup("slow", "s2", {stream: ">"}, count=100)  # 100 read, unacked
    point = await safe_point(client, stream)
    assert point == ids[50].encode()
    await trim_stream(client, stream)
    left = {i.decode() for i, _ in await entries(client, stream)}
    assert set(ids[50:]) <= left  # every entry the slow group still needs is there
    assert await client.xlen(stream) < 1000 or len(left) == 1000
    await drain(slow)  # the slow group's pending ones still decode and settle
    await drain(fast)


async def test_trimming_removes_entries_every_group_acked(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: handle}, batch=1000)
    await consumer.ensure_groups()
    await producer.publish_many([spot(i) for i in range(1000)])
    await drain(consumer)
    await trim_stream(client, keys.stream("cluster"))
    assert await client.xlen(keys.stream("cluster")) < 200  # whole nodes below the point


async def test_a_hard_cap_cuts_and_says_how_many_unacked_entries_it_cut(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    from structlog.testing import capture_logs

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    await producer.publish_many([spot(i) for i in range(300)])
    with capture_logs() as logs:
        removed = await trim_stream(client, keys.stream("cluster"), hard_maxlen=100)
    assert removed == 200
    assert await client.xlen(keys.stream("cluster")) == 100
    [cut] = [entry for entry in logs if entry["event"] == "hard_cap_cut_unacked"]
    assert cut["cut"] == 200
    assert cut["log_level"] == "error"


async def test_backpressure_engages_above_the_watermark_and_releases(
    make_consumer: MakeConsumer, client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> None:
    async def handle(event: SpotInterruption, ctx: Context) -> None:
        pass

    consumer = make_consumer({SpotInterruption: handle}, batch=100)
    await consumer.ensure_groups()
    producer = Producer(
        client,
        codec,
        keys,
        ProducerSettings(high_watermark=50, backpressure_timeout_s=0.3, lag_cache_ms=20),
    )
    await producer.publish_many([spot(i) for i in range(60)])  # checked before: was empty
    await asyncio.sleep(0.03)  # past the lag cache
    with pytest.raises(BackpressureError) as e:
        await producer.publish(spot(100))
    assert e.value.group == "g"
    assert e.value.lag == 60
    assert "high watermark 50" in str(e.value)

    async def drain_soon() -> None:
        await asyncio.sleep(0.05)
        await drain(consumer)

    producer.settings = ProducerSettings(
        high_watermark=50, backpressure_timeout_s=5, lag_cache_ms=20
    )
    drainer = asyncio.create_task(drain_soon())
    await producer.publish(spot(101))  # waits, then goes through once the group caught up
    await drainer
    assert await client.xlen(keys.stream("cluster")) == 61


async def test_safe_point_when_pending_entries_are_acked_in_between(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """XINFO said 'pending', the XPENDING summary says none: the last-delivered id rules."""
    from streamproc.trim import _succ

    stream = keys.stream("cluster")
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    ids = await producer.publish_many([spot(i) for i in range(3)])
    await client.xreadgroup("g", "c", {stream: ">"})
    original = client.xpending

    async def acked_meanwhile(name: str, groupname: str) -> Any:
        await client.xack(stream, "g", *ids)
        return await original(name, groupname)

    client.xpending = acked_meanwhile  # type: ignore[method-assign,assignment]
    try:
        assert await safe_point(client, stream) == _succ(ids[-1].encode())
    finally:
        del client.xpending
