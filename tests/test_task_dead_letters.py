"""A task whose entry the engine dead-letters ends ``failed`` with the reason (issue 11, A14).

The engine dead-letters an entry without running its handler when it is poison (delivered
more than ``max_deliveries`` times: a task that crashes every runner that takes it) or cannot
be decoded. The task concern's ``on_dead_letter`` hook records that in the task's hash, so a
client following the task sees ``failed`` instead of ``queued``/``running`` for 24 h. Each test
starts a fresh runner process's consumer, which has run no task before: the runner that
finally dead-letters a poison task is one that just started.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer, Registry
from streamproc.tasks import TASK_EVENTS, TaskContext, TaskNormal, TaskStore, TaskType, task_concern
from tests.helpers import entries

pytestmark = pytest.mark.timeout(60)

GROUP = "tasks"


async def never_runs(payload: Any, ctx: TaskContext) -> None:
    raise AssertionError("the engine must not run a dead-lettered task")


@pytest.fixture
def codec() -> Codec[Any]:
    return Codec(Registry(TASK_EVENTS))


@pytest.fixture
def store(client: aioredis.Redis, keys: Keys) -> TaskStore:
    return TaskStore(client, keys)


@contextlib.asynccontextmanager
async def fresh_runner(
    client: aioredis.Redis, keys: Keys, codec: Codec[Any]
) -> AsyncIterator[Consumer]:
    """A runner that has just started: its concern has handled nothing yet."""
    concern = task_concern(
        {"test.never": TaskType(name="test.never", run=never_runs)},
        settings={"min_idle_ms": 300, "max_deliveries": 3},
    )
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(consumer="runner-fresh", block_ms=50),
    )
    run = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.stop()
        await run


async def ended(store: TaskStore, task_id: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = await store.get(task_id)
        if view is not None and view.status not in ("queued", "running"):
            return view
        await asyncio.sleep(0.05)
    return await store.get(task_id)


async def submitted(store: TaskStore, producer: Producer, task_id: str) -> str:
    """What POST /v1/tasks does: the task's hash, then its request on the normal stream."""
    await store.create(task_id, type="test.never", priority="normal", submitted_by="test")
    return await producer.publish(
        TaskNormal(id=task_id, key="test.never", task_type="test.never", priority="normal")
    )


async def test_a_poison_task_ends_failed_with_the_reason(
    client: aioredis.Redis, keys: Keys, codec: Codec[Any], store: TaskStore
) -> None:
    """Delivered to crashed runners more than max_deliveries times: failed, not running."""
    stream = keys.stream(TaskNormal.topic)
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    entry_id = await submitted(store, Producer(client, codec, keys), "task-poison-1")
    # A runner that took it and died, after earlier ones did the same: 10 deliveries so far,
    # and idle long enough to be reclaimed.
    await client.xreadgroup(GROUP, "runner-dead", {stream: ">"})
    await client.xclaim(stream, GROUP, "runner-dead", 0, [entry_id], idle=600_000, retrycount=10)
    await store.start("task-poison-1")  # the dead runner had started it: it says "running"
    async with fresh_runner(client, keys, codec):
        view = await ended(store, "task-poison-1")
    assert view is not None
    assert view.status == "failed", view
    assert view.error is not None
    assert "dead-lettered (poison)" in view.error
    assert view.finished_at is not None
    [(_, fields)] = await entries(client, keys.dlq(TaskNormal.topic, GROUP))
    assert fields[b"id"] == b"task-poison-1"


async def test_an_undecodable_task_entry_ends_its_task_failed(
    client: aioredis.Redis, keys: Keys, codec: Codec[Any], store: TaskStore
) -> None:
    """An entry whose body does not decode still names its task id: that task fails."""
    stream = keys.stream(TaskNormal.topic)
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    await store.create("task-garbled-1", type="test.never", priority="normal", submitted_by="t")
    await client.xadd(stream, {"type": "task.normal", "id": "task-garbled-1", "data": "{oops"})
    async with fresh_runner(client, keys, codec):
        view = await ended(store, "task-garbled-1")
    assert view is not None
    assert view.status == "failed", view
    assert view.error is not None
    assert view.error.startswith("dead-lettered (")
