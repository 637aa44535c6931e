"""Ticker precision and event-loop lag under render load.

    .venv/bin/python benchmarks/ticker_bench.py [--seconds 10] [--schedules 10]
        [--interval-s 0.2] [--workers N]

1. Lateness of ticks: ``--schedules`` interval schedules fire for ``--seconds`` in one leader;
   lateness = time the Producer's publish returned - scheduled time (p50/p99/max, ms).
2. Event-loop lag while spin jobs saturate the render pool (``--workers``, default cores - 1):
   p50/p99/max, ms.

Uses REDIS_URL when set, otherwise an embedded redis-server in a temp folder; uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from schemas import REGISTRY
from schemas.ticks import Tick
from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.embedded import EmbeddedRedis
from streamproc.offload import (
    Job,
    LoopLagMonitor,
    OffloadSettings,
    RenderPool,
    WorkerContext,
)
from streamproc.schedule import Schedule, every
from streamproc.ticker import Ticker, TickerSettings


def spin(payload: bytes, ctx: WorkerContext) -> bytes:
    deadline = time.monotonic() + float(payload)
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return str(n).encode()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


async def bench(url: str, args: argparse.Namespace) -> None:
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(RedisSettings(url=url, key_prefix=keys.prefix))
    producer = Producer(client, Codec(REGISTRY), keys)
    schedules = [
        Schedule(name=f"s{i}", trigger=every(args.interval_s), event=Tick)
        for i in range(args.schedules)
    ]
    ticker = Ticker(schedules, client=client, producer=producer, keys=keys,
                    settings=TickerSettings(node="bench", lease_ttl_ms=5000))  # fmt: skip
    task = asyncio.create_task(ticker.run())
    await asyncio.sleep(args.seconds)
    ticker.stop()
    await task
    late = list(ticker.stats.lateness_ms)
    print(f"ticker: {len(late)} ticks, {args.schedules} schedules every {args.interval_s}s, "
          f"{args.seconds}s")  # fmt: skip
    print(f"  lateness ms: p50 {statistics.median(late):.2f}  p99 {pct(late, 99):.2f}  "
          f"max {max(late):.2f}  (SLO: < 50)")  # fmt: skip
    async for k in client.scan_iter(match=f"{keys.prefix}:*"):
        await client.delete(k)
    await client.aclose()

    monitor = LoopLagMonitor(interval_s=0.005)
    lag_task = asyncio.create_task(monitor.run())
    async with RenderPool(OffloadSettings(cpu_workers=args.workers, gpus=())) as pool:
        await asyncio.gather(
            *(pool.run(Job(fn=spin, payload=b"0.1", job_id=f"w{i}")) for i in range(2))
        )
        monitor.samples_s.clear()
        jobs = [
            Job(fn=spin, payload=b"1.0", job_id=f"j{i}") for i in range(args.workers * args.seconds)
        ]
        await asyncio.gather(*(pool.run(j) for j in jobs))
    lag_task.cancel()
    lag = [s * 1000 for s in monitor.samples_s]
    print(
        f"loop lag under render load ({len(jobs)} x 1 s jobs on {args.workers} workers, "
        f"{len(lag)} samples):"
    )
    print(f"  ms: p50 {statistics.median(lag):.3f}  p99 {pct(lag, 99):.3f}  max {max(lag):.3f}  "
          f"(SLO: p99 < 10)")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=int, default=10)
    p.add_argument("--schedules", type=int, default=10)
    p.add_argument("--interval-s", type=float, default=0.2)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    args = p.parse_args()
    url = os.environ.get("REDIS_URL")
    if url:
        uvloop.run(bench(url, args))
        return
    with tempfile.TemporaryDirectory() as d:
        server = EmbeddedRedis(Path(d), appendonly=False).start()
        try:
            uvloop.run(bench(server.url, args))
        finally:
            server.stop()


if __name__ == "__main__":
    main()
