"""Chaos: consumers SIGKILLed at random, Redis killed and restarted. Nothing lost, nothing twice.

Bounded in count and time. STREAMPROC_CHAOS_SCALE scales the event count (default 1 = 20,000
events); run longer locally with e.g. STREAMPROC_CHAOS_SCALE=10.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
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
from tests.helpers import entries, spot

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SCALE = float(os.environ.get("STREAMPROC_CHAOS_SCALE", "1"))
ROOT = Path(__file__).resolve().parent.parent


def start_worker(name: str, redis_url: str, keys: Keys) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos_worker", name],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_consumers_killed_at_random_apply_every_effect_exactly_once(
    redis_url: str, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    total = int(20_000 * SCALE)
    await client.xgroup_create(keys.stream("cluster"), "chaos", id="0", mkstream=True)
    names = ["w0", "w1", "w2"]
    workers = {n: start_worker(n, redis_url, keys) for n in names}
    kills = 0
    rng = random.Random(7)
    started = time.monotonic()
    try:
        published = 0
        next_kill = time.monotonic() + 1.0
        deadline = time.monotonic() + 60 + 30 * SCALE
        while time.monotonic() < deadline:
            if published < total:
                batch = [spot(published + i) for i in range(min(500, total - published))]
                await producer.publish_many(batch)
                published += len(batch)
            if time.monotonic() >= next_kill and (published < total or kills < 5):
                victim = rng.choice(names)
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                workers[victim] = start_worker(victim, redis_url, keys)
                kills += 1
                next_kill = time.monotonic() + rng.uniform(0.7, 1.3)
            done = await client.hlen(keys.state("effects"))
            if published == total and done == total and kills >= 5:
                summary: Any = await client.xpending(keys.stream("cluster"), "chaos")
                if summary["pending"] == 0:
                    break
            await asyncio.sleep(0.05 if published >= total else 0)
    finally:
        for p in workers.values():
            p.send_signal(signal.SIGTERM)
        for p in workers.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - started
    counts = await client.hgetall(keys.state("effects"))
    twice = {k: v for k, v in counts.items() if v != b"1"}
    pending: Any = await client.xpending(keys.stream("cluster"), "chaos")
    dead = await client.xlen(keys.dlq("cluster", "chaos"))
    print(
        f"\nchaos: {total} events, 3 consumers, {kills} SIGKILLs, {elapsed:.1f}s "
        f"({total / elapsed:.0f} events/s through the kills); effects applied: {len(counts)}, "
        f"more than once: {len(twice)}, pending: {pending['pending']}, dead letters: {dead}"
    )
    assert kills >= 5
    assert len(counts) == total
    assert twice == {}
    assert pending["pending"] == 0
    assert dead == 0


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_redis_killed_and_restarted_with_aof(
    tmp_path: Path, keys: Keys, codec: Codec[Any], appendfsync: str
) -> None:
    """Publishing and consuming go on across a SIGKILLed Redis. With appendfsync always no
    publish that returned is lost; with everysec the loss window is measured and printed."""
    server = EmbeddedRedis(tmp_path / "redis", appendfsync=appendfsync).start()
    settings = RedisSettings(
        url=server.url, key_prefix=keys.prefix, socket_timeout_s=1, connect_timeout_s=0.5
    )
    client = connect(settings)
    producer = Producer(client, codec, keys, ProducerSettings(), retry_timeout_s=20)

    async def record(event: SpotInterruption, ctx: Context) -> None:
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)

    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: record}),
        client=connect(settings),
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1", block_ms=200, min_idle_ms=1000),
    )
    running = asyncio.create_task(consumer.run())
    returned: list[str] = []
    ids: list[str] = []
    total = int(3000 * min(SCALE, 3))
    try:
        for i in range(total):
            event = spot(i)
            returned.append(await producer.publish(event))
            ids.append(event.id)
            if i == total // 2:
                server.stop(kill=True)
                server.start()  # same port and folder: the AOF is replayed
        for _ in range(600):
            if await client.hlen(keys.state("effects")) >= total:
                break
            await asyncio.sleep(0.05)
        present = {i.decode() for i, _ in await entries(client, keys.stream("cluster"))}
        lost = [r for r in returned if r not in present]
        counts = await client.hgetall(keys.state("effects"))
        print(
            f"\nappendfsync {appendfsync}: {len(returned)} publishes returned, "
            f"{len(lost)} lost by the crash; effects applied {len(counts)}, "
            f"twice {sum(v != b'1' for v in counts.values())}"
        )
        if appendfsync == "always":
            assert lost == []
            assert len(counts) == total
            assert all(v == b"1" for v in counts.values())
        else:
            # everysec: up to ~1 s of writes may go; what survived is applied exactly once
            assert all(v == b"1" for v in counts.values())
        assert consumer.ready
    finally:
        consumer.stop()
        await running
        await consumer.client.aclose()
        await client.aclose()
        server.stop()
