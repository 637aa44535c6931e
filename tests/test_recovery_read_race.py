"""A recovery read whose reply is overtaken by a settle (the chaos test's double run).

After an outage a consumer re-reads its own pending entries (``XREADGROUP ... 0``). When Redis
runs that read before a settle sent on another connection (both queued while Redis was
stopped), the read's reply lists entries as pending that the settle then acks; if the settle's
reply is handled first, those entries are no longer held when the read's reply comes, and
they used to be run a second time (effects once: the second settle's XACK answers 0). Here the
read's reply is held back by the client until the settle has released the entries.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Codec, Context, Keys, Producer
from tests.faults import FlakyRedis
from tests.helpers import spot
from tests.test_guarantees import consumer_on


class HeldRecoveryReply(FlakyRedis):
    """Holds the reply of the next recovery read (``XREADGROUP ... 0``) until ``release``."""

    def __init__(self, base: aioredis.Redis) -> None:
        super().__init__(base)
        self.armed = False
        self.holding = asyncio.Event()  # a recovery read ran on Redis, its reply is held
        self.release = asyncio.Event()

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        reply = await super().execute_command(*args, **options)
        if self.armed and args[0] == "XREADGROUP" and args[-1] in (b"0", "0"):
            self.armed = False
            self.holding.set()
            await self.release.wait()
        return reply


async def until(done: Any, rounds: int = 500) -> None:
    for _ in range(rounds):
        if done():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


async def test_entries_settled_while_a_recovery_read_was_under_way_are_not_run_again(
    client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> None:
    runs: dict[str, int] = {}
    go = asyncio.Event()

    async def handle(event: SpotInterruption, ctx: Context) -> None:
        runs[event.instance_id] = runs.get(event.instance_id, 0) + 1
        await go.wait()

    held = HeldRecoveryReply(client)
    consumer = consumer_on(held, codec, keys, producer, handle, block_ms=50)
    await consumer.ensure_groups()
    task = asyncio.create_task(consumer.run())
    try:
        await producer.publish_many([spot(i) for i in range(3)])
        await until(lambda: len(runs) == 3)  # all three held, their handlers waiting
        held.armed = True
        consumer.reader.recover_all()  # as after an outage
        await held.holding.wait()  # Redis answered: the three are pending, the reply waits
        go.set()  # the handlers end, their settle acks them and releases them
        await until(lambda: consumer.stats.acked == 3)
        held.release.set()  # now the read's reply lists three entries no longer held
        pending: Any = await client.xpending(keys.stream("cluster"), "g")
        await until(lambda: not consumer.reader._recovering)  # the recovery read is over
        await asyncio.sleep(0.2)  # room for a second run, had one been started
        assert runs == {"i-0": 1, "i-1": 1, "i-2": 1}
        assert consumer.stats.refused == 0
        assert pending["pending"] == 0
    finally:
        consumer.stop()
        await task
