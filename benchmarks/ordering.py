"""The cost of per-key order: ``Concern(ordered=True)`` vs unordered, concurrency 10.

One consumer in this process drains a pre-filled stream against an embedded Redis, in three
modes: unordered, ordered without retry holds (lanes only), ordered with holds (the default:
lanes, plus one HMGET of the hold hash per read batch). Workloads: a no-op handler (the
engine's own cost) over 1,000 and 10 keys, and a handler that awaits 1 ms (I/O-bound, where
concurrency matters) over 1,000 keys and over 2 keys (where order allows only 2 at a time).
The modes run in turns, ``--rounds`` times; each figure is a median: events/s, ordered /
unordered events/s of the same rounds, and CPU per event of this process and of Redis
(``INFO cpu``), which a shared machine disturbs less than wall time. Nothing is retried
here: holds cost only their checks.

Usage: .venv/bin/python benchmarks/ordering.py [--events 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas import REGISTRY, SpotInterruption  # noqa: E402
from streamproc import (  # noqa: E402
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Producer,
    RedisSettings,
    connect,
)
from streamproc.embedded import EmbeddedRedis  # noqa: E402

MODES = {
    "unordered": {},
    "ordered, no holds": {"ordered": True, "hold_on_retry": False},
    "ordered": {"ordered": True},
}


async def noop(event: SpotInterruption, ctx: Context) -> None:
    return None


async def io_1ms(event: SpotInterruption, ctx: Context) -> None:
    await asyncio.sleep(0.001)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def redis_cpu_s(client: object) -> float:
    info = await client.info("cpu")  # type: ignore[attr-defined]
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def one_run(
    url: str, run: int, mode: str, handler: object, n: int, nkeys: int
) -> tuple[float, float, float]:
    """events/s, this process's CPU µs per event, Redis' CPU µs per event."""
    client = connect(RedisSettings(url=url))
    keys, codec = Keys(f"ord{run}"), Codec(REGISTRY)
    producer = Producer(client, codec, keys)
    events = [
        SpotInterruption(
            cluster_id="c1",
            key=f"k{i % nkeys}",
            instance_id=f"i-{i}",
            instance_type="m5.large",
            availability_zone="eu-west-1a",
        )
        for i in range(n)
    ]
    for i in range(0, n, 1000):
        await producer.publish_many(events[i : i + 1000])
    consumer = Consumer(
        Concern(
            group="g",
            topics=("cluster",),
            handlers={SpotInterruption: handler},  # type: ignore[dict-item]
            concurrency=10,
            **MODES[mode],  # type: ignore[arg-type]
        ),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="b", trim_interval_ms=0, stats_interval_ms=0),
    )
    start, cpu0, rcpu0 = time.perf_counter(), cpu_s(), await redis_cpu_s(client)
    task = asyncio.create_task(consumer.run())
    while consumer.stats.acked < n:  # noqa: ASYNC110 - sampling a counter
        await asyncio.sleep(0.005)
    rate = n / (time.perf_counter() - start)
    cpu_us, rcpu_us = (cpu_s() - cpu0) / n * 1e6, (await redis_cpu_s(client) - rcpu0) / n * 1e6
    consumer.stop()
    await task
    await client.flushdb()
    await client.aclose()
    return rate, cpu_us, rcpu_us


async def measure(url: str, n: int, rounds: int) -> None:
    run = 0
    workloads = (
        ("no-op", noop, n, 1000),
        ("no-op", noop, n, 10),
        ("await 1 ms", io_1ms, n // 4, 1000),
        ("await 1 ms", io_1ms, n // 4, 2),
    )
    print("workload | mode: events/s (x unordered), consumer CPU µs/event, Redis CPU µs/event")
    for hname, handler, count, nkeys in workloads:
        got: dict[str, list[tuple[float, float, float]]] = {m: [] for m in MODES}
        for _ in range(rounds):
            for mode in MODES:
                run += 1
                got[mode].append(await one_run(url, run, mode, handler, count, nkeys))
        base = [g[0] for g in got["unordered"]]
        cells = []
        for mode in MODES:
            rate, cpu, rcpu = (statistics.median(g[i] for g in got[mode]) for i in range(3))
            ratio = statistics.median(g[0] / b for g, b in zip(got[mode], base, strict=True))
            cells.append(f"{mode}: {rate:,.0f}/s ({ratio:.2f}x), {cpu:.0f} / {rcpu:.0f} µs")
        print(f"{hname}, {nkeys} keys, {count} events | " + " | ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), appendonly=False) as r:
        uvloop.run(measure(r.url, args.events, args.rounds))


if __name__ == "__main__":
    main()
