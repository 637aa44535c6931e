"""A consumer process for the chaos tests: records each event's effect in Redis by event id.

Run as ``python -m tests.chaos_worker NAME`` with REDIS_URL and STREAMPROC_PREFIX set. The
effect (HINCRBY effects <event id> 1) goes through ``ctx.effect``, so it is applied atomically
with the ack and the dedup mark: the test then checks every count is exactly 1.
"""

from __future__ import annotations

import asyncio
import os
import sys

from schemas import REGISTRY, SpotInterruption
from streamproc import (
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
from streamproc.cli import install_stop_handlers, run_async


async def record(event: SpotInterruption, ctx: Context) -> None:
    await asyncio.sleep(0)  # a real handler awaits something; widen the window for kills
    ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)


async def main(name: str) -> int:
    keys = Keys(os.environ["STREAMPROC_PREFIX"])
    client = connect(RedisSettings(url=os.environ["REDIS_URL"], key_prefix=keys.prefix))
    codec = Codec(REGISTRY)
    concern = Concern(
        group="chaos", topics=("cluster",), handlers={SpotInterruption: record}, concurrency=8
    )
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer=name, min_idle_ms=1000, block_ms=200, max_deliveries=10, grace_s=2
        ),
    )
    install_stop_handlers(consumer.stop)
    await consumer.run()
    await client.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(run_async(main(sys.argv[1])))
