"""The task API and runner: submit, follow, cancel (queued and running), priorities, retries."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis

from consumers.tasks import CONCERNS as TASK_CONCERNS
from consumers.tasks import TASK_TYPES
from streamproc import Codec, Concern, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.tasks import TaskContext, TaskType, task_concern
from tests.test_ingest_support import Server, running_ingest

pytestmark = pytest.mark.timeout(60)


class Sleep(msgspec.Struct):
    label: str = ""


class Recorder:
    """Task types for tests: they record what ran and wait for the test to let them finish."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.running = asyncio.Event()
        self.release = asyncio.Event()
        self.fail_first: set[str] = set()
        self.now = self.most = 0

    async def block(self, p: Sleep, ctx: TaskContext) -> dict[str, Any]:
        self.started.append(p.label)
        await ctx.progress(0.5, label=p.label)
        self.running.set()
        await self.release.wait()
        return {"label": p.label}

    async def flaky(self, p: Sleep, ctx: TaskContext) -> str:
        self.started.append(p.label)
        if p.label == "permanent":
            raise Permanent("bad config")
        if ctx.attempt == 0:
            raise ConnectionError("network blip")
        return "ok"

    async def count(self, p: Sleep, ctx: TaskContext) -> str:
        """Counts how many run at once (across every runner of this test)."""
        self.now += 1
        self.most = max(self.most, self.now)
        self.started.append(p.label)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.now -= 1
        return p.label

    def types(self) -> dict[str, TaskType]:
        return {
            "test.count": TaskType(name="test.count", run=self.count, payload_type=Sleep),
            "test.block": TaskType(name="test.block", run=self.block, payload_type=Sleep),
            "test.flaky": TaskType(
                name="test.flaky", run=self.flaky, payload_type=Sleep, retry_base_s=0.01
            ),
        }


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
async def srv(
    client: aioredis.Redis, keys: Keys, producer: Producer, rec: Recorder
) -> AsyncIterator[Server]:
    types = {**TASK_TYPES, **rec.types()}
    async with running_ingest(client, keys, producer, task_types=types) as s:
        yield s


@pytest.fixture
async def op(srv: Server) -> str:
    return await srv.token("ops", [], operator=True)


def make_runner(
    concern: Concern, client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> Consumer:
    return Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="runner-1", block_ms=50, min_idle_ms=60_000),
    )


@pytest.fixture
def runner(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any], rec: Recorder
) -> Consumer:
    """The runner of the test types (the default queue)."""
    return make_runner(task_concern(rec.types()), client, keys, producer, codec)


async def submit(srv: Server, op: str, body: dict[str, Any], **headers: str) -> dict[str, Any]:
    status, answer, _ = await srv.post("/v1/tasks", body, token=op, headers=headers)
    assert status == 202, answer
    return dict(answer)


async def task(srv: Server, op: str, task_id: str) -> dict[str, Any]:
    status, view, _ = await srv.post(f"/v1/tasks/{task_id}", token=op, method="GET")
    assert status == 200, view
    return dict(view)


async def until_status(srv: Server, op: str, task_id: str, *want: str) -> dict[str, Any]:
    """Follow a task the way a client does, until it reaches one of ``want``."""
    while (view := await task(srv, op, task_id))["status"] not in want:  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # polling is what an HTTP client can do
    return view


@contextlib.asynccontextmanager
async def running(consumer: Consumer) -> AsyncIterator[None]:
    run = asyncio.create_task(consumer.run())
    try:
        yield
    finally:
        consumer.stop()
        await run


async def test_optimizer_run_completes_with_progress_and_result(
    srv: Server, op: str, client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    [concern] = [c for c in TASK_CONCERNS if c.group == "tasks-optimizer"]
    runner = make_runner(concern, client, keys, producer, codec)
    await client.set(keys.state("risky-pool", "m5.large", "eu-west-1a"), "x")
    payload = {
        "cluster_id": "c1",
        "instance_types": ["m5.large", "c5.large"],
        "availability_zones": ["eu-west-1a", "eu-west-1b"],
    }
    sub = await submit(srv, op, {"type": "optimizer.run", "payload": payload, "priority": "high"})
    assert sub["status"] == "queued"
    assert sub["position"] == 1
    assert sub["priority"] == "high"
    assert (await task(srv, op, sub["id"]))["status"] == "queued"
    await runner.process_once()
    view = await task(srv, op, sub["id"])
    assert view["status"] == "completed"
    assert view["progress"] == 1.0
    assert view["result"]["risky_pools"] == ["m5.large/eu-west-1a"]
    assert len(view["result"]["safe_pools"]) == 3
    assert view["detail"] == {
        "pools_checked": 4,
        "pools_total": 4,
        "risky": 1,
        "decisions": 0,  # no inventory for c1: the explicit pools only
        "convert": 0,
    }
    assert view["result"]["dry_run"] is True
    assert view["started_at"]
    assert view["finished_at"]
    assert view["attempts"] == 1
    assert await client.xlen(keys.stream("notify")) == 1
    assert 0 < await client.ttl(keys.task(sub["id"])) <= 24 * 3600
    # The cluster's live feed saw the progress, pool by pool.
    from notifications.feed_keys import feed_key

    feed: Any = await client.xrange(feed_key(keys, "c1"))
    assert [f[b"type"] for _, f in feed] == [b"task.progress"] * 5
    assert [orjson.loads(f[b"data"])["pools_checked"] for _, f in feed] == [1, 2, 3, 4, 4]
    assert orjson.loads(feed[-1][1][b"data"])["fraction"] == 1.0


async def test_submission_errors(srv: Server, op: str) -> None:
    agent = await srv.token("agent", ["*"])
    body = {"type": "optimizer.run", "payload": {}}
    assert (await srv.post("/v1/tasks", body))[0] == 401
    status, answer, _ = await srv.post("/v1/tasks", body, token=agent)
    assert status == 403
    assert "operator" in answer["detail"]
    status, answer, _ = await srv.post("/v1/tasks", {"type": "nope"}, token=op)
    assert status == 422
    assert answer["error"] == "unknown_task_type"
    assert "optimizer.run" in answer["known_types"]
    bad = {
        "type": "optimizer.run",
        "payload": {"cluster_id": "c", "instance_types": [], "availability_zones": ["a"]},
    }
    status, answer, _ = await srv.post("/v1/tasks", bad, token=op)
    assert status == 422
    assert answer["path"] == "$.payload.instance_types"
    status, answer, _ = await srv.post("/v1/tasks", {**body, "priority": "urgent"}, token=op)
    assert status == 422
    assert answer["path"] == "$.priority"
    status, answer, _ = await srv.post(
        "/v1/tasks", data=b"{", token=op, headers={"Content-Type": "application/json"}
    )
    assert status == 400
    status, answer, _ = await srv.post(
        "/v1/tasks", data=b"x", token=op, headers={"Content-Type": "application/msgpack"}
    )
    assert status == 415
    status, answer, _ = await srv.post("/v1/tasks/nope", token=op, method="GET")
    assert status == 404
    assert answer["error"] == "not_found"
    status, answer, _ = await srv.post("/v1/tasks/nope", token=op, method="DELETE")
    assert status == 404


async def test_a_retried_submission_returns_the_same_task(
    srv: Server, op: str, client: aioredis.Redis, keys: Keys
) -> None:
    body = {"type": "test.block", "payload": {"label": "x"}}
    a = await submit(srv, op, body, **{"Idempotency-Key": "k1"})
    b = await submit(srv, op, body, **{"Idempotency-Key": "k1"})
    assert a["id"] == b["id"]
    assert a["entry_id"] == b["entry_id"]
    assert await client.xlen(keys.stream("tasks.normal")) == 1


async def test_cancel_a_queued_task_skips_it(
    srv: Server, op: str, runner: Consumer, rec: Recorder, client: aioredis.Redis, keys: Keys
) -> None:
    sub = await submit(srv, op, {"type": "test.block", "payload": {"label": "q"}})
    status, view, _ = await srv.post(f"/v1/tasks/{sub['id']}", token=op, method="DELETE")
    assert status == 200
    assert view["status"] == "cancelled"
    assert await runner.process_once() == 1
    assert rec.started == []
    assert (await task(srv, op, sub["id"]))["status"] == "cancelled"
    pending = await client.xpending(keys.stream("tasks.normal"), "tasks")
    assert pending["pending"] == 0


async def test_cancel_a_running_task_ends_it_cancelled(
    srv: Server, op: str, runner: Consumer, rec: Recorder
) -> None:
    sub = await submit(srv, op, {"type": "test.block", "payload": {"label": "r"}})
    async with running(runner):
        await rec.running.wait()
        view = await task(srv, op, sub["id"])
        assert view["status"] == "running"
        assert view["progress"] == 0.5
        status, view, _ = await srv.post(f"/v1/tasks/{sub['id']}", token=op, method="DELETE")
        assert status == 202
        assert view["cancel_requested"]
        view = await until_status(srv, op, sub["id"], "cancelled", "completed", "failed")
    assert view["status"] == "cancelled"
    assert view["finished_at"]
    status, _answer, _ = await srv.post(f"/v1/tasks/{sub['id']}", token=op, method="DELETE")
    assert status == 200  # cancelling again is harmless


async def test_finished_tasks_cannot_be_cancelled(
    srv: Server, op: str, runner: Consumer, rec: Recorder
) -> None:
    rec.release.set()
    sub = await submit(srv, op, {"type": "test.block", "payload": {"label": "done"}})
    await runner.process_once()
    status, answer, _ = await srv.post(f"/v1/tasks/{sub['id']}", token=op, method="DELETE")
    assert status == 409
    assert answer["task_status"] == "completed"


async def test_waiting_tasks_run_most_urgent_first(
    srv: Server, op: str, runner: Consumer, rec: Recorder
) -> None:
    """One slot (test.block has concurrency 1): the tasks waiting for it go by priority."""
    first = await submit(srv, op, {"type": "test.block", "payload": {"label": "first"}})
    async with running(runner):
        await rec.running.wait()
        ids: dict[str, str] = {}
        for prio in ("low", "normal", "critical", "low", "high"):
            label = f"{prio}-{len(ids)}"
            body = {"type": "test.block", "payload": {"label": label}, "priority": prio}
            ids[label] = (await submit(srv, op, body))["id"]
        # All five are read and waiting for the slot before it frees.
        while runner.stats.read < 6:  # noqa: ASYNC110 - the consumer counts, it has no event
            await asyncio.sleep(0.01)
        rec.release.set()
        for task_id in ids.values():
            await until_status(srv, op, task_id, "completed")
    assert (await task(srv, op, first["id"]))["status"] == "completed"
    assert rec.started == ["first", "critical-2", "high-4", "normal-1", "low-0", "low-3"]


async def test_transient_failures_retry_and_permanent_ones_fail(
    srv: Server, op: str, runner: Consumer, rec: Recorder
) -> None:
    flaky = await submit(srv, op, {"type": "test.flaky", "payload": {"label": "flaky"}})
    bad = await submit(srv, op, {"type": "test.flaky", "payload": {"label": "permanent"}})
    await runner.process_once()
    view = await task(srv, op, flaky["id"])
    assert view["status"] == "queued"
    assert "network blip" in view["error"]
    failed = await task(srv, op, bad["id"])
    assert failed["status"] == "failed"
    assert "bad config" in failed["error"]
    while (await task(srv, op, flaky["id"]))["status"] != "completed":
        await runner.process_once(block_ms=20)
    view = await task(srv, op, flaky["id"])
    assert view["attempts"] == 2
    assert view["result"] == "ok"


async def test_a_type_s_concurrency_holds_across_runner_processes(
    srv: Server,
    op: str,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    rec: Recorder,
) -> None:
    """Two runners (each its own concern and gates, as two processes): test.count has
    concurrency 1, so its tasks never overlap, whichever runner read them."""
    runners = [
        Consumer(
            task_concern(rec.types()),
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            # one task at a time each: the six tasks are shared between the two runners
            settings=ConsumerSettings(
                consumer=f"runner-{n}", block_ms=50, batch=1, max_in_flight=1
            ),
        )
        for n in (1, 2)
    ]
    ids = [
        (await submit(srv, op, {"type": "test.count", "payload": {"label": str(i)}}))["id"]
        for i in range(6)
    ]
    async with running(runners[0]), running(runners[1]):
        for task_id in ids:
            await until_status(srv, op, task_id, "completed")
    assert sorted(rec.started) == [str(i) for i in range(6)]
    assert rec.most == 1
    assert sum(r.stats.read for r in runners) == 6
    assert all(r.stats.read >= 1 for r in runners)  # both ran some: the limit is global
    for part in ("slots", "waiting", "deadline"):  # every slot and place given back
        assert await client.zcard(keys.task_slots("default", "test.count", part)) == 0
