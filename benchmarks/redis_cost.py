"""Redis' own CPU per published event: what bounds ingest throughput on a small machine.

    .venv/bin/python benchmarks/redis_cost.py [--events 30000]

Publishes the same events three ways to an embedded Redis (no AOF; REDIS_URL to use another)
and reads Redis' CPU time (INFO cpu, user + sys) before and after each, so the figure is the
server's work only, whatever the client costs:

- bare pipelined XADD   100 XADDs per pipeline (redis-py)
- publish, no marker    Producer.append(dedup=[False]): the publish script, XADD only (what
                        ingest does for events posted without an id)
- publish, marker       Producer.append(): the script's GET + XADD + SET PX per event (events
                        with an id the sender may send again)

Divide a core's microseconds by the figure for the most events/s one Redis core can take.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import uvloop  # noqa: E402

from benchmarks.throughput import events  # noqa: E402
from schemas import REGISTRY, SpotInterruption  # noqa: E402
from streamproc import Codec, Keys, Producer, RedisSettings, connect  # noqa: E402
from streamproc.embedded import EmbeddedRedis  # noqa: E402

BATCH = 100


async def main(n: int) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="redis-cost-")
    server = None
    url = os.environ.get("REDIS_URL", "")
    if not url:
        server = EmbeddedRedis(Path(tmp.name), appendonly=False).start()
        url = server.url
    keys = Keys("rcost")
    client = connect(RedisSettings(url=url, key_prefix=keys.prefix))
    codec = Codec(REGISTRY)
    producer = Producer(client, codec, keys)

    async def cpu() -> float:
        info = await client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    async def bare(evs: list[SpotInterruption]) -> None:
        async with client.pipeline(transaction=False) as pipe:
            for e in evs:
                pipe.xadd(keys.stream("bare"), codec.encode(e))  # type: ignore[arg-type]
            await pipe.execute()

    async def unmarked(evs: list[SpotInterruption]) -> None:
        await producer.append(evs, dedup=[False] * len(evs))

    async def marked(evs: list[SpotInterruption]) -> None:
        await producer.append(evs)

    try:
        print(f"Redis CPU per event, {n:,} events in batches of {BATCH}")
        for name, send in [
            ("bare pipelined XADD", bare),
            ("publish, no marker", unmarked),
            ("publish, marker", marked),
        ]:
            batch = events(n, name.replace(" ", "-"))
            before, t0 = await cpu(), time.perf_counter()
            for i in range(0, n, BATCH):
                await send(batch[i : i + BATCH])
            used, wall = await cpu() - before, time.perf_counter() - t0
            per = used / n * 1e6
            print(
                f"{name:22s} {per:6.2f} us Redis CPU/event  (one Redis core: "
                f"{1e6 / per:>9,.0f} events/s)   client wall {wall / n * 1e6:6.2f} us/event"
            )
    finally:
        await client.aclose()
        if server is not None:
            server.stop()
        tmp.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=30_000)
    uvloop.run(main(p.parse_args().events))
