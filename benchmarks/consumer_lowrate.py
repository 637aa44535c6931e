"""The consumer's own CPU per event at a low rate (batches of about one event).

A consumer (dedup off, no-op handler) runs in this process against an embedded Redis; a
child process XADDs events at ``--rate`` per second with a busy-wait schedule. Prints the
consumer process's CPU (getrusage user+sys) per event over the span.

Usage: .venv/bin/python benchmarks/consumer_lowrate.py [--events 2000] [--rate 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
import tempfile
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

_GENERATOR = """
import sys, time
import redis
sys.path.insert(0, {root!r})
from schemas import REGISTRY
from streamproc import Codec
from tests.helpers import spot
codec = Codec(REGISTRY)
events = [codec.encode(spot(i)) for i in range({n})]
client = redis.Redis(port={port})
t0 = time.perf_counter()
for i, fields in enumerate(events):
    while time.perf_counter() < t0 + i / {rate}:
        pass
    client.xadd("low:{{cluster}}:stream", fields)
"""


async def noop(event: SpotInterruption, ctx: Context) -> None:
    return None


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def measure(port: int, url: str, n: int, rate: int) -> float:
    client = connect(RedisSettings(url=url))
    keys, codec = Keys("low"), Codec(REGISTRY)
    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: noop}),
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer="low", trim_interval_ms=0, stats_interval_ms=0, dedup_window_ms=0
        ),
    )
    task = asyncio.create_task(consumer.run())
    while not consumer.ready:  # noqa: ASYNC110 - sampling a flag of another task
        await asyncio.sleep(0.01)
    code = _GENERATOR.format(root=str(ROOT), n=n, port=port, rate=rate)
    generator = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT)
    start = cpu_s()
    while consumer.stats.acked < n:  # noqa: ASYNC110 - sampling a counter
        await asyncio.sleep(0.05)
    spent = cpu_s() - start
    await generator.wait()
    consumer.stop()
    await task
    await client.aclose()
    return spent / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--events", type=int, default=2000)
    p.add_argument("--rate", type=int, default=1000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp, EmbeddedRedis(Path(tmp), appendonly=False) as r:
        per_event_s = uvloop.run(measure(r.port, r.url, args.events, args.rate))
    print(f"{per_event_s * 1e6:.0f} us of consumer CPU per event at {args.rate}/s")


if __name__ == "__main__":
    main()
