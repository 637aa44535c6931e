"""QueueSlots: a task type's and its queue's concurrency across runner processes, handed out
in priority order across processes, in a real Redis."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from streamproc.keys import Keys
from streamproc.tasks import QueueSlots
from streamproc.tasks.slots import wait_order


def slots(
    client: aioredis.Redis,
    keys: Keys,
    limit: int,
    *,
    task_type: str = "t",
    queue_limit: int | None = None,
    ttl_s: float = 30.0,
    waiter_ttl_s: float = 5.0,
) -> QueueSlots:
    return QueueSlots(
        client,
        keys,
        queue="q",
        task_type=task_type,
        queue_limit=queue_limit,
        type_limit=limit,
        ttl_s=ttl_s,
        waiter_ttl_s=waiter_ttl_s,
    )


LOW, CRITICAL = wait_order(3, 1_000), wait_order(0, 2_000)


async def test_a_full_type_refuses_until_a_slot_is_given_back(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = slots(client, keys, 2), slots(client, keys, 2)  # two processes
    assert await a.take("p1:task-1", LOW)
    assert await b.take("p2:task-2", LOW)
    assert not await b.take("p2:task-3", LOW)
    assert await a.take("p1:task-1", LOW)  # a holder renews its own lease
    await a.give("p1:task-1")
    assert await b.take("p2:task-3", LOW)


async def test_a_freed_slot_goes_to_the_most_urgent_waiter_of_any_process(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = slots(client, keys, 1), slots(client, keys, 1)
    assert await a.take("p1:running", LOW)
    assert not await a.take("p1:low", LOW)  # process 1 read a low task first
    assert not await b.take("p2:critical", CRITICAL)  # process 2 a critical one later
    await a.give("p1:running")
    assert not await a.take("p1:low", LOW)  # it asks first, but the critical one ranks before
    assert await b.take("p2:critical", CRITICAL)
    await b.give("p2:critical")
    assert await a.take("p1:low", LOW)


async def test_the_queue_limit_spans_its_types(client: aioredis.Redis, keys: Keys) -> None:
    crawl = slots(client, keys, 5, task_type="crawl", queue_limit=2)
    upload = slots(client, keys, 5, task_type="upload", queue_limit=2)
    assert await crawl.take("p1:c1", LOW)
    assert await upload.take("p2:u1", LOW)
    assert not await crawl.take("p1:c2", LOW)  # the type has room, the queue does not
    assert not await upload.take("p2:u2", CRITICAL)
    await crawl.give("p1:c1")
    assert not await crawl.take("p1:c2", LOW)  # the critical upload waits before it
    assert await upload.take("p2:u2", CRITICAL)


async def test_a_waiter_blocked_by_its_type_does_not_hold_the_queue(
    client: aioredis.Redis, keys: Keys
) -> None:
    crawl = slots(client, keys, 1, task_type="crawl", queue_limit=3)
    upload = slots(client, keys, 5, task_type="upload", queue_limit=3)
    assert await crawl.take("p1:c1", LOW)
    assert not await crawl.take("p1:c2", CRITICAL)  # its type is full
    assert await upload.take("p2:u1", LOW)  # the queue's free slot is not kept for it


async def test_hold_waits_for_a_slot_and_gives_it_back(client: aioredis.Redis, keys: Keys) -> None:
    a, b = slots(client, keys, 1), slots(client, keys, 1)
    entered = asyncio.Event()

    async def second() -> None:
        async with b.hold("p2:task-2", LOW):
            entered.set()

    async with a.hold("p1:task-1", LOW):
        waiter = asyncio.create_task(second())
        await asyncio.sleep(0.3)  # several polls: all refused while the first holds
        assert not entered.is_set()
    await asyncio.wait_for(waiter, 5)
    assert entered.is_set()
    for k in b.keys:
        assert await client.zcard(k) == 0


async def test_a_dead_runner_s_slot_and_place_free_after_their_leases(
    client: aioredis.Redis, keys: Keys
) -> None:
    dead = slots(client, keys, 1, ttl_s=0.2, waiter_ttl_s=0.2)
    alive = slots(client, keys, 1, ttl_s=0.2, waiter_ttl_s=0.2)
    assert await dead.take("p1:task-1", LOW)  # and then the process is gone: nobody renews
    assert not await dead.take("p1:waiting", CRITICAL)  # nor asks again for this one
    assert not await alive.take("p2:task-2", LOW)
    await asyncio.sleep(0.4)  # past the 0.2 s lease and waiter expiry
    assert await alive.take("p2:task-2", LOW)


async def test_a_running_task_keeps_its_slot_past_the_lease(
    client: aioredis.Redis, keys: Keys
) -> None:
    a, b = slots(client, keys, 1, ttl_s=0.3), slots(client, keys, 1, ttl_s=0.3)
    async with a.hold("p1:task-1", LOW):
        for _ in range(4):  # 0.8 s: well past one lease, renewed every 0.1 s
            await asyncio.sleep(0.2)
            assert not await b.take("p2:task-2", LOW)
    assert await b.take("p2:task-2", LOW)


async def test_a_slot_given_back_in_the_same_process_wakes_its_waiter_at_once(
    client: aioredis.Redis, keys: Keys
) -> None:
    """A waiter whose next ask is ten minutes away (its poll) takes a slot freed by a task of
    its queue in the same process at once: the give wakes it. Without the wake this test
    waits out its 30 s bound and fails."""
    long = {"waiter_ttl_s": 7200.0, "poll_base_s": 600.0, "poll_cap_s": 600.0}
    running = QueueSlots(client, keys, queue="q", task_type="t", queue_limit=None, type_limit=1)
    waiting = QueueSlots(
        client, keys, queue="q", task_type="t", queue_limit=None, type_limit=1, **long
    )
    assert waiting.poll_base_s == waiting.poll_cap_s == 600.0
    assert await running.take("p1:first", LOW)
    took = asyncio.Event()

    async def second() -> None:
        async with waiting.hold("p1:second", LOW):
            took.set()

    task = asyncio.create_task(second())
    waiting_key = keys.task_slots("q", "t", "waiting")
    while await client.zscore(waiting_key, "p1:second") is None:  # noqa: ASYNC110 - in Redis
        await asyncio.sleep(0.01)
    assert not took.is_set()
    await running.give("p1:first")
    await asyncio.wait_for(took.wait(), 30)
    await task
