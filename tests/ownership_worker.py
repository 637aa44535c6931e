"""A consumer process for tests/test_ownership.py: group ``own`` on topic ``cluster`` with
``OWN_PARTITIONS`` partitions, each event's effect recorded through ``ctx.effect`` (applied
once, with the ack): ``HINCRBY state:effects <event id> 1`` and ``RPUSH state:order:<key>
<seq>`` (the order in which a key's events were acked).

Run as ``python -m tests.ownership_worker NAME`` with REDIS_URL and STREAMPROC_PREFIX set.
Knobs (environment, read here only): ``OWN_PARTITIONS`` (default 6), ``OWN_ORDERED`` (1 =
``ordered=True``), ``OWN_MIN_IDLE_MS`` (default 1000), ``OWN_HANDLER_MAX_MS`` (each handler
sleeps a random 0..this many ms, default 0), ``OWN_OWNERSHIP`` (0 = every consumer reads
every partition).
"""

from __future__ import annotations

import asyncio
import os
import random
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


async def main(name: str, env: dict[str, str]) -> int:
    keys = Keys(
        env["STREAMPROC_PREFIX"], partitions={"cluster": int(env.get("OWN_PARTITIONS", "6"))}
    )
    client = connect(
        RedisSettings.from_mapping({"url": env["REDIS_URL"], "key_prefix": keys.prefix})
    )
    max_ms = float(env.get("OWN_HANDLER_MAX_MS", "0"))

    async def record(event: SpotInterruption, ctx: Context) -> None:
        await asyncio.sleep(random.uniform(0, max_ms) / 1000 if max_ms else 0)
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)
        ctx.effect("RPUSH", ctx.keys.state("order", event.key), event.instance_id[2:])

    concern = Concern(
        group="own",
        topics=("cluster",),
        handlers={SpotInterruption: record},
        concurrency=8,
        ordered=env.get("OWN_ORDERED") == "1",
    )
    codec = Codec(REGISTRY)
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer=name,
            min_idle_ms=int(env.get("OWN_MIN_IDLE_MS", "1000")),
            block_ms=200,
            grace_s=5,
            own_partitions=env.get("OWN_OWNERSHIP", "1") == "1",
        ),
    )
    install_stop_handlers(consumer.stop)
    try:
        await consumer.run()
    finally:
        await client.aclose()
    return 0


if __name__ == "__main__":
    sys.exit(run_async(main(sys.argv[1], dict(os.environ))))
