"""Per-key order with concurrency (``Concern(ordered=True)``), against a real Redis.

Events of one key are handled one after another in stream order, different keys in
parallel; a retrying entry holds back the later events of its key (parked in Redis) and not
other keys'; dead-lettering it lets the rest go on; every consumer of the group keeps a hold.
"""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import Notification, SpotInterruption
from streamproc import (
    Codec,
    ConfigError,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Permanent,
    Producer,
    Retry,
    RetryPolicy,
)
from streamproc.concern import Concern
from streamproc.consumer._lanes import Lanes
from streamproc.consumer.outcomes import Entry
from tests.helpers import MakeConsumer, entries, pending

ORDERED = {"ordered": True, "retry": RetryPolicy(max_retries=1000, base_s=0.01, cap_s=0.02)}


def ev(key: str, seq: int) -> SpotInterruption:
    """Event ``seq`` of ``key`` (its instance id says both)."""
    return SpotInterruption(
        cluster_id="c1",
        key=key,
        instance_id=f"{key or 'nokey'}-{seq}",
        instance_type="m5.large",
        availability_zone="eu-west-1a",
    )


def seq_of(event: SpotInterruption) -> int:
    return int(event.instance_id.rsplit("-", 1)[1])


class Tracker:
    """What ran: per key the handled order, and the overlaps seen (all keys, one key)."""

    def __init__(self, expected: int) -> None:
        self.order: dict[str, list[int]] = defaultdict(list)
        self.running = 0
        self.max_running = 0
        self.running_keys: dict[str, int] = defaultdict(int)
        self.same_key_overlaps = 0
        self.expected = expected
        self.done = asyncio.Event()
        self.count = 0

    async def around(self, event: SpotInterruption, body: Callable[[], Awaitable[None]]) -> None:
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self.running_keys[event.key] += 1
        if self.running_keys[event.key] > 1:
            self.same_key_overlaps += 1
        try:
            await body()
        finally:
            self.running -= 1
            self.running_keys[event.key] -= 1

    def handled(self, event: SpotInterruption) -> None:
        self.order[event.key].append(seq_of(event))
        self.count += 1
        if self.count >= self.expected:
            self.done.set()


async def run_until(consumer: Any, done: asyncio.Event, timeout_s: float = 60) -> None:
    task = asyncio.create_task(consumer.run())
    try:
        await asyncio.wait_for(done.wait(), timeout_s)
    finally:
        consumer.stop()
        await task


def interleaved(keys: list[str], per_key: int, seed: int) -> list[SpotInterruption]:
    """Every key's events in sequence, the keys shuffled together."""
    rng = random.Random(seed)
    nxt = dict.fromkeys(keys, 0)
    out = []
    while nxt:
        k = rng.choice(sorted(nxt))
        out.append(ev(k, nxt[k]))
        nxt[k] += 1
        if nxt[k] == per_key:
            del nxt[k]
    return out


async def run_workload(
    make_consumer: MakeConsumer, producer: Producer, *, ordered: bool
) -> Tracker:
    """1,000 events of 40 keys, handlers sleeping 0-3 ms at random, concurrency 10."""
    events = interleaved([f"k{i}" for i in range(40)], 25, seed=18)
    t = Tracker(len(events))
    rng = random.Random(7)

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        await t.around(event, lambda: asyncio.sleep(rng.random() * 0.003))
        t.handled(event)

    consumer = make_consumer(
        {SpotInterruption: handle},
        concurrency=10,
        concern={"ordered": ordered},
        block_ms=50,
        max_in_flight=200,
    )
    await consumer.ensure_groups()
    await producer.publish_many(events)
    await run_until(consumer, t.done)
    return t


async def test_each_keys_events_run_in_stream_order_and_keys_in_parallel(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    t = await run_workload(make_consumer, producer, ordered=True)
    assert len(t.order) == 40
    for key, seqs in t.order.items():
        assert seqs == list(range(25)), key
    assert t.same_key_overlaps == 0
    assert t.max_running > 1  # different keys did run at the same time
    assert await pending(client, keys) == 0


async def test_the_same_workload_unordered_breaks_key_order(
    make_consumer: MakeConsumer, producer: Producer
) -> None:
    """The check above can fail: without ``ordered`` the same run mixes up some key."""
    t = await run_workload(make_consumer, producer, ordered=False)
    out_of_order = [k for k, seqs in t.order.items() if seqs != list(range(25))]
    assert out_of_order or t.same_key_overlaps > 0


async def test_a_retrying_entry_holds_back_its_key_and_not_other_keys(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """a-0 keeps asking for a retry until every b event ran: b is not held back by it (or
    this never ends), while a-1..a-4 wait, parked in Redis, until a-0 succeeded."""
    t = Tracker(10)
    b_done = asyncio.Event()
    attempts = 0
    held_while_retrying: list[Any] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal attempts
        if event.key == "a" and seq_of(event) == 0 and (attempts < 3 or not b_done.is_set()):
            attempts += 1
            if attempts == 3:  # by now a-1..a-4 are parked behind it
                held_while_retrying.append(await client.hgetall(keys.hold("cluster", "g")))
            raise Retry("not yet", delay_s=0.02)
        t.handled(event)
        if event.key == "b" and len(t.order["b"]) == 5:
            b_done.set()

    consumer = make_consumer({SpotInterruption: handle}, concurrency=10, concern=ORDERED)
    await consumer.ensure_groups()
    await producer.publish_many([ev("a", i) for i in range(5)] + [ev("b", i) for i in range(5)])
    await run_until(consumer, t.done)

    assert t.order["b"] == [0, 1, 2, 3, 4]
    assert t.order["a"] == [0, 1, 2, 3, 4]
    assert attempts >= 3
    assert consumer.stats.parked == 4
    assert len(held_while_retrying) == 1
    assert list(held_while_retrying[0]) == [b"a"]  # only a was held, b never
    assert await client.hlen(keys.hold("cluster", "g")) == 0
    assert await client.llen(keys.parked("cluster", "g", b"a")) == 0
    assert await pending(client, keys) == 0


@pytest.mark.parametrize("seed", [5, 6, 7])
async def test_random_retries_under_concurrency_keep_every_keys_order(
    make_consumer: MakeConsumer,
    producer: Producer,
    client: aioredis.Redis,
    keys: Keys,
    seed: int,
) -> None:
    """20 keys x 15 events, concurrency 10, random delays; a fifth of the events ask for a
    retry once or twice (some deferred), so heads, parked runs and releases interleave."""
    events = interleaved([f"k{i}" for i in range(20)], 15, seed=seed)
    t = Tracker(len(events))
    rng = random.Random(seed)
    fails = {e.id: rng.choice((1, 1, 2)) for e in events if rng.random() < 0.2}

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        async def body() -> None:
            await asyncio.sleep(rng.random() * 0.002)
            if fails.get(event.id, 0) > 0:
                fails[event.id] -= 1
                raise Retry("flaky", delay_s=rng.random() * 0.03, counts=rng.random() < 0.5)

        await t.around(event, body)
        t.handled(event)

    consumer = make_consumer(
        {SpotInterruption: handle}, concurrency=10, concern=ORDERED, block_ms=50
    )
    await consumer.ensure_groups()
    await producer.publish_many(events)
    await run_until(consumer, t.done)
    for key, seqs in t.order.items():
        assert seqs == list(range(15)), key
    assert t.same_key_overlaps == 0
    assert consumer.stats.parked > 0
    assert await client.hlen(keys.hold("cluster", "g")) == 0
    assert await pending(client, keys) == 0


async def test_without_hold_on_retry_later_events_pass_a_retrying_one(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """The documented opt-out: order is kept, except that a retry runs when it is due."""
    t = Tracker(3)
    first = True

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal first
        if seq_of(event) == 0 and first:
            first = False
            raise Retry("later", delay_s=0.2)
        t.handled(event)

    consumer = make_consumer(
        {SpotInterruption: handle},
        concern={**ORDERED, "hold_on_retry": False},
        block_ms=50,
    )
    await consumer.ensure_groups()
    await producer.publish_many([ev("a", i) for i in range(3)])
    await run_until(consumer, t.done)
    assert t.order["a"] == [1, 2, 0]
    assert consumer.stats.parked == 0
    assert not await client.exists(keys.hold("cluster", "g"))


async def test_dead_lettering_the_head_releases_the_rest_in_order(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    t = Tracker(3)
    tries = 0

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        nonlocal tries
        if seq_of(event) == 0:
            tries += 1
            if tries == 1:
                raise Retry("once more", delay_s=0.05)
            raise Permanent("gave up")
        t.handled(event)

    consumer = make_consumer({SpotInterruption: handle}, concern=ORDERED, block_ms=50)
    await consumer.ensure_groups()
    await producer.publish_many([ev("a", i) for i in range(4)])
    await run_until(consumer, t.done)
    assert tries == 2
    assert t.order["a"] == [1, 2, 3]
    assert consumer.stats.parked == 3
    dead = await entries(client, keys.dlq("cluster", "g"))
    assert [f[b"dlq_reason"] for _, f in dead] == [b"permanent"]
    assert await client.hlen(keys.hold("cluster", "g")) == 0


async def test_an_entry_whose_effects_redis_refuses_holds_back_its_key(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """The handler of a-0 returns, but Redis refuses its effect at settle (a retry then):
    a-1 must wait for that settle, not only for a-0's handler, and then for a-0's retry."""
    target = keys.state("n")
    await client.hset(target, "x", "1")  # INCR on a hash: WRONGTYPE at settle
    seen: list[int] = []
    done = asyncio.Event()

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        if seq_of(event) == 0:
            ctx.effect("INCR", target if 0 not in seen else keys.state("m"))
        seen.append(seq_of(event))
        if len(seen) == 4:
            done.set()

    consumer = make_consumer(
        {SpotInterruption: handle}, concurrency=10, concern=ORDERED, block_ms=50
    )
    await consumer.ensure_groups()
    await producer.publish_many([ev("a", i) for i in range(3)])
    await run_until(consumer, done)
    assert seen == [0, 0, 1, 2]
    assert consumer.stats.effect_errors == 1
    assert consumer.stats.parked == 2
    assert await client.get(keys.state("m")) == b"1"


async def test_a_hold_is_kept_by_every_consumer_of_the_group(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    """The hold lives in Redis: a consumer that did not see the retry (another process, or
    the same after a restart) parks the key's new events behind the retrying one."""
    release = False
    seen: list[tuple[str, int]] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        if event.key == "a" and seq_of(event) == 0 and not release:
            raise Retry("blocked", delay_s=0.05)
        seen.append((ctx.consumer, seq_of(event)))

    first = make_consumer({SpotInterruption: handle}, name="one", concern=ORDERED)
    await first.ensure_groups()
    await producer.publish(ev("a", 0))
    await first.process_once()
    assert await client.hgetall(keys.hold("cluster", "g")) != {}

    second = make_consumer({SpotInterruption: handle}, name="two", concern=ORDERED)
    await producer.publish_many([ev("a", i) for i in (1, 2)] + [ev("b", 0)])
    await second.process_once()
    assert seen == [("two", 0)]  # b-0 ran; a-1 and a-2 were parked
    assert second.stats.parked == 2
    release = True
    for _ in range(100):
        await asyncio.sleep(0.02)
        await first.process_once(block_ms=10)
        await second.process_once(block_ms=10)
        if len(seen) == 4:
            break
    assert [s for _, s in seen[1:]] == [0, 1, 2]
    assert await client.hlen(keys.hold("cluster", "g")) == 0


async def test_process_once_keeps_key_order_across_a_retry(
    make_consumer: MakeConsumer, producer: Producer, client: aioredis.Redis, keys: Keys
) -> None:
    seen: list[tuple[str, int]] = []
    failed: set[str] = set()

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        if seq_of(event) == 1 and event.key not in failed:
            failed.add(event.key)
            raise Retry("again", delay_s=0.01)
        seen.append((event.key, seq_of(event)))

    consumer = make_consumer({SpotInterruption: handle}, concurrency=4, concern=ORDERED)
    await consumer.ensure_groups()
    await producer.publish_many(interleaved(["a", "b", "c"], 6, seed=3))
    for _ in range(200):
        await consumer.process_once(block_ms=10)
        if len(seen) == 18:
            break
        await asyncio.sleep(0.01)
    for k in "abc":
        assert [s for key, s in seen if key == k] == list(range(6))
    assert consumer.stats.parked == 12  # 2..5 of each key waited behind its 1
    assert await pending(client, keys) == 0


async def test_events_without_a_key_are_not_held_back(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """Keyless events (notifications here: cluster events always carry their cluster id as
    key) are not ordered: a retry of the first does not hold back the next two."""
    handled: list[int] = []
    done = asyncio.Event()
    first = True

    async def handle(event: Notification, ctx: Context) -> None:
        nonlocal first
        if event.title == "0" and first:
            first = False
            raise Retry("later", delay_s=0.1)
        handled.append(int(event.title))
        if len(handled) == 3:
            done.set()

    consumer = Consumer(
        Concern(
            group="g",
            topics=("notify",),
            handlers={Notification: handle},
            ordered=True,
            retry=RetryPolicy(max_retries=1000, base_s=0.01, cap_s=0.02),
        ),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1", block_ms=50),
    )
    await consumer.ensure_groups()
    await producer.publish_many([Notification(cluster_id="", title=str(i)) for i in range(3)])
    await run_until(consumer, done)
    assert handled == [1, 2, 0]
    assert consumer.stats.parked == 0


def test_hold_on_retry_needs_ordered() -> None:
    with pytest.raises(ConfigError, match="needs ordered"):
        Concern(group="g", topics=("cluster",), handlers={}, hold_on_retry=False)


def entry(key: bytes, n: int, origin: bytes | None = None) -> Entry:
    fields = {b"key": key, b"type": b"t"}
    if origin is not None:
        fields[b"origin"] = origin
    return Entry("s", "cluster", f"{n}-0".encode(), fields)


def test_lanes_run_one_entry_per_key_and_the_next_after_it() -> None:
    """The lane state machine alone (no Redis): what may run after each step."""
    lanes = Lanes()
    a0, a1, b0, n0 = entry(b"a", 1), entry(b"a", 2), entry(b"b", 3), entry(b"", 4)
    assert [lanes.add(e, {}) for e in (a0, a1, b0, n0)] == [a0, None, b0, n0]
    assert lanes.waiting == 1
    assert lanes.handled(a0) is a1  # a final outcome: a-1 may run before a-0's settle
    assert lanes.settled(a0, retried=False) is None  # already released
    assert lanes.settled(a1, retried=False) is None
    assert lanes.settled(b0, retried=False) is None
    assert len(lanes) == 0  # empty lanes are dropped


def test_lanes_park_behind_a_retry_and_run_the_head_first() -> None:
    lanes = Lanes()
    a0, a1, a2 = entry(b"a", 1), entry(b"a", 2), entry(b"a", 3)
    assert lanes.add(a0, {}) is a0
    assert lanes.add(a1, {}) is None
    assert lanes.settled(a0, retried=True) is None  # the key may be held: park, not run
    assert lanes.add(a2, {("cluster", b"a"): b"1-0"}) is None
    assert lanes.parking() == [(("cluster", b"a"), [a1, a2])]
    gone, run = lanes.parked(("cluster", b"a"), [a1, a2], [1, 1])
    assert (gone, run, lanes.waiting, len(lanes)) == ([a1, a2], None, 0, 0)
    # a-0's retry comes back: it heads the key and runs, the next read entry waits behind it
    head = entry(b"a", 9, origin=b"1-0")
    a3 = entry(b"a", 10)
    holds = {("cluster", b"a"): b"1-0"}
    assert lanes.add(a3, holds) is None
    assert lanes.add(head, holds) is head
    assert lanes.parking() == [(("cluster", b"a"), [a3])]
    # the head was acked meanwhile and nothing else was parked: the key is free, a-3 runs
    assert lanes.parked(("cluster", b"a"), [a3], [-1]) == ([], None)  # head still running
    assert lanes.settled(head, retried=False) is a3
