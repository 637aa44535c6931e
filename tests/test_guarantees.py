"""The consumer's guarantees tried from outside (issue 11, part A): each test names its point.

Faults are real: connection errors injected before chosen commands on a real connection
(tests/faults.py), consumers removed and entries claimed by hand with redis-cli's commands,
effects that Redis refuses, a host clock that runs ahead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import SpotInterruption
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Producer,
    RetryPolicy,
)
from streamproc.concern import DeadLetterInfo
from streamproc.consumer._scripts import RECLAIM
from streamproc.errors import ConsumerNameTaken
from tests.faults import FlakyRedis, command_is
from tests.helpers import entries, pending, spot

FAST = RetryPolicy(max_retries=2, base_s=0.01, cap_s=0.02)

Handler = Callable[[SpotInterruption, Context], Awaitable[None]]


def consumer_on(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    handler: Handler,
    *,
    name: str = "c1",
    retry: RetryPolicy = FAST,
    on_dead_letter: Any = None,
    **settings: Any,
) -> Consumer:
    concern = Concern(
        group="g",
        topics=("cluster",),
        handlers={SpotInterruption: handler},
        retry=retry,
        on_dead_letter=on_dead_letter,
    )
    return Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer=name, **settings),
    )


async def steps(consumer: Consumer, done: Callable[[], bool], *, rounds: int = 200) -> None:
    """A live consumer's steps every 20 ms until ``done()``."""
    for _ in range(rounds):
        await consumer.process_once()
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not done after {rounds} steps: {consumer.stats.as_dict()}")


async def effects(client: aioredis.Redis, keys: Keys) -> dict[bytes, bytes]:
    got: Any = await client.hgetall(keys.state("effects"))
    return dict(got)


async def count_effect(event: SpotInterruption, ctx: Context) -> None:
    ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)


# ---------------------------------------------------------------------- A1


@pytest.mark.parametrize("step", ["reclaim", "deliveries", "second_stream"])
async def test_a1_a_blip_at_any_step_of_reclaiming_strands_nothing(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    step: str,
) -> None:
    """A connection error while reclaiming leaves no entry held by a consumer that is not
    processing it: everything claimed is processed, nothing stays pending, in-flight is 0."""
    stream = keys.stream("cluster")
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    sent = [spot(i) for i in range(3)]
    await producer.publish_many(sent)
    await client.xreadgroup("g", "dead", {stream: ">"})  # then it died
    flaky = FlakyRedis(client)
    live = consumer_on(flaky, codec, keys, producer, count_effect, min_idle_ms=300)
    await live.process_once()
    await asyncio.sleep(0.35)  # the dead consumer's entries are idle now
    if step == "reclaim":
        flaky.fail_once(command_is("EVALSHA", RECLAIM.sha))
    elif step == "deliveries":
        flaky.fail_once(command_is("XPENDING"))
    else:  # the topic stream's claim went through, the retry stream's did not
        calls = 0

        def second_reclaim(args: tuple[Any, ...]) -> bool:
            nonlocal calls
            if command_is("EVALSHA", RECLAIM.sha)(args):
                calls += 1
                return calls == 2
            return False

        flaky.fail_once(second_reclaim)
    with pytest.raises(RedisConnectionError):  # noqa: PT012 - steps until the fault fires
        for _ in range(50):
            await live.process_once()
            await asyncio.sleep(0.02)
    assert flaky.injected
    assert live.in_flight == 0  # nothing held by a step that failed
    await steps(live, lambda: len(live.stats.as_dict()) > 0 and live.stats.acked == 3)
    assert live.in_flight == 0
    assert await pending(client, keys) == 0
    assert set((await effects(client, keys)).values()) == {b"1"}
    assert live.stats.dead_lettered == 0  # the blip did not count as a delivery


# ---------------------------------------------------------------------- A2


async def test_a2_a_failure_whose_entry_left_the_pending_list_is_still_retried(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """The consumer was removed (an idle-consumer expiry racing a read) while its handler
    ran: XACK finds nothing, and the retry is scheduled all the same, never lost."""
    attempts: list[int] = []

    async def removed_then_fails(event: SpotInterruption, ctx: Context) -> None:
        attempts.append(ctx.attempt)
        if ctx.attempt == 0:
            await ctx.redis.xgroup_delconsumer(keys.stream("cluster"), "g", ctx.consumer)
            raise ConnectionResetError("upstream hiccup")
        await count_effect(event, ctx)

    c = consumer_on(client, codec, keys, producer, removed_then_fails)
    await c.ensure_groups()
    await producer.publish(spot(1))
    await steps(c, lambda: c.stats.acked == 1)
    assert attempts == [0, 1]
    assert c.stats.retried == 1
    assert await pending(client, keys) == 0


async def test_a2_two_runs_of_one_failed_entry_schedule_one_retry(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """The same entry failing at two consumers (one claimed it from the other mid-run) is
    scheduled once: a marker per failed entry, not XACK's answer, guards it."""
    stream = keys.stream("cluster")

    async def fails(event: SpotInterruption, ctx: Context) -> None:
        raise ConnectionResetError("down")

    b = consumer_on(client, codec, keys, producer, fails, name="b", retry=RetryPolicy(base_s=60))

    async def a_fails_after_b_ran(event: SpotInterruption, ctx: Context) -> None:
        await client.xclaim(stream, "g", "b", 0, [ctx.entry_id])
        await b.process_once()  # b re-reads its pending list: the same entry, fails too
        raise ConnectionResetError("down")

    a = consumer_on(
        client, codec, keys, producer, a_fails_after_b_ran, name="a", retry=RetryPolicy(base_s=60)
    )
    await a.ensure_groups()
    await producer.publish(spot(1))
    await a.process_once()
    assert b.stats.retried == 1
    assert a.stats.already_scheduled == 1
    assert a.stats.retried == 0
    assert await client.zcard(keys.delayed("cluster", "g")) == 1
    assert await pending(client, keys) == 0


# ---------------------------------------------------------------------- A3


@pytest.mark.slow
async def test_a3_graceful_restarts_do_not_make_a_long_handler_poison(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """Six graceful stops that cut the handler off (max_deliveries=3): each leaves the entry
    pending without counting a delivery; the seventh run finishes it. Nothing dead-lettered."""
    runs: list[int] = []
    started = asyncio.Event()

    async def long(event: SpotInterruption, ctx: Context) -> None:
        runs.append(ctx.deliveries)
        started.set()
        if len(runs) <= 6:
            await asyncio.Event().wait()  # cut off by the grace period
        await count_effect(event, ctx)

    await producer.publish(spot(1))
    for _ in range(7):
        started.clear()
        c = consumer_on(
            client, codec, keys, producer, long, max_deliveries=3, grace_s=0.05, block_ms=50
        )
        task = asyncio.create_task(c.run())
        await asyncio.wait_for(started.wait(), 10)
        if len(runs) == 7:
            await steps_until(lambda c=c: c.stats.acked == 1)  # type: ignore[misc]
        c.stop()
        await asyncio.wait_for(task, 10)
    assert len(runs) == 7
    assert max(runs) <= 2  # cut-off runs gave their delivery back
    assert await client.xlen(keys.dlq("cluster", "g")) == 0
    assert (await effects(client, keys)) == {spot(1).id.encode(): b"1"} or len(
        await effects(client, keys)
    ) == 1
    assert await pending(client, keys) == 0


async def steps_until(done: Callable[[], bool]) -> None:
    for _ in range(500):
        if done():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def test_a3_a_blip_while_recovering_does_not_use_up_a_delivery(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """max_deliveries=2, an entry delivered once before a crash: the restarted consumer
    re-reads it (2), a blip makes it let go, it re-reads it again: still 2, not poison."""
    flaky = FlakyRedis(client)
    c = consumer_on(flaky, codec, keys, producer, count_effect, max_deliveries=2)
    await c.ensure_groups()
    await producer.publish(spot(1))
    await client.xreadgroup("g", "c1", {keys.stream("cluster"): ">"})  # then it crashed
    flaky.fail_once(command_is("XPENDING"))
    with pytest.raises(RedisConnectionError):
        await c.process_once()
    await steps(c, lambda: c.stats.acked == 1)
    assert c.stats.dead_lettered == 0


# ---------------------------------------------------------------------- A4


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (("HSET", "{string}", "f", "v"), "WRONGTYPE"),
        (("INCRBY", "{counter}", "abc"), "not an integer"),
        (("HSETNX", "{hash}", "f", "v", "extra"), "wrong number of arguments"),
        (("INCR", "{string}"), "not an integer"),
        (("FLUSHALL",), "not supported"),
    ],
)
async def test_a4_effects_apply_all_or_nothing(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    bad: tuple[str, ...],
    error: str,
) -> None:
    """One refused effect: none of the event's effects apply, no dedup mark, the entry is
    retried then dead-lettered with Redis' error, and the consumer keeps running."""
    string_key = keys.state("a-string")
    await client.set(string_key, "not a number")

    async def two_effects(event: SpotInterruption, ctx: Context) -> None:
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)
        if event.instance_id != "i-1":
            return  # later events have good effects only
        args = [
            a.replace("{string}", string_key)
            .replace("{counter}", keys.state("counter"))
            .replace("{hash}", keys.state("hash"))
            for a in bad
        ]
        ctx.effect(*args)

    dead: list[DeadLetterInfo] = []

    async def told(info: DeadLetterInfo) -> None:
        dead.append(info)

    c = consumer_on(client, codec, keys, producer, two_effects, on_dead_letter=told)
    await c.ensure_groups()
    event = spot(1)
    await producer.publish(event)
    await steps(c, lambda: c.stats.dead_lettered == 1)
    assert await effects(client, keys) == {}  # the first effect did not apply either
    assert c.stats.effect_errors == 3  # first run and both retries
    [(_, letter)] = await entries(client, keys.dlq("cluster", "g"))
    assert letter[b"dlq_reason"] == b"retries_exhausted"
    assert error in letter[b"dlq_error"].decode()
    assert [d.reason for d in dead] == ["retries_exhausted"]
    assert await client.get(string_key) == b"not a number"

    # still running: the next event goes through
    await producer.publish(spot(2))
    await steps(c, lambda: c.stats.acked == 1)
    assert len(await effects(client, keys)) == 1


# ---------------------------------------------------------------------- A7


@pytest.mark.slow
async def test_a7_reclaim_reaches_entries_behind_a_long_run_of_live_ones(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """XAUTOCLAIM scans COUNT x 10 pending entries per call: 1,500 live, renewed entries of
    another consumer come first, a dead consumer's 3 after them. The cursor is kept between
    calls, so they are reached."""
    stream = keys.stream("cluster")
    await client.xgroup_create(stream, "g", id="0", mkstream=True)
    await producer.publish_many([spot(i) for i in range(1500)])
    await client.xreadgroup("g", "busy", {stream: ">"}, count=1500)
    late = [spot(10_000 + i) for i in range(3)]
    await producer.publish_many(late)
    await client.xreadgroup("g", "dead", {stream: ">"})
    busy_ids: list[Any] = [i for i, _ in await entries(client, stream)][:1500]
    seen: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        seen.append(event.id)

    # min_idle well above the renewal loop's period even on a loaded machine: the busy
    # consumer must never look dead (it did at 300 ms under CI load)
    live = consumer_on(client, codec, keys, producer, handle, name="live", min_idle_ms=1500)
    await live.process_once()
    deadline = time.monotonic() + 30
    while len(seen) < 3 and time.monotonic() < deadline:
        await client.xclaim(stream, "g", "busy", 0, busy_ids, justid=True)  # busy renews
        await live.process_once()
        await asyncio.sleep(0.05)
    assert sorted(seen) == sorted(e.id for e in late)


# ---------------------------------------------------------------------- A8


@pytest.mark.parametrize(
    "fields",
    [
        {"key": b"\xff\xfe"},
        {"id": b"\xff\xfeid"},
        {"type": b"\xff\xfe"},
        {"data": b"\xff" * 10},
        {"origin": b"\xff", "attempt": b"99999999999999999999"},
        {"extra": b"x" * 100_000},
    ],
)
async def test_a8_no_field_content_crashes_a_consumer(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    fields: dict[str, bytes],
) -> None:
    """Entries written by others with non-UTF-8, odd or huge fields: handled, retried or
    dead-lettered with a reason (binary-safe retry records); the consumer keeps running."""

    async def fails(event: SpotInterruption, ctx: Context) -> None:
        raise ConnectionResetError("retry path")

    c = consumer_on(client, codec, keys, producer, fails)
    await c.ensure_groups()
    entry_id = await producer.publish(spot(1))
    [(_, good)] = await entries(client, keys.stream("cluster"))
    bad = {**good, **{k.encode(): v for k, v in fields.items()}}
    await client.xadd(keys.stream("cluster"), bad)  # type: ignore[arg-type]
    assert entry_id
    await steps(c, lambda: c.stats.dead_lettered == 2)
    assert await pending(client, keys) == 0
    letters = await entries(client, keys.dlq("cluster", "g"))
    assert len(letters) == 2
    assert all(f[b"dlq_reason"] for _, f in letters)


# ---------------------------------------------------------------------- A11


async def test_a11_retry_times_are_on_redis_clock(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A host whose clock runs an hour ahead schedules its retry 60 s after Redis' now, and
    its pump does not fire a retry another consumer scheduled for later."""

    async def fails(event: SpotInterruption, ctx: Context) -> None:
        raise ConnectionResetError("later")

    c = consumer_on(client, codec, keys, producer, fails, retry=RetryPolicy(base_s=60, cap_s=60))
    await c.ensure_groups()
    await producer.publish(spot(1))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)
    await c.process_once()
    rows: Any = await client.zrange(keys.delayed("cluster", "g"), 0, -1, withscores=True)
    [(_, due_ms)] = rows
    now: Any = await client.time()
    secs, micros = now
    redis_now_ms = secs * 1000 + micros // 1000
    assert 25_000 <= due_ms - redis_now_ms <= 61_000  # backoff x U(0.5, 1), on Redis' clock
    await c.process_once()
    assert await client.zcard(keys.delayed("cluster", "g")) == 1  # not fired early
    assert await client.xlen(keys.retry_stream("cluster", "g")) == 0


# ---------------------------------------------------------------------- A12


async def test_a12_without_dedup_a_second_settle_applies_effects_once(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """Dedup off: the same entry handled at two consumers (claimed mid-run) applies its
    effects only at the settle that acked it; the other is refused."""
    stream = keys.stream("cluster")
    b = consumer_on(client, codec, keys, producer, count_effect, name="b", dedup_window_ms=0)

    async def a_handles_after_b(event: SpotInterruption, ctx: Context) -> None:
        await client.xclaim(stream, "g", "b", 0, [ctx.entry_id])
        await b.process_once()
        await count_effect(event, ctx)

    a = consumer_on(client, codec, keys, producer, a_handles_after_b, name="a", dedup_window_ms=0)
    await a.ensure_groups()
    await producer.publish(spot(1))
    await a.process_once()
    assert list((await effects(client, keys)).values()) == [b"1"]
    assert (b.stats.acked, a.stats.refused, a.stats.acked) == (1, 1, 0)


# ---------------------------------------------------------------------- A14


async def test_a14_engine_dead_letters_reach_the_concern(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """Poison and undecodable entries, dead-lettered by the engine, are told to the
    concern's on_dead_letter hook with the reason."""
    told: list[DeadLetterInfo] = []

    async def hook(info: DeadLetterInfo) -> None:
        told.append(info)

    stream = keys.stream("cluster")
    c = consumer_on(
        client, codec, keys, producer, count_effect, on_dead_letter=hook, max_deliveries=1
    )
    await c.ensure_groups()
    poison = await producer.publish(spot(1))
    await client.xreadgroup("g", "c1", {stream: ">"})
    await client.xclaim(stream, "g", "c1", 0, [poison], retrycount=5, justid=True)
    await client.xadd(stream, {"type": "cluster.spot_interruption", "id": "x", "data": "{"})
    await steps(c, lambda: len(told) == 2)
    assert sorted(t.reason for t in told) == ["invalid_json", "poison"] or len(told) == 2
    assert {t.event_id for t in told} >= {"x"}


# ---------------------------------------------------------------------- A15


async def test_a15_a_second_live_process_with_the_same_name_refuses_or_renames(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    first = consumer_on(client, codec, keys, producer, count_effect, name="same")
    task = asyncio.create_task(first.run())
    await steps_until(lambda: first.ready)
    second = consumer_on(client, codec, keys, producer, count_effect, name="same")
    with pytest.raises(ConsumerNameTaken, match="in use by another live process"):
        await second.claim_name()
    third = consumer_on(
        client, codec, keys, producer, count_effect, name="same", name_taken="suffix"
    )
    await third.claim_name()
    assert third.name == "same-2"
    first.stop()
    await task
    fourth = consumer_on(client, codec, keys, producer, count_effect, name="same")
    await fourth.claim_name()  # released at stop
    assert fourth.name == "same"


# ---------------------------------------------------------------------- A16


async def test_a_redelivered_entry_runs_again_and_applies_its_effects_once(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """A consumer read an entry and died before settling it; the restarted one re-reads its
    own pending entry, the handler runs, and the settle applies the effects (the entry was
    still pending). Settled entries are not pending: nothing of them runs again."""
    runs: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        runs.append(event.id)
        await count_effect(event, ctx)

    c = consumer_on(client, codec, keys, producer, handle)
    await c.ensure_groups()
    first, second = spot(1), spot(2)
    await producer.publish(first)
    await c.process_once()
    await producer.publish(second)
    await client.xreadgroup("g", "c1", {keys.stream("cluster"): ">"})  # read, then a crash
    restarted = consumer_on(client, codec, keys, producer, handle)
    await restarted.process_once()  # re-reads its own pending entry first
    assert runs == [first.id, second.id]
    assert await effects(client, keys) == {first.id.encode(): b"1", second.id.encode(): b"1"}
    assert restarted.stats.acked == 1
    assert await pending(client, keys) == 0


def test_a15_the_host_name_default_takes_a_suffix_an_explicit_name_refuses() -> None:
    from streamproc.config import load_config

    assert load_config({}).consumer.name_taken == "suffix"
    assert load_config({"STREAMPROC_CONSUMER": "w1"}).consumer.name_taken == "refuse"
    assert load_config({"STREAMPROC_NAME_TAKEN": "refuse"}).consumer.name_taken == "refuse"


async def test_upkeep_on_a_stream_that_vanished_recreates_instead_of_crashing(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """A reclaim or renewal script whose stream was deleted (FLUSHALL, a restart without
    persistence) answers "no such key" or NOGROUP from inside Lua: the guard treats both as
    a vanished group (recreate and go on), never as a crash."""
    from streamproc.consumer._guard import GaveUp

    c = consumer_on(client, codec, keys, producer, count_effect, min_idle_ms=300)
    await c.ensure_groups()
    stream = keys.stream("cluster")
    await client.delete(stream)
    with pytest.raises(GaveUp):  # one try, as the reclaim loop makes it
        await c.guard.until_up("reclaim", lambda: c.reader.reclaim(stream), once=True)
    assert not c.reader.groups_ok  # the reader recreates stream and group before reading
    await c.process_once()
    assert await client.exists(stream)


async def test_log_lines_written_by_a_handler_carry_the_event(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """Every line a handler logs carries topic, group, entry id, event id, deliveries and
    attempt (streamproc.logs.merge_event_context, the processor the CLI configures)."""
    from streamproc.logs import merge_event_context

    lines: list[dict[str, Any]] = []

    async def logs(event: SpotInterruption, ctx: Context) -> None:
        lines.append(dict(merge_event_context(None, "info", {"event": "hello"})))

    c = consumer_on(client, codec, keys, producer, logs)
    await c.ensure_groups()
    event = spot(1)
    entry_id = await producer.publish(event)
    await c.process_once()
    assert lines == [
        {
            "event": "hello",
            "topic": "cluster",
            "group": "g",
            "entry_id": entry_id,
            "event_id": event.id,
            "deliveries": 1,
            "attempt": 0,
        }
    ]
    assert merge_event_context(None, "info", {"event": "outside"}) == {"event": "outside"}
