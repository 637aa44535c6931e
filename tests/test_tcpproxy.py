"""The test TCP proxy against the real Redis: it forwards, cuts, stalls and refuses on cue.

No assertion here rests on how long something took: "held" is checked by what the server has
(or has not) seen, "completed after the stall" by the order of events.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from urllib.parse import urlparse

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from streamproc import Keys, RedisSettings, connect
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


@pytest.fixture
async def through(proxy: TcpProxy, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    """A streamproc client (no automatic retries) connected through the proxy."""
    c = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix))
    assert await c.ping() is True  # connected before any test pauses the proxy
    yield c
    await c.aclose()


async def until(check: object, *, what: str, timeout_s: float = 10.0) -> None:
    """Poll an async predicate until it holds (a condition, not a duration)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def blocked_clients(client: aioredis.Redis) -> int:
    return int((await client.info("clients"))["blocked_clients"])


async def test_commands_and_large_values_pass_through_unchanged(
    through: aioredis.Redis, client: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    big = bytes(range(256)) * 8192  # 2 MiB, every byte value: several chunks each way
    assert await through.set(keys.state("big"), big) is True
    assert await client.get(keys.state("big")) == big
    assert await through.get(keys.state("big")) == big
    async with through.pipeline(transaction=False) as pipe:
        for _ in range(100):
            pipe.incr(keys.state("n"))
        assert await pipe.execute() == list(range(1, 101))
    assert proxy.connections >= 1


async def test_a_cut_fails_the_command_in_flight_and_the_client_reconnects(
    through: aioredis.Redis, client: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    before = await blocked_clients(client)
    waiting = asyncio.ensure_future(through.blpop([keys.state("never")], timeout=3))
    await until(lambda: _more(blocked_clients(client), before), what="the BLPOP to reach Redis")
    accepted = proxy.accepted

    assert proxy.cut() >= 1
    with pytest.raises(RedisConnectionError):
        await waiting
    # both sides went: the server drops the blocked client too
    await until(lambda: _equal(blocked_clients(client), before), what="Redis to see the cut")
    assert proxy.connections == 0

    assert await through.set(keys.state("after"), "ok") is True  # a new connection
    assert await client.get(keys.state("after")) == b"ok"
    assert proxy.accepted > accepted


async def test_pause_holds_a_command_until_resume(
    through: aioredis.Redis, client: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    proxy.pause()
    assert proxy.paused
    setting = asyncio.ensure_future(through.set(keys.state("held"), "v"))
    done, _ = await asyncio.wait({setting}, timeout=0.3)
    assert not done
    assert await client.get(keys.state("held")) is None  # Redis has not seen it
    assert proxy.connections >= 1  # the socket stays open
    proxy.resume()
    assert not proxy.paused
    assert await setting is True
    assert await client.get(keys.state("held")) == b"v"


async def test_stall_holds_traffic_then_the_command_completes(
    through: aioredis.Redis, client: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    stalled = proxy.stall(0.5)
    assert proxy.paused
    assert await through.incr(keys.state("n")) == 1
    # the reply came through only once the stall had ended
    assert stalled.done()
    assert not proxy.paused
    assert await client.get(keys.state("n")) == b"1"


async def test_a_pause_during_a_stall_takes_over_its_timer(
    through: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    stalled = proxy.stall(0.2)
    proxy.pause()
    await asyncio.wrap_future(stalled)
    assert proxy.paused  # the stall's timer ran out but resumed nothing
    proxy.resume()
    assert await through.ping() is True


async def test_holding_replies_only_lets_redis_apply_a_command_nobody_hears_back_from(
    through: aioredis.Redis, client: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    """One direction paused: the command is applied, its reply is held; then a cut. The
    client sees a connection error and, having no automatic retries, sends nothing again."""
    proxy.pause(to_server=False)
    adding = asyncio.ensure_future(through.incr(keys.state("n")))
    await until(lambda: _equal(client.get(keys.state("n")), b"1"), what="Redis to apply it")
    assert not adding.done()
    proxy.cut()
    proxy.resume()
    with pytest.raises(RedisConnectionError):
        await adding
    assert await through.ping() is True
    assert await client.get(keys.state("n")) == b"1"


async def test_refuse_rejects_new_connections_and_keeps_open_ones(
    through: aioredis.Redis, keys: Keys, proxy: TcpProxy
) -> None:
    port = proxy.port
    proxy.refuse(True)
    late = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix, connect_timeout_s=1))
    try:
        with pytest.raises(RedisConnectionError):
            await late.ping()
        assert await through.ping() is True  # the open connection still works
        proxy.refuse(False)
        assert proxy.port == port
        assert await late.ping() is True
    finally:
        await late.aclose()


async def test_stop_closes_every_connection(
    redis_url: str, client: aioredis.Redis, keys: Keys
) -> None:
    url = urlparse(redis_url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 6379).start()
    c = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix, connect_timeout_s=1))
    try:
        assert await c.ping() is True
        before = await blocked_clients(client)
        waiting = asyncio.ensure_future(c.blpop([keys.state("never")], timeout=3))
        await until(lambda: _more(blocked_clients(client), before), what="the BLPOP")
        proxy.stop()
        with pytest.raises(RedisConnectionError):
            await waiting
        with pytest.raises(RedisConnectionError):
            await c.ping()
    finally:
        proxy.stop()
        await c.aclose()


async def _more(value: object, than: int) -> bool:
    return int(await value) > than  # type: ignore[misc]


async def _equal(value: object, to: object) -> bool:
    return bool(await value == to)  # type: ignore[misc]
