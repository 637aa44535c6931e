"""Redis outages a consumer must ride out (issue 11, A5 and A6), on a redis-server of the
test's own: filled to maxmemory, and stopped with SIGSTOP longer than ``min_idle_ms``."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.embedded import EmbeddedRedis
from tests.helpers import spot

pytestmark = pytest.mark.slow


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedRedis, aioredis.Redis]]:
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    client = connect(RedisSettings(url=server.url))
    try:
        yield server, client
    finally:
        await client.aclose()
        server.stop(kill=True)


def make(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, handler: Any, name: str, **s: Any
) -> Consumer:
    concern = Concern(group="g", topics=("cluster",), handlers={SpotInterruption: handler})
    return Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys, ProducerSettings()),
        settings=ConsumerSettings(consumer=name, block_ms=50, **s),
    )


async def until(cond: Any, timeout_s: float = 20) -> None:
    """Poll a condition on another object's state (no event to wait on)."""
    for _ in range(int(timeout_s / 0.02)):
        if cond():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_a5_out_of_memory_is_an_outage_not_a_crash(
    own_redis: tuple[EmbeddedRedis, aioredis.Redis], codec: Codec[Any], keys: Keys
) -> None:
    """Redis at maxmemory (noeviction). Successes still settle: the settle's XACK, which Redis
    does not refuse for memory (it frees some), is the script's first write, and Redis checks
    memory only before a script's first write, so the effects of an acked entry apply with it.
    Failures cannot be scheduled (the retry's marker is refused): the consumer reports
    not-ready and backs off, keeps running, and settles everything exactly once when memory
    is available again."""
    _, client = own_redis

    gate = asyncio.Event()
    calls: dict[str, int] = {}

    async def effect(event: SpotInterruption, ctx: Context) -> None:
        await gate.wait()
        calls[event.id] = calls.get(event.id, 0) + 1
        if event.instance_id.endswith(("1", "3", "5", "7", "9")) and calls[event.id] == 1:
            raise RuntimeError("transient: try again")
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)

    c = make(client, codec, keys, effect, "c1")
    task = asyncio.create_task(c.run())
    await until(lambda: c.ready)
    sent = [spot(i) for i in range(20)]
    await Producer(client, codec, keys, ProducerSettings()).publish_many(sent)
    await until(lambda: c.in_flight == 20)
    used = int((await client.info("memory"))["used_memory"])
    await client.config_set("maxmemory", used)
    gate.set()
    try:
        await until(lambda: not c.ready and "OOM" in c.guard.reason.upper())
        for _ in range(500):  # the successes settled (their settle's reply came with the
            if await client.hlen(keys.state("effects")) == 10:  # failures' refusal: resent)
                break
            await asyncio.sleep(0.02)
        assert await client.hlen(keys.state("effects")) == 10
        assert not task.done()  # backing off, not crashed
        assert c.stats.retried == 0  # no failure could be scheduled
    finally:
        await client.config_set("maxmemory", 0)
    await until(lambda: c.stats.acked + c.stats.refused == 20)
    await until(lambda: c.ready)
    c.stop()
    await task
    counts: Any = await client.hgetall(keys.state("effects"))
    assert sorted(counts.values()) == [b"1"] * 20
    assert int((await client.xpending(keys.stream("cluster"), "g"))["pending"]) == 0


async def test_a6_no_stealing_after_redis_was_stopped_longer_than_min_idle(
    own_redis: tuple[EmbeddedRedis, aioredis.Redis], codec: Codec[Any], keys: Keys
) -> None:
    """Redis stopped (SIGSTOP) for 1 s, min_idle_ms=300: when it resumes every in-flight
    entry looks idle, but the owner renews before anyone may reclaim: one run, not two."""
    server, client = own_redis
    assert server.proc is not None
    runs: list[str] = []

    async def slow(event: SpotInterruption, ctx: Context) -> None:
        runs.append(ctx.consumer)
        await asyncio.sleep(2.5)

    a = make(client, codec, keys, slow, "a", min_idle_ms=300)
    b = make(client, codec, keys, slow, "b", min_idle_ms=300)
    await a.ensure_groups()
    await Producer(client, codec, keys, ProducerSettings()).publish(spot(1))
    task_a = asyncio.create_task(a.run())
    await until(lambda: bool(runs))
    task_b = asyncio.create_task(b.run())
    await asyncio.sleep(0.4)  # b is up and reclaiming on its period
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(1.0)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    await until(lambda: a.stats.acked == 1)
    a.stop()
    b.stop()
    await asyncio.gather(task_a, task_b)
    assert runs == ["a"]
    assert b.stats.reclaimed == 0
