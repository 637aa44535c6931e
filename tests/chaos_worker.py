"""A consumer process for the chaos tests: records each event's effect in Redis by event id.

Run as ``python -m tests.chaos_worker NAME`` with REDIS_URL and STREAMPROC_PREFIX set. The
effect (HINCRBY effects <event id> 1) goes through ``ctx.effect``, so it is applied atomically
with the ack and the dedup mark: the test then checks every count is exactly 1.

Optional knobs (environment, read here at the entry point only):

- ``CHAOS_MIN_IDLE_MS``: the consumer's ``min_idle_ms`` (default 1000).
- ``CHAOS_SOCKET_TIMEOUT_S``: the client's socket timeout (default: RedisSettings' own).
- ``CHAOS_HANDLER_MAX_MS``: each handler sleeps a random 0..this many ms first (default 0),
  so that entries are in flight when the network or Redis stalls.
- ``CHAOS_HANDLER_READS``: 1 = each handler first reads a key (GET), as most real handlers
  read some state: while Redis is stalled, handlers then wait on it and are still running
  when it comes back (default 0).
- ``CHAOS_CONCURRENCY``: the concern's concurrency (default 8).
- ``CHAOS_RUNS_FILE``: a file that gets one line, ``<event id>/<attempt>``, each time a handler
  starts: the test counts handler runs per event and attempt across processes (two runs of
  the same attempt = work taken from a consumer that was still on it; a retry is another
  attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sys
import time
from typing import IO

from schemas import REGISTRY, SpotInterruption
from streamproc import (
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Handler,
    Keys,
    Producer,
    RedisSettings,
    connect,
)
from streamproc.cli import install_stop_handlers, run_async


def make_handler(max_sleep_ms: float, reads: bool, runs: IO[str] | None) -> Handler:
    async def record(event: SpotInterruption, ctx: Context) -> None:
        if runs is not None:
            runs.write(
                f"{event.id}/{ctx.attempt} {time.time():.3f} {ctx.entry_id} d={ctx.deliveries}\n"
            )
        if reads:
            await ctx.redis.get(ctx.keys.state("config"))
        # a real handler awaits something; widen the window for kills and stalls
        await asyncio.sleep(random.uniform(0, max_sleep_ms) / 1000 if max_sleep_ms else 0)
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)

    return record


async def main(name: str, env: dict[str, str], runs: IO[str] | None) -> int:
    keys = Keys(env["STREAMPROC_PREFIX"])
    redis: dict[str, object] = {"url": env["REDIS_URL"], "key_prefix": keys.prefix}
    if "CHAOS_SOCKET_TIMEOUT_S" in env:
        redis["socket_timeout_s"] = float(env["CHAOS_SOCKET_TIMEOUT_S"])
    client = connect(RedisSettings.from_mapping(redis))
    codec = Codec(REGISTRY)
    handler = make_handler(
        float(env.get("CHAOS_HANDLER_MAX_MS", "0")), env.get("CHAOS_HANDLER_READS") == "1", runs
    )
    concern = Concern(
        group="chaos",
        topics=("cluster",),
        handlers={SpotInterruption: handler},
        concurrency=int(env.get("CHAOS_CONCURRENCY", "8")),
    )
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer=name,
            min_idle_ms=int(env.get("CHAOS_MIN_IDLE_MS", "1000")),
            block_ms=200,
            max_deliveries=10,
            grace_s=2,
        ),
    )
    install_stop_handlers(consumer.stop)
    try:
        await consumer.run()
    finally:
        await client.aclose()
    return 0


def entry(name: str) -> int:
    env = dict(os.environ)
    path = env.get("CHAOS_RUNS_FILE")
    with open(path, "a", buffering=1) if path else contextlib.nullcontext() as runs:
        return run_async(main(name, env, runs))


if __name__ == "__main__":
    sys.exit(entry(sys.argv[1]))
