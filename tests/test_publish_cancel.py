"""A ``publish`` cancelled before its write was sent writes nothing; a sent one is never resent
by the client library.

Each window where a publish waits before its bytes go out gets a test: the backpressure wait,
a connection taken from a full pool, a connection being (re)established, the script being
loaded again after NOSCRIPT (the queue behind an in-flight write is covered in
test_publish_path.py). In each, the caller is cancelled, the producer then publishes another
event, and the stream must hold only that one. Publishes use ``dedup=[False]``, so a write
that went out shows up as an entry.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from schemas import REGISTRY, SpotInterruption
from streamproc import Codec, Keys, Producer, ProducerSettings, RedisSettings, connect
from streamproc.errors import PublishError
from tests.helpers import spot
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(30)

CODEC: Codec[Any] = Codec(REGISTRY)


def make_producer(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, **settings: Any
) -> Producer:
    """A producer whose lag read stays cached for the test (no I/O before queuing)."""
    settings = {"lag_cache_ms": 60_000, **settings}
    return Producer(client, codec, keys, ProducerSettings(**settings), retry_timeout_s=5)


async def instance_ids(client: aioredis.Redis, keys: Keys) -> list[str]:
    """The instance ids of the spot interruptions in the stream, in stream order."""
    rows: Any = await client.xrange(keys.stream("cluster"))
    out: list[str] = []
    for _, fields in rows:
        event = CODEC.decode(fields)
        assert isinstance(event, SpotInterruption)
        out.append(event.instance_id)
    return out


async def turns(n: int = 10) -> None:
    """Let the loop run ``n`` times (tasks that need no I/O reach their next wait)."""
    for _ in range(n):
        await asyncio.sleep(0)


async def cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


@pytest.fixture
async def through(proxy: TcpProxy, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    """A streamproc client connected through the proxy (one connection at most)."""
    c = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix, max_connections=1))
    yield c
    await c.aclose()


# ---------------------------------------------------------------------- cancelled: nothing


async def test_cancelled_while_waiting_out_backpressure_writes_nothing(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys
) -> None:
    producer = make_producer(
        client, codec, keys, high_watermark=1, lag_cache_ms=10, backpressure_timeout_s=20
    )
    await client.xgroup_create(keys.stream("cluster"), "slow", id="0", mkstream=True)
    filler = make_producer(client, codec, keys)  # this one's lag cache stays cold
    await filler.append([spot(0), spot(1)], dedup=[False, False])  # lag 2 > 1
    waiting = asyncio.create_task(producer.append([spot(2)], dedup=[False]))
    await asyncio.sleep(0.1)  # several lag reads: it is waiting
    assert not waiting.done()
    await cancelled(waiting)
    await client.xgroup_setid(keys.stream("cluster"), "slow", id="$")  # lag 0
    await producer.append([spot(3)], dedup=[False])
    assert await instance_ids(client, keys) == ["i-0", "i-1", "i-3"]


async def test_cancelled_while_waiting_for_a_pooled_connection_writes_nothing(
    redis_url: str, codec: Codec[Any], keys: Keys, client: aioredis.Redis
) -> None:
    """The group was taken by the flusher, which then waits for a connection of a full pool:
    its write has not gone out, so a caller cancelled now must not be written."""
    one = connect(RedisSettings(url=redis_url, key_prefix=keys.prefix, max_connections=1))
    try:
        producer = make_producer(one, codec, keys)
        await producer.append([spot(0)], dedup=[False])  # lag cached, script loaded
        pool: Any = one.connection_pool
        held = await pool.get_connection()  # the pool's only connection
        publishing = asyncio.create_task(producer.append([spot(1)], dedup=[False]))
        await turns()  # the flusher took the group and waits for the connection
        await cancelled(publishing)
        await pool.release(held)
        await producer.append([spot(2)], dedup=[False])
        assert await instance_ids(client, keys) == ["i-0", "i-2"]
    finally:
        await one.aclose()


async def test_cancelled_while_the_connection_is_reestablished_writes_nothing(
    through: aioredis.Redis, codec: Codec[Any], keys: Keys, client: aioredis.Redis, proxy: TcpProxy
) -> None:
    """The connection was lost; the write waits for the new one's handshake (held by a stalled
    network: redis-py's connect sends CLIENT SETINFO and waits for the reply). Cancelled then,
    it must not go out once the network is back."""
    producer = make_producer(through, codec, keys)
    await producer.append([spot(0)], dedup=[False])
    accepted = proxy.accepted
    proxy.cut()
    proxy.pause()
    publishing = asyncio.create_task(producer.append([spot(1)], dedup=[False]))
    for _ in range(500):  # the flusher reconnects; its handshake is held
        if proxy.accepted > accepted:
            break
        await asyncio.sleep(0.01)
    assert proxy.accepted > accepted
    await cancelled(publishing)
    proxy.resume()
    await producer.append([spot(2)], dedup=[False])
    assert await instance_ids(client, keys) == ["i-0", "i-2"]


async def test_cancelled_while_the_script_is_loaded_again_writes_nothing(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOSCRIPT: nothing was written; the group is sent again after SCRIPT LOAD. A caller
    cancelled during the load is not part of what is sent again."""
    producer = make_producer(client, codec, keys)
    await producer.append([spot(0)], dedup=[False])
    await client.script_flush()
    loading = asyncio.Event()
    load = client.script_load

    async def script_load(source: str) -> Any:
        loading.set()
        return await load(source)

    monkeypatch.setattr(client, "script_load", script_load)
    gone = asyncio.create_task(producer.append([spot(1)], dedup=[False]))
    kept = asyncio.create_task(producer.append([spot(2)], dedup=[False]))
    await loading.wait()
    await cancelled(gone)
    await kept
    await producer.append([spot(3)], dedup=[False])
    assert await instance_ids(client, keys) == ["i-0", "i-2", "i-3"]


# ---------------------------------------------------------------------- sent: never twice


@pytest.mark.parametrize("library_retries", [False, True], ids=["streamproc-client", "redis-py"])
async def test_a_write_whose_reply_was_lost_is_not_resent_by_the_client_library(
    proxy: TcpProxy, codec: Codec[Any], keys: Keys, client: aioredis.Redis, library_retries: bool
) -> None:
    """Redis applied the XADD, the connection died before the reply: the publish fails
    (no time left for the producer's own retry) and nothing sends the XADD again, not even a
    plain redis-py client, which retries every command on connection errors by default."""
    if library_retries:
        c = aioredis.Redis(host=proxy.host, port=proxy.port)  # redis-py's defaults
        retry = c.get_retry()
        assert retry is not None
        assert retry.get_retries() > 0
    else:
        c = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix))
    try:
        producer = Producer(c, codec, keys, ProducerSettings(lag_cache_ms=60_000))
        await producer.append([spot(0)], dedup=[False])
        producer.retry_timeout_s = 0
        proxy.pause(to_server=False)  # requests reach Redis, replies are held
        publishing = asyncio.create_task(producer.append([spot(1)], dedup=[False]))
        for _ in range(500):
            if await client.xlen(keys.stream("cluster")) == 2:
                break
            await asyncio.sleep(0.01)
        assert await client.xlen(keys.stream("cluster")) == 2  # applied
        proxy.cut()
        proxy.resume()
        with pytest.raises(PublishError) as failed:
            await publishing
        assert isinstance(failed.value.__cause__, RedisConnectionError)
        # a library retry resends before the error reaches the caller: it would be here now
        assert await instance_ids(client, keys) == ["i-0", "i-1"]
    finally:
        await c.aclose()


async def test_a_publish_whose_reply_was_lost_is_resent_and_adds_nothing(
    proxy: TcpProxy, through: aioredis.Redis, codec: Codec[Any], keys: Keys, client: aioredis.Redis
) -> None:
    """The producer's own resend after a lost reply carries the same sequence: the script
    answers the entry the first send wrote and adds nothing. For the caller it is one publish,
    not a duplicate."""
    producer = make_producer(through, codec, keys)
    await producer.append([spot(0)])
    proxy.pause(to_server=False)
    event = spot(1)
    publishing = asyncio.create_task(producer.append([event]))
    for _ in range(500):
        if await client.xlen(keys.stream("cluster")) == 2:
            break
        await asyncio.sleep(0.01)
    rows: Any = await client.xrange(keys.stream("cluster"))
    first_id = rows[-1][0].decode()
    proxy.cut()
    proxy.resume()
    [produced] = await publishing
    assert produced.entry_id == first_id
    assert not produced.duplicate
    assert producer.duplicates == 0
    assert await instance_ids(client, keys) == ["i-0", "i-1"]
