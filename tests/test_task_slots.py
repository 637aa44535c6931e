"""GlobalSlots: a task type's concurrency across runner processes, in a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from streamproc.keys import Keys
from streamproc.tasks import GlobalSlots


def slots(client: aioredis.Redis, keys: Keys, limit: int, ttl_s: float = 30.0) -> GlobalSlots:
    return GlobalSlots(client, keys.task_slots("t"), limit, ttl_s=ttl_s)


async def test_a_full_type_refuses_until_a_slot_is_given_back(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = slots(client, keys, 2), slots(client, keys, 2)  # two processes
    assert await a.take("p1:task-1")
    assert await b.take("p2:task-2")
    assert not await b.take("p2:task-3")
    assert await a.take("p1:task-1")  # a holder renews its own lease
    await client.zrem(keys.task_slots("t"), "p1:task-1")
    assert await b.take("p2:task-3")


async def test_hold_waits_for_a_slot_and_gives_it_back(client: aioredis.Redis, keys: Keys) -> None:
    a, b = slots(client, keys, 1), slots(client, keys, 1)
    entered = asyncio.Event()

    async def second() -> None:
        async with b.hold("p2:task-2"):
            entered.set()

    async with a.hold("p1:task-1"):
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.3)  # several polls: all refused while the first holds
        assert not entered.is_set()
    await asyncio.wait_for(waiter, 5)
    assert entered.is_set()
    assert await client.zcard(keys.task_slots("t")) == 0


async def test_a_dead_runner_s_slot_frees_after_its_lease(
    client: aioredis.Redis, keys: Keys
) -> None:
    dead, alive = slots(client, keys, 1, ttl_s=0.2), slots(client, keys, 1, ttl_s=0.2)
    assert await dead.take("p1:task-1")  # and then the process is gone: nobody renews
    assert not await alive.take("p2:task-2")
    await asyncio.sleep(0.4)  # past the 0.2 s lease
    assert await alive.take("p2:task-2")


async def test_a_running_task_keeps_its_slot_past_the_lease(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = slots(client, keys, 1, ttl_s=0.3), slots(client, keys, 1, ttl_s=0.3)
    async with a.hold("p1:task-1"):
        for _ in range(4):  # 0.8 s: well past one lease, renewed every 0.1 s
            await asyncio.sleep(0.2)
            assert not await b.take("p2:task-2")
    assert await b.take("p2:task-2")
