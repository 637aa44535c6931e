"""The ticker against a real Redis: lease, fencing, missed-tick policies, failover by SIGKILL."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamproc import Codec, Keys, Producer
from streamproc._lease import Lease
from streamproc.schedule import MissedPolicy, Schedule, Tick, every
from streamproc.ticker import Ticker, TickerSettings
from tests.helpers import entries


def fast(missed: MissedPolicy = "latest", **kw: Any) -> Schedule:
    return Schedule(name="fast", trigger=every(1), event=Tick, missed=missed, **kw)


def make_ticker(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    node: str,
    *schedules: Schedule,
    ttl_ms: int = 1000,
) -> Ticker:
    return Ticker(
        schedules or (fast(),),
        client=client,
        producer=producer,
        keys=keys,
        settings=TickerSettings(node=node, lease_ttl_ms=ttl_ms),
    )


async def ticks(client: aioredis.Redis, keys: Keys, codec: Codec[Any]) -> list[Tick]:
    return [codec.decode(f) for _, f in await entries(client, keys.stream("ticks"))]


async def test_lease_is_exclusive_and_fenced(client: aioredis.Redis, keys: Keys) -> None:
    a = Lease(client, keys, "a", ttl_ms=300)
    b = Lease(client, keys, "b", ttl_ms=300)
    assert await a.acquire()
    assert not await b.acquire()
    assert await a.renew()
    await a.release()
    assert not a.held()
    assert await b.acquire()
    assert b.fence == 2  # INCR on every acquisition
    assert await client.get(keys.ticker_lease()) == b"b/2"
    await b.release()
    assert await client.get(keys.ticker_lease()) is None


async def test_lease_renew_fails_after_another_took_over(
    client: aioredis.Redis, keys: Keys
) -> None:
    a = Lease(client, keys, "a", ttl_ms=200)
    b = Lease(client, keys, "b", ttl_ms=1000)
    assert await a.acquire()
    await asyncio.sleep(0.25)  # a was paused past its TTL
    assert not a.held()
    assert await b.acquire()
    assert not await a.renew()
    await a.release()  # compare-and-delete: leaves b's lease alone
    assert await client.get(keys.ticker_lease()) == f"b/{b.fence}".encode()


async def test_lease_scripts_are_loaded_again_after_script_flush(
    client: aioredis.Redis, keys: Keys
) -> None:
    """NOSCRIPT (Redis restarted, SCRIPT FLUSH): each lease script is loaded again and runs."""
    a = Lease(client, keys, "a", ttl_ms=1000)
    await client.script_flush()
    assert await a.acquire()
    assert a.fence == 1
    await client.script_flush()
    assert await a.renew()
    await client.script_flush()
    await a.release()
    assert await client.get(keys.ticker_lease()) is None


@pytest.mark.parametrize(
    ("policy", "expected_offsets", "missed"),
    [("skip", [], 0), ("latest", [10], 9), ("catch_up", [8, 9, 10], 7)],
)
async def test_missed_tick_policies_after_downtime(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    codec: Codec[Any],
    policy: MissedPolicy,
    expected_offsets: list[int],
    missed: int,
) -> None:
    """Last fired at T0, back at T0+10.5 s: skip fires none, latest one, catch-up the last 3."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    await client.hset(keys.ticker_last(), "fast", int(t0.timestamp() * 1000))
    ticker = make_ticker(client, producer, keys, "a", fast(policy, grace_s=0.2, catch_up_max=3))
    assert await ticker.lease.acquire()
    await ticker.load_state()
    await ticker.fire_due(t0 + timedelta(seconds=10.5))
    got = await ticks(client, keys, codec)
    assert [t.scheduled_for for t in got] == [t0 + timedelta(seconds=n) for n in expected_offsets]
    if got:
        assert got[-1].missed == missed
        assert all(t.fence == ticker.lease.fence for t in got)
    last: Any = await client.hget(keys.ticker_last(), "fast")
    assert int(last) == int((t0 + timedelta(seconds=10)).timestamp() * 1000)
    # Recorded: the same instant again fires nothing more.
    assert await ticker.fire_due(t0 + timedelta(seconds=10.5)) == []


async def test_two_leaders_publish_one_tick_and_the_stale_one_is_fenced_off(
    client: aioredis.Redis, producer: Producer, keys: Keys, codec: Codec[Any]
) -> None:
    """Redis lost the lease while A still believed it held it: B leads, both fire, one tick."""
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    await client.hset(keys.ticker_last(), "fast", int(t0.timestamp() * 1000))
    # Leases long enough that a busy machine does not let them run out within the test.
    a = make_ticker(client, producer, keys, "a", ttl_ms=10_000)
    b = make_ticker(client, Producer(client, codec, keys), keys, "b", ttl_ms=10_000)
    assert await a.lease.acquire()
    await a.load_state()
    await client.delete(keys.ticker_lease())
    assert await b.lease.acquire()
    await b.load_state()
    now = t0 + timedelta(seconds=3.2)
    await b.fire_due(now)
    await a.fire_due(now)  # the stale leader: its tick is a duplicate, its record is refused
    got = await ticks(client, keys, codec)
    assert [t.scheduled_for for t in got] == [t0 + timedelta(seconds=3)]
    assert got[0].fence == b.lease.fence
    assert a.stats.duplicates == 1
    assert not a.is_leader
    assert b.is_leader


async def test_graceful_stop_releases_the_lease(
    client: aioredis.Redis, producer: Producer, keys: Keys, codec: Codec[Any]
) -> None:
    ticker = make_ticker(client, producer, keys, "a")
    task = asyncio.create_task(ticker.run())

    async def two() -> bool:
        return len(await ticks(client, keys, codec)) >= 2

    await wait_for(two)
    assert ticker.is_leader
    ticker.stop()
    await asyncio.wait_for(task, 5)
    assert await client.get(keys.ticker_lease()) is None
    got = await ticks(client, keys, codec)
    assert len({t.id for t in got}) == len(got)
    assert all(t.scheduled_for.microsecond == 0 for t in got)


# ---------------------------------------------------------------------- real processes

# An application of its own: the ticker needs no domain, only a table and a registry.
SCHEDULE_MODULE = """
from streamproc.app import App
from streamproc.codec import Registry
from streamproc.schedule import Schedule, Tick, every

app = App(
    registry=Registry([Tick]),
    schedules=[
        Schedule(name="every-second", trigger=every(1), event=Tick, missed="catch_up",
                 catch_up_max=100),
    ],
)
"""


def start_tickers(
    n: int, redis_url: str, keys: Keys, repo_root: Path, tmp_path: Path
) -> dict[str, subprocess.Popen[bytes]]:
    (tmp_path / "fast_ticker_app.py").write_text(textwrap.dedent(SCHEDULE_MODULE))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo_root)]),
        "STREAMPROC_LOG_JSON": "1",
    }
    procs = {}
    for i in range(n):
        node = f"n{i}"
        cmd = [sys.executable, "-m", "streamproc", "--app", "fast_ticker_app:app", "ticker",
               "--node", node, "--lease-ttl-ms", "1000"]  # fmt: skip
        with (tmp_path / f"{node}.log").open("wb") as log:  # the child keeps its own copy
            procs[node] = subprocess.Popen(
                cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=log
            )
    return procs


async def wait_for(cond: Any, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := await cond():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
@pytest.mark.serial  # SIGKILL and lease failover of processes: not beside other workers
@pytest.mark.parametrize("replicas", [2, 3])
async def test_failover_after_sigkill_fires_each_scheduled_time_exactly_once(
    replicas: int,
    redis_url: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    repo_root: Path,
    tmp_path: Path,
) -> None:
    """Kill the leader (then the next one): every 1-s tick is in the stream once, no gaps."""
    procs = start_tickers(replicas, redis_url, keys, repo_root, tmp_path)
    killed: list[str] = []
    try:

        async def leader() -> str | None:
            raw: Any = await client.get(keys.ticker_lease())
            node = raw.decode().split("/")[0] if raw else None
            return node if node and node not in killed else None

        for _ in range(replicas - 1):
            node = await wait_for(leader)
            count = len(await ticks(client, keys, codec))

            async def two_more(c: int = count) -> bool:
                return len(await ticks(client, keys, codec)) >= c + 2

            await wait_for(two_more)
            procs[node].send_signal(signal.SIGKILL)
            procs[node].wait()
            killed.append(node)
        survivor = await wait_for(leader)
        count = len(await ticks(client, keys, codec))

        async def two_more_after() -> bool:
            return len(await ticks(client, keys, codec)) >= count + 2

        await wait_for(two_more_after)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {node: p.wait(timeout=10) for node, p in procs.items()}
    assert all(codes[n] == 0 for n in procs if n not in killed), codes
    got = await ticks(client, keys, codec)
    times = [t.scheduled_for for t in got]
    assert len(set(times)) == len(times), "a scheduled time fired twice"
    assert times == sorted(times)
    steps = {(b - a).total_seconds() for a, b in itertools.pairwise(times)}
    assert steps == {1.0}, f"gap or duplicate in {times}"
    fences = [t.fence for t in got]
    assert fences == sorted(fences)
    assert len(set(fences)) == replicas  # one term per leader
    assert {t.source for t in got} >= {f"ticker:{n}" for n in (*killed, survivor)}
