"""The publish hot path against a real Redis: group commit, pre-packed RESP, hiredis packing.

Group commit is made deterministic by a long lag cache warmed before the concurrent calls:
``wait_for_capacity`` then answers without suspending, so every caller started in one
``gather`` is queued before the flusher first runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import hiredis
import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import DataError

from schemas import Notification
from streamproc import Codec, Event, Keys, Producer, ProducerSettings
from streamproc.errors import PublishError
from streamproc.producer import Produced, find_record, record_digest
from tests.helpers import dedup_records, digests, spot

pytestmark = pytest.mark.timeout(30)

TOPICS = ("cluster", "notify")
Placed = tuple[str, str]


def note(i: int, **kw: Any) -> Notification:
    """A notification (topic ``notify``) titled ``n-<i>``."""
    return Notification(cluster_id="c1", key="c1", title=f"n-{i}", **kw)


def warm_producer(client: aioredis.Redis, codec: Codec[Any], keys: Keys, **kw: Any) -> Producer:
    """A producer whose lag reads stay cached for the whole test."""
    return Producer(client, codec, keys, ProducerSettings(lag_cache_ms=60_000, **kw))


async def warm(producer: Producer) -> None:
    """Fill the lag cache of both topics and load the script (one write of its own)."""
    await producer.append([spot(10_000), note(10_000)])


async def stream(client: aioredis.Redis, codec: Codec[Any], key: str) -> dict[str, Event]:
    """entry id -> decoded event, in stream order."""
    rows: Any = await client.xrange(key)
    return {i.decode(): codec.decode(f) for i, f in rows}


async def streams(client: aioredis.Redis, codec: Codec[Any], keys: Keys) -> dict[Placed, Event]:
    """(topic, entry id) -> decoded event for both topics (entry ids repeat across streams)."""
    out: dict[Placed, Event] = {}
    for topic in TOPICS:
        for i, e in (await stream(client, codec, keys.stream(topic))).items():
            out[topic, i] = e
    return out


def placed(events: Sequence[Event], produced: Sequence[Produced]) -> list[Placed]:
    return [(e.topic, p.entry_id) for e, p in zip(events, produced, strict=True)]


async def evalsha_calls(client: aioredis.Redis) -> int:
    stats: dict[str, Any] = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def hiredis_pack(*args: Any) -> bytes:
    pack: Any = hiredis.pack_command  # its stub types the tuple as one item long
    return bytes(pack(args))


def new_connection(client: aioredis.Redis) -> Any:
    """A connection of the client's pool, unconnected: for its packer."""
    pool: Any = client.connection_pool
    return pool.make_connection()


async def markers(client: aioredis.Redis, keys: Keys, topic: str) -> set[bytes]:
    """The digests of the producer's dedup records of ``topic``."""
    return await dedup_records(client, keys, topic)


# ---------------------------------------------------------------------- group commit


async def test_concurrent_callers_share_one_script_call_per_topic_and_get_their_own_ids(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = warm_producer(client, codec, keys)
    await warm(producer)
    calls: list[list[Event]] = []
    for c in range(20):
        n = c % 5 + 1
        if c % 3 == 0:  # mixed topics, interleaved
            calls.append([spot(c * 10 + j) if j % 2 else note(c * 10 + j) for j in range(n)])
        elif c % 3 == 1:
            calls.append([spot(c * 10 + j) for j in range(n)])
        else:
            calls.append([note(c * 10 + j) for j in range(n)])
    before = await evalsha_calls(client)
    results = await asyncio.gather(*(producer.append(evs) for evs in calls))
    script_calls = await evalsha_calls(client) - before

    assert script_calls < len(calls)  # coalesced
    assert script_calls == len(TOPICS)  # all 20 were queued before the flush: one per topic
    written = await streams(client, codec, keys)
    total = sum(len(evs) for evs in calls)
    assert len(written) == total + 2  # + the warm-up's two
    seen: set[Placed] = set()
    for evs, produced in zip(calls, results, strict=True):
        assert len(produced) == len(evs)
        assert all(isinstance(p, Produced) and not p.duplicate for p in produced)
        assert [written[at] for at in placed(evs, produced)] == evs  # its events, its order
        for topic in TOPICS:  # and in the stream in that order
            ids = [p.entry_id for e, p in zip(evs, produced, strict=True) if e.topic == topic]
            assert [tuple(map(int, i.split("-"))) for i in ids] == sorted(
                tuple(map(int, i.split("-"))) for i in ids
            )
        seen.update(placed(evs, produced))
    assert len(seen) == total
    assert producer.duplicates == 0


async def test_coalesce_max_events_bounds_a_group(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = warm_producer(client, codec, keys, coalesce_max_events=4)
    await warm(producer)
    calls = [[spot(c * 10), spot(c * 10 + 1)] for c in range(4)]
    before = await evalsha_calls(client)
    results = await asyncio.gather(*(producer.append(evs) for evs in calls))
    assert await evalsha_calls(client) - before == 2  # 2 + 2 events per group, 4 callers
    written = await stream(client, codec, keys.stream("cluster"))
    for evs, produced in zip(calls, results, strict=True):
        assert [written[p.entry_id] for p in produced] == evs


async def _two_callers(
    producer: Producer, first: Event, second: list[Event], *, cancel: bool, in_flight: bool
) -> tuple[list[Produced], list[Produced] | None]:
    """Start ``first``; queue ``second`` behind it (after its write went out, if ``in_flight``);
    cancel ``second`` before the flusher takes it, if ``cancel``."""
    a = asyncio.create_task(producer.append([first]))
    if in_flight:  # a queues and its write starts: the flusher awaits Redis' reply
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    b = asyncio.create_task(producer.append(second))
    await asyncio.sleep(0)  # b runs up to its wait (the lag cache answers without I/O)
    assert not b.done()
    if cancel:
        b.cancel()
    got_a = await a
    if cancel:
        with pytest.raises(asyncio.CancelledError):
            await b
        return got_a, None
    return got_a, await b


@pytest.mark.parametrize("in_flight", [False, True], ids=["before-flush", "during-write"])
async def test_a_caller_cancelled_while_queued_writes_nothing(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, in_flight: bool
) -> None:
    producer = warm_producer(client, codec, keys)
    await warm(producer)
    # Control: the same steps without the cancel write b's events (so b was really queued).
    before = await evalsha_calls(client)
    a0, b0 = await _two_callers(
        producer, spot(1), [spot(2), note(2)], cancel=False, in_flight=False
    )
    assert await evalsha_calls(client) - before == 2  # b went out with a: one call per topic
    assert b0 is not None
    assert [p.duplicate for p in [*a0, *b0]] == [False, False, False]

    first, gone, gone_note = spot(3), spot(4), note(4)
    got, _ = await _two_callers(
        producer, first, [gone, gone_note], cancel=True, in_flight=in_flight
    )
    late = spot(5)
    [after] = await producer.append([late])  # the producer goes on

    written = await streams(client, codec, keys)
    assert sorted(e.instance_id for e in written.values() if isinstance(e, type(late))) == [
        "i-1",
        "i-10000",
        "i-2",
        "i-3",
        "i-5",
    ]
    assert sorted(e.title for e in written.values() if isinstance(e, Notification)) == [
        "n-10000",
        "n-2",
    ]
    assert written["cluster", got[0].entry_id] == first
    assert written["cluster", after.entry_id] == late
    assert record_digest(gone.id) not in await markers(client, keys, "cluster")
    assert record_digest(gone_note.id) not in await markers(client, keys, "notify")
    assert record_digest(first.id) in await markers(client, keys, "cluster")


# ---------------------------------------------------------------------- errors


async def test_an_error_reply_fails_the_write_and_leaves_the_connection_in_step(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = warm_producer(client, codec, keys)
    await warm(producer)
    await client.delete(keys.stream("notify"))
    await client.set(keys.stream("notify"), "not a stream")
    # One caller, two script calls in one write: the first is refused (WRONGTYPE), the second's
    # reply is never read; the connection must not go back to the pool with it unread.
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await producer.append([note(1), spot(1)])
    with pytest.raises(PublishError, match="WRONGTYPE"):
        await producer.append([note(2)])

    good = spot(2)
    [ok] = await producer.append([good])
    cluster = await stream(client, codec, keys.stream("cluster"))
    assert cluster[ok.entry_id] == good
    for n in range(5):  # each reply answers its own command
        await client.set(keys.state("probe", str(n)), f"v{n}")
        assert await client.get(keys.state("probe", str(n))) == f"v{n}".encode()
        assert await client.incrby(keys.state("count"), n + 1) == sum(range(1, n + 2))
    assert await client.get(keys.stream("notify")) == b"not a stream"
    assert await client.ping() is True


async def test_an_error_on_one_topic_does_not_fail_other_callers_coalesced_with_it(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    """Each caller gets its own result or exception (producer.py's docstring)."""
    producer = warm_producer(client, codec, keys)
    await warm(producer)
    await client.delete(keys.stream("notify"))
    await client.set(keys.stream("notify"), "not a stream")
    good = spot(1)
    bad, ok = await asyncio.gather(
        producer.append([note(1)]), producer.append([good]), return_exceptions=True
    )
    assert isinstance(bad, PublishError)
    cluster = await stream(client, codec, keys.stream("cluster"))
    assert list(cluster.values())[1:] == [good]  # it was written
    assert not isinstance(ok, BaseException), f"a write that went in was reported as {ok!r}"
    assert cluster[ok[0].entry_id] == good


async def test_noscript_reloads_the_script_and_writes_each_event_once(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = warm_producer(client, codec, keys)
    await warm(producer)
    await client.script_flush()
    calls: list[list[Event]] = [[spot(1), note(1)], [spot(2)], [note(3)]]
    results = await asyncio.gather(
        *(producer.append(evs, dedup=[False] * len(evs)) for evs in calls)
    )
    written = await streams(client, codec, keys)
    assert len(written) == 2 + 4  # nothing written twice by the second send
    for evs, produced in zip(calls, results, strict=True):
        assert [written[at] for at in placed(evs, produced)] == evs
    await client.script_flush()
    lone = spot(4)
    [again] = await producer.append([lone])  # a lone caller too
    assert (await stream(client, codec, keys.stream("cluster")))[again.entry_id] == lone


# ---------------------------------------------------------------------- dedup flags


async def test_dedup_false_skips_the_marker_and_the_check(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    e = spot(1)
    a = await producer.append([e], dedup=[False])
    b = await producer.append([e], dedup=[False])
    assert await markers(client, keys, "cluster") == set()
    assert a[0].entry_id != b[0].entry_id
    assert not a[0].duplicate
    assert not b[0].duplicate
    assert await client.xlen(keys.stream("cluster")) == 2


async def test_by_default_a_second_append_is_a_duplicate_of_the_first(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    e = spot(1)
    [first] = await producer.append([e])
    [second] = await producer.append([e])
    assert first == Produced(first.entry_id, False)
    assert second == Produced(first.entry_id, True)
    assert await client.xlen(keys.stream("cluster")) == 1
    assert producer.duplicates == 1
    window = producer.settings.dedup_window_ms
    assert await find_record(client, keys, "cluster", e.id, window_ms=window) == first.entry_id
    [shard] = [k async for k in client.scan_iter(match=keys.published_prefix("cluster") + "[0-9]*")]
    assert await client.pttl(shard) == -1  # the current generation: expiry set when it ends
    # publish/publish_many answer the first id too
    assert await producer.publish(e) == first.entry_id
    assert await client.xlen(keys.stream("cluster")) == 1


async def test_dedup_flags_apply_per_event(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    marked, unmarked, other = spot(1), spot(2), note(3)
    out = await producer.append([marked, unmarked, other], dedup=[True, False, True])
    assert await markers(client, keys, "cluster") == digests(marked.id)
    assert await markers(client, keys, "notify") == digests(other.id)
    again = await producer.append([marked, unmarked, other], dedup=[True, False, True])
    assert [p.duplicate for p in again] == [True, False, True]
    assert again[0].entry_id == out[0].entry_id
    assert again[2].entry_id == out[2].entry_id
    assert again[1].entry_id != out[1].entry_id
    assert await client.xlen(keys.stream("cluster")) == 3
    assert await client.xlen(keys.stream("notify")) == 1


async def test_idempotency_keys_replace_the_event_id_in_the_marker(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    e1, e2, e3 = spot(1), spot(2), spot(3)
    out = await producer.append([e1, e3], idempotency_keys=["req-1", None])
    assert await markers(client, keys, "cluster") == digests("req-1", e3.id)
    # a different event under the same key is the same publish
    [dup] = await producer.append([e2], idempotency_keys=["req-1"])
    assert dup == Produced(out[0].entry_id, True)
    assert await client.xlen(keys.stream("cluster")) == 2
    # ...and the event id alone is no longer what dedups e1
    [fresh] = await producer.append([e1])
    assert not fresh.duplicate
    assert await client.xlen(keys.stream("cluster")) == 3


async def test_mismatched_lengths_are_refused_before_anything_is_written(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    with pytest.raises(ValueError, match="idempotency_keys"):
        await producer.append([spot(1), spot(2)], idempotency_keys=["k"])
    with pytest.raises(ValueError, match="dedup"):
        await producer.append([spot(1)], dedup=[True, False])
    with pytest.raises(ValueError, match="dedup"):
        await producer.append([spot(1), spot(2)], dedup=[])
    assert await client.exists(keys.stream("cluster")) == 0
    assert await producer.append([]) == []


# ---------------------------------------------------------------------- codec


CODEC_EVENTS = [
    pytest.param(
        spot(
            1, occurred_at=datetime(2026, 1, 1, 2, 15, 0, 123456, tzinfo=ZoneInfo("Europe/Berlin"))
        ),
        "2026-01-01T01:15:00.123Z",
        id="zoneinfo",
    ),
    pytest.param(
        spot(
            2,
            occurred_at=datetime(
                2026, 1, 1, 0, 0, 0, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30))
            ),
        ),
        "2025-12-31T18:30:00.999Z",
        id="fixed-offset-999999us",
    ),
    pytest.param(
        spot(3, occurred_at=datetime(2026, 11, 23, 10, 15, 0, 0, tzinfo=UTC)),
        "2026-11-23T10:15:00.000Z",
        id="utc-0us",
    ),
    pytest.param(
        spot(4, occurred_at=datetime(2026, 11, 23, 10, 15, 0, 999, tzinfo=UTC)),
        "2026-11-23T10:15:00.000Z",
        id="utc-999us",
    ),
    pytest.param(
        spot(5, occurred_at=datetime(2026, 11, 23, 10, 15, 7, 120000, tzinfo=UTC)),
        "2026-11-23T10:15:07.120Z",
        id="utc-120000us",
    ),
    pytest.param(
        Notification(
            cluster_id="c1",
            key="clé-集群-⚡",
            title="über «alerte»",
            occurred_at=datetime(
                2026, 6, 30, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=-7))
            ),
        ),
        "2026-07-01T06:59:59.999Z",
        id="non-ascii-key",
    ),
]


@pytest.mark.parametrize(("event", "ts"), CODEC_EVENTS)
def test_encode_resp_is_the_resp_packing_of_encode(
    codec: Codec[Any], event: Event, ts: str
) -> None:
    fields = codec.encode(event)
    assert fields[b"ts"] == ts.encode()
    assert len(fields[b"ts"]) == 24
    assert fields[b"ts"].endswith(b"Z")
    assert fields[b"key"] == event.key.encode()
    flat = [x for pair in fields.items() for x in pair]
    packed = hiredis_pack("X", *flat)
    head = b"*13\r\n$1\r\nX\r\n"
    assert packed.startswith(head)
    assert codec.encode_resp(event) == packed[len(head) :]
    assert codec.decode(fields) == event


# ---------------------------------------------------------------------- hiredis packing


@pytest.mark.parametrize(
    "value",
    ["text", "été ⚡ 集群", b"\x00\xff raw\r\n", 0, -7, 10**30, 1.5, 0.1, 1e20, -2.5e-8],
)
async def test_arguments_round_trip_through_the_fast_packer(
    client: aioredis.Redis, keys: Keys, value: Any
) -> None:
    key = keys.state("v")
    assert await client.set(key, value) is True
    expected = (
        value
        if isinstance(value, bytes)
        else value.encode()
        if isinstance(value, str)
        else repr(value).encode()
    )
    assert await client.get(key) == expected
    conn = new_connection(client)
    assert b"".join(conn.pack_command("SET", key, value)) == b"".join(
        AbstractConnection.pack_command(conn, "SET", key, value)
    )


async def test_the_client_packs_with_hiredis_and_pipelines_round_trip(
    client: aioredis.Redis, keys: Keys
) -> None:
    conn = new_connection(client)
    # a memoryview: redis-py's packer keeps it as a chunk of its own, hiredis copies it in
    assert conn.pack_command("SET", "k", memoryview(b"ab")) == [
        hiredis_pack("SET", "k", memoryview(b"ab"))
    ]
    big = "é" * 70_000  # past redis-py's buffer cutoff
    values: list[Any] = [memoryview(b"mv"), big, b"\r\n", 3, 2.25, "ü"]
    async with client.pipeline(transaction=False) as pipe:
        for n, v in enumerate(values):
            pipe.set(keys.state("p", str(n)), v)
            pipe.get(keys.state("p", str(n)))
        replies = await pipe.execute()
    assert replies[1::2] == [b"mv", big.encode(), b"\r\n", b"3", b"2.25", "ü".encode()]
    assert replies[0::2] == [True] * len(values)


@pytest.mark.parametrize("value", [True, False, None])
async def test_bool_and_none_arguments_raise_data_error(
    client: aioredis.Redis, keys: Keys, value: Any
) -> None:
    with pytest.raises(DataError, match="Invalid input of type"):
        await client.set(keys.state("v"), value)
    assert await client.set(keys.state("v"), "after") is True  # nothing half-sent
    assert await client.get(keys.state("v")) == b"after"


async def test_two_word_command_names_are_split(client: aioredis.Redis, keys: Keys) -> None:
    async with client.client() as one:  # one connection: the name stays on it
        execute: Any = one.execute_command
        assert await execute("CLIENT SETNAME", "streamproc-test") is True
        assert await execute(b"CLIENT GETNAME") == b"streamproc-test"
        assert await execute("CLIENT", "GETNAME") == b"streamproc-test"
        await one.set(keys.state("n"), 123)
        assert await execute(b"OBJECT ENCODING", keys.state("n")) == b"int"
