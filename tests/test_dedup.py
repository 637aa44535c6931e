"""Dedup without a Redis key per event (issue 20).

Consumer side: the settle script acks first and applies the handler's effects only when its
XACK removed the entry from the pending list. No ``seen`` mark is written. These tests cover
the cases where the pending list is the whole story (a resent settle, a steal) and the cases
where XACK answers 0 for another reason than "already applied": the group was recreated, or a
hard cap cut the entry while it was held. Producer side: a resend after a lost reply is
recognised by (producer, sequence) with no record per event, and explicit ids / idempotency
keys by compact records (streamproc/producer.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Context, Keys, Producer
from streamproc.connection import connect
from streamproc.consumer._scripts import SUCCEED
from streamproc.errors import PublishError
from streamproc.producer import dedup_state, find_record, minted_ms
from streamproc.settings import ProducerSettings, RedisSettings
from tests.faults import FlakyRedis, command_is
from tests.helpers import dedup_records, digests, pending, spot
from tests.tcpproxy import TcpProxy
from tests.test_guarantees import consumer_on, count_effect, effects


async def until(done: Callable[[], bool], *, rounds: int = 500) -> None:
    for _ in range(rounds):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def dedup_keys(client: aioredis.Redis, keys: Keys) -> list[bytes]:
    """Every key a consumer could have written per event (the old ``seen`` marks)."""
    return [k async for k in client.scan_iter(match=f"{keys.prefix}:*:seen:*")]


async def test_a_settle_resent_after_a_lost_reply_applies_effects_once(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """The settle ran on the server, its reply was lost, the guard sent it again: the resend
    finds the entry acked and applies nothing (counted as refused)."""
    flaky = FlakyRedis(client)
    c = consumer_on(flaky, codec, keys, producer, count_effect)
    await c.ensure_groups()
    flaky.lose_reply_once(command_is("EVALSHA", SUCCEED.sha))
    task = asyncio.create_task(c.run())
    event = spot(1)
    await producer.publish(event)
    await until(lambda: c.stats.refused == 1)
    c.stop()
    await task
    assert flaky.injected == ["reply of b'EVALSHA'"] or len(flaky.injected) == 1
    assert await effects(client, keys) == {event.id.encode(): b"1"}
    assert (c.stats.acked, c.stats.refused) == (0, 1)
    assert await pending(client, keys) == 0
    assert await dedup_keys(client, keys) == []


async def test_an_entry_in_flight_when_its_group_is_recreated_applies_at_its_next_delivery(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """The group is destroyed and recreated from 0 while a handler runs: the settle's XACK
    answers 0, but the group has not delivered the entry yet, so nothing is applied now
    (``redeliver``) and its next delivery applies it, once."""
    stream = keys.stream("cluster")
    runs: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        runs.append(ctx.entry_id)
        if len(runs) == 1:  # what the consumer's own NOGROUP recovery does
            await client.xgroup_destroy(stream, "g")
            await client.xgroup_create(stream, "g", id="0")
        await count_effect(event, ctx)

    c = consumer_on(client, codec, keys, producer, handle)
    await c.ensure_groups()
    event = spot(1)
    await producer.publish(event)
    await c.process_once()
    assert c.stats.redeliver == 1
    assert await effects(client, keys) == {}  # not applied, not lost: delivered again
    await c.process_once()
    assert len(runs) == 2
    assert await effects(client, keys) == {event.id.encode(): b"1"}
    assert (c.stats.acked, c.stats.redeliver) == (1, 1)
    assert await pending(client, keys) == 0


async def test_a_group_lost_while_a_handler_runs_recovers_and_applies_once(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """The running consumer meets NOGROUP at its settle, recreates the group itself and goes
    on: whichever of the settle's resend and the new delivery comes first applies the
    effects, the other applies nothing."""
    stream = keys.stream("cluster")
    runs: list[str] = []

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        runs.append(ctx.entry_id)
        if len(runs) == 1:
            await client.xgroup_destroy(stream, "g")
        await count_effect(event, ctx)

    c = consumer_on(client, codec, keys, producer, handle)
    task = asyncio.create_task(c.run())
    event = spot(1)
    await producer.publish(event)
    await until(lambda: len(runs) >= 2 and c.in_flight == 0)
    await until(lambda: c.stats.acked == 1)
    c.stop()
    await task
    assert await effects(client, keys) == {event.id.encode(): b"1"}
    assert await pending(client, keys) == 0


async def test_an_entry_cut_by_a_hard_cap_while_held_still_applies_its_effects(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """A hard cap trims the entry while its handler runs and the heartbeat renews it: the
    renewal leaves it pending (an XCLAIM would drop a deleted entry from the pending list, and
    the settle's XACK would then find nothing), so the settle acks it and applies."""
    stream = keys.stream("cluster")
    c: Any = None

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        await client.xtrim(stream, maxlen=0, approximate=False)
        await c.renew()  # held, but not renewed: its payload is gone
        assert await pending(client, keys) == 1
        await count_effect(event, ctx)

    c = consumer_on(client, codec, keys, producer, handle)
    await c.ensure_groups()
    event = spot(1)
    await producer.publish(event)
    await c.process_once()
    assert await effects(client, keys) == {event.id.encode(): b"1"}
    assert c.stats.acked == 1
    assert await pending(client, keys) == 0


async def test_two_consumers_racing_after_a_steal_apply_once_without_marks(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    """A slow owner's entry is claimed by another consumer, which settles first; the owner's
    settle then finds it acked. Nothing per event is left in Redis."""
    stream = keys.stream("cluster")
    b = consumer_on(client, codec, keys, producer, count_effect, name="b")

    async def slow_owner(event: SpotInterruption, ctx: Context) -> None:
        await client.xclaim(stream, "g", "b", 0, [ctx.entry_id])
        await b.process_once()
        await count_effect(event, ctx)

    a = consumer_on(client, codec, keys, producer, slow_owner, name="a")
    await a.ensure_groups()
    await producer.publish(spot(1))
    await a.process_once()
    assert list((await effects(client, keys)).values()) == [b"1"]
    assert (b.stats.acked, a.stats.refused) == (1, 1)
    assert await dedup_keys(client, keys) == []


# ---------------------------------------------------------------------- producer side


async def _lose_publish_reply(
    client: aioredis.Redis, proxy: TcpProxy, publish: Callable[[], Any], stream: str
) -> Any:
    """Run ``publish`` through the proxy; once its write reached Redis, cut the connection
    before the reply gets back. The producer sends the write again. (The producer has
    written once before: connected, topic registered, the groups' lag cached.)"""
    before = await client.xlen(stream)
    proxy.pause(to_server=False)  # requests go through, replies are held
    task = asyncio.ensure_future(publish())
    for _ in range(500):
        if await client.xlen(stream) > before:
            break
        await asyncio.sleep(0.01)
    assert await client.xlen(stream) == before + 1
    proxy.cut()  # the reply is lost with the connection
    proxy.resume()
    return await task


async def test_a_producer_resend_after_a_lost_reply_adds_nothing_without_a_record(
    client: aioredis.Redis, redis_url: str, codec: Codec[Any], keys: Keys
) -> None:
    """No record by id (dedup=False, as ingest does for ids it minted): the resend is
    recognised by (producer, sequence) and answers the entry the first send wrote."""
    from urllib.parse import urlparse

    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as proxy:
        flaky = connect(RedisSettings(url=proxy.url))
        producer = Producer(flaky, codec, keys, ProducerSettings(lag_cache_ms=600_000))
        await producer.append([spot(0)], dedup=[False])
        event = spot(1)
        stream = keys.stream("cluster")
        [got] = await _lose_publish_reply(
            client, proxy, lambda: producer.append([event], dedup=[False]), stream
        )
        await flaky.aclose()
    rows: Any = await client.xrange(stream)
    assert [r[0].decode() for r in rows][1:] == [got.entry_id]
    assert not got.duplicate
    assert producer.duplicates == 0
    assert await dedup_records(client, keys) == set()


async def test_a_producer_resend_after_a_lost_reply_with_an_explicit_id(
    client: aioredis.Redis, redis_url: str, codec: Codec[Any], keys: Keys
) -> None:
    from urllib.parse import urlparse

    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as proxy:
        flaky = connect(RedisSettings(url=proxy.url))
        producer = Producer(flaky, codec, keys, ProducerSettings(lag_cache_ms=600_000))
        await producer.append([spot(0)], dedup=[False])
        event = spot(1, id="order-42")
        stream = keys.stream("cluster")
        got = await _lose_publish_reply(client, proxy, lambda: producer.publish(event), stream)
        await flaky.aclose()
    rows: Any = await client.xrange(stream)
    assert [r[0].decode() for r in rows][1:] == [got]
    assert await dedup_records(client, keys) == digests("order-42")
    # another producer (a restarted process) publishing it again: refused by the record
    [again] = await Producer(client, codec, keys).append([event])
    assert again == (got, True)


async def test_dedup_state_is_per_producer_and_generation_not_per_event(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """1,000 events: no key per event. Records (by id) are fields of a generation's few shard
    hashes; the sequence mark is one hash per producer holding its last call only."""
    producer = Producer(client, codec, keys, ProducerSettings(dedup_shards=16))
    events = [spot(i) for i in range(1000)]
    for i in range(0, 1000, 100):
        await producer.publish_many(events[i : i + 100])
    prefix = keys.published_prefix("cluster")
    names = [k async for k in client.scan_iter(match=prefix + "*")]
    assert len(names) <= 2 + 16  # meta, this producer's mark, a first generation's shards
    assert len(await dedup_records(client, keys)) == 1000
    mark: Any = await client.get(f"{prefix}seq:{producer.identity}")
    last, pairs = mark.decode().split("|")
    assert last == "1000"
    assert [p.split("=")[0] for p in pairs.split(",")] == [str(q) for q in range(901, 1001)]


async def test_a_record_lives_one_to_two_windows_and_the_next_generation_is_sized(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """Generations of one window: a record is found in its own generation and the next one,
    and forgotten after; a generation's shard count follows the record count before it."""
    window = 1000
    settings = ProducerSettings(dedup_window_ms=window, dedup_shards=2)
    producer = Producer(client, codec, keys, settings)
    meta = keys.published_prefix("cluster") + "meta"

    async def gen_now() -> int:
        t: Any = await client.time()
        return int((t[0] * 1000 + t[1] // 1000) // window)

    async def wait_for_generation(g: int) -> None:  # Redis' clock: nothing to wait on
        while await gen_now() < g:  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    g = await gen_now() + 1
    await wait_for_generation(g)  # a fresh generation: no race with its end
    event = spot(1)
    first = (await producer.append([event, *[spot(i) for i in range(2, 2001)]]))[0]
    assert int(await client.hget(meta, "s")) == 2  # type: ignore[arg-type]
    await wait_for_generation(g + 1)
    [again] = await Producer(client, codec, keys, settings).append([event])
    assert again == (first.entry_id, True)  # found in the generation before
    prefix = keys.published_prefix("cluster")
    for shard in (0, 1):  # the generation before expires at the end of this one
        assert 0 < await client.pttl(f"{prefix}{g}:{shard}") <= window
    assert int(await client.hget(meta, "s")) == 128  # type: ignore[arg-type]  # 2000 / 24
    await wait_for_generation(g + 3)
    [fresh] = await Producer(client, codec, keys, settings).append([event])
    assert not fresh.duplicate  # two windows on: forgotten
    # after a gap of more than a window, the last generation written was deleted
    assert [k async for k in client.scan_iter(match=f"{prefix}{g + 1}:*")] == []


async def test_dedup_state_reports_records_shards_memory_and_producers(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    assert await dedup_state(client, keys, "cluster") is None
    producer = Producer(client, codec, keys, ProducerSettings(dedup_shards=4))
    await producer.publish_many([spot(i) for i in range(300)])
    await Producer(client, codec, keys).publish(spot(999))
    state = await dedup_state(client, keys, "cluster")
    assert state is not None
    assert (state.window_ms, state.records, state.shards, state.producers) == (
        86_400_000,
        301,
        4,
        2,
    )
    assert 300 * 10 < state.bytes < 300 * 100  # compact hashes: tens of bytes a record


def _uuid7_at(ms: int, tail: str) -> str:
    """A UUIDv7 text minted at ``ms`` (epoch ms), as a host with that clock would mint it."""
    h = f"{ms:012x}"
    return f"{h[:8]}-{h[8:]}-7000-8000-{tail:0>12}"


async def test_ids_minted_in_the_current_generation_skip_the_previous_one(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """A UUIDv7 id says when it was minted: one minted after the current generation began
    (plus the 60 s of clock skew allowed) cannot have a record in the previous generation, so
    that lookup is skipped. The rule, stated: a copy is still found when its producer's clock
    ran 30 s ahead of Redis', and no longer when it ran 2 min ahead."""
    window = 3000
    settings = ProducerSettings(dedup_window_ms=window)
    t: Any = await client.time()
    now = t[0] * 1000 + t[1] // 1000
    g = now // window + 1
    while (await client.time())[0] * 1000 < g * window:  # noqa: ASYNC110 - Redis' clock
        await asyncio.sleep(0.01)
    ahead_30s = spot(1, id=_uuid7_at(g * window + 30_000, "1"))
    ahead_2min = spot(2, id=_uuid7_at(g * window + 120_000, "2"))
    producer = Producer(client, codec, keys, settings)
    first = await producer.append([ahead_30s, ahead_2min])
    while (await client.time())[0] * 1000 < (g + 1) * window:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    again = await Producer(client, codec, keys, settings).append([ahead_30s, ahead_2min])
    assert again[0] == (first[0].entry_id, True)  # looked up in the previous generation
    assert not again[1].duplicate  # minted "later" than the skew allows: not looked up
    assert minted_ms(ahead_30s.id) == g * window + 30_000
    assert minted_ms("order-42") == 0


async def test_records_claimed_before_their_xadd_match_the_entries_written(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """Within one call, after the first recorded XADD, a record is claimed (HSETNX) under the
    id the next XADD is given: a call mixing recorded events, unrecorded ones (dedup=False,
    whose '*' ids end the known sequence), a copy within the same call and one from an earlier
    call writes each event once, in order, and every record names its own entry."""
    producer = Producer(client, codec, keys)
    [early] = await producer.append([spot(100, id="early")])
    names = ["a", "b", None, "c", "a", None, "d", "early", "e", "c"]
    events = [spot(i, id=n) if n else spot(i) for i, n in enumerate(names)]
    got = await producer.append(events, dedup=[n is not None for n in names])
    rows: Any = await client.xrange(keys.stream("cluster"))
    written = [r[0].decode() for r in rows][1:]
    fresh = [p.entry_id for p in got if not p.duplicate]
    assert fresh == written  # each written once, in order
    assert [p.duplicate for p in got] == [
        n in ("a", "c", "early") and i > 3 for i, n in enumerate(names)
    ]
    first = {n: p.entry_id for n, p in zip(names, got, strict=True) if n and not p.duplicate}
    assert got[4].entry_id == first["a"]
    assert got[9].entry_id == first["c"]
    assert got[7].entry_id == early.entry_id
    for n, entry in first.items():  # the record of each id is its own entry's id
        assert await find_record(client, keys, "cluster", n, window_ms=86_400_000) == entry
    assert await dedup_records(client, keys) == digests("early", "a", "b", "c", "d", "e")


async def test_a_refused_xadd_leaves_no_record_of_its_event(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """A stream at the end of its id space: the first event of a call takes the last id, the
    next one's XADD is refused. The call fails and the record claimed for the refused event
    is deleted (a record without its entry would make the event a duplicate for a window)."""
    stream = keys.stream("cluster")
    await client.xadd(stream, {"x": "1"}, id="9999999999999-18446744073709551614")
    producer = Producer(client, codec, keys)
    with pytest.raises(PublishError, match="refused"):
        await producer.append([spot(1, id="took-the-last"), spot(2, id="refused")])
    assert await dedup_records(client, keys) == digests("took-the-last")
    assert await client.xlen(stream) == 2
