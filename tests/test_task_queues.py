"""Task queues, dedicated runners, priority across runners, time limits, roles, history and
load shedding — through the real ingest (HTTP on 127.0.0.1) and runners on a real Redis."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.tasks import (
    LoadLimits,
    RunnerRegistry,
    SoftTimeLimit,
    TaskContext,
    TaskHistory,
    TaskType,
    task_concern,
    task_concerns,
)
from streamproc.tasks import runner as runner_module
from tests import task_fns
from tests.helpers import cli_in_process
from tests.test_ingest_support import Server, running_ingest
from tests.test_tasks import running, submit, task, until_status

pytestmark = pytest.mark.timeout(90)


class Step(msgspec.Struct):
    label: str = ""
    seconds: float = 0.0


class Lab:
    """Task types that record what started, in order, and wait to be let go."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def hold(self, p: Step, ctx: TaskContext) -> str:
        self.started.append(p.label)
        await self.release.wait()
        return p.label

    async def quick(self, p: Step, ctx: TaskContext) -> str:
        self.started.append(p.label)
        return p.label

    async def slow(self, p: Step, ctx: TaskContext) -> dict[str, Any]:
        """Works in steps; at the soft limit it saves what it has and returns it."""
        done = 0
        try:
            while True:
                await asyncio.sleep(0.02)
                done += 1
                await ctx.progress(0.5, steps=done)
        except SoftTimeLimit:
            return {"partial": True, "steps": done}

    async def ignores_soft(self, p: Step, ctx: TaskContext) -> str:
        while True:
            try:
                await asyncio.sleep(10)
            except SoftTimeLimit:
                continue

    async def lets_soft_out(self, p: Step, ctx: TaskContext) -> str:
        self.started.append(p.label)
        await asyncio.sleep(10)
        return "never"

    def types(self) -> dict[str, TaskType]:
        return {
            t.name: t
            for t in (
                TaskType(name="crawl.hold", run=self.hold, payload_type=Step, queue="crawl"),
                TaskType(name="crawl.quick", run=self.quick, payload_type=Step, queue="crawl"),
                TaskType(name="ticket.quick", run=self.quick, payload_type=Step, queue="tickets"),
                TaskType(
                    name="crawl.slow",
                    run=self.slow,
                    payload_type=Step,
                    queue="crawl",
                    soft_time_limit_s=0.3,
                    time_limit_s=20,
                ),
                TaskType(
                    name="crawl.stubborn",
                    run=self.ignores_soft,
                    payload_type=Step,
                    queue="crawl",
                    soft_time_limit_s=0.2,
                    time_limit_s=0.6,
                ),
                TaskType(
                    name="crawl.retried",
                    run=self.lets_soft_out,
                    payload_type=Step,
                    queue="crawl",
                    soft_time_limit_s=0.2,
                    retry_on_timeout=True,
                    max_retries=1,
                    retry_base_s=0.01,
                ),
                TaskType(
                    name="crawl.blocking",
                    run=task_fns.sleepy,
                    queue="crawl",
                    blocking=True,
                    soft_time_limit_s=0.5,
                    time_limit_s=30,
                ),
                TaskType(
                    name="crawl.blocked",
                    run=task_fns.stubborn,
                    queue="crawl",
                    blocking=True,
                    soft_time_limit_s=0.3,
                    time_limit_s=1.5,
                ),
                TaskType(name="crawl.add", run=task_fns.add, queue="crawl", blocking=True),
            )
        }


@pytest.fixture
def lab() -> Lab:
    return Lab()


@pytest.fixture
async def srv(
    client: aioredis.Redis, keys: Keys, producer: Producer, lab: Lab
) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, task_types=lab.types()) as s:
        yield s


@pytest.fixture
async def op(srv: Server) -> str:
    return await srv.token("ops", [], operator=True)


def consumer(
    concern: Any,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    name: str = "runner-1",
    **settings: Any,
) -> Consumer:
    return Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer=name, block_ms=50, min_idle_ms=60_000, **settings),
    )


def only(types: dict[str, TaskType], *names: str) -> dict[str, TaskType]:
    return {n: types[n] for n in names}


# ---------------------------------------------------------------------- queues


async def test_a_dedicated_runner_runs_its_queue_only(
    srv: Server,
    op: str,
    lab: Lab,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    concerns = {c.group: c for c in task_concerns(lab.types(), queues={"crawl": 2})}
    assert sorted(concerns) == ["tasks-crawl", "tasks-tickets"]
    crawl = consumer(concerns["tasks-crawl"], client, keys, producer, codec)
    ticket = (await submit(srv, op, {"type": "ticket.quick", "payload": {"label": "t"}}))["id"]
    page = (await submit(srv, op, {"type": "crawl.quick", "payload": {"label": "c"}}))["id"]
    async with running(crawl):
        await until_status(srv, op, page, "completed")
        view = await task(srv, op, ticket)
    assert view["status"] == "queued"
    assert view["attempts"] == 0
    assert view["queue"] == "tickets"
    tickets = consumer(concerns["tasks-tickets"], client, keys, producer, codec, "runner-2")
    async with running(tickets):
        await until_status(srv, op, ticket, "completed")
    assert lab.started == ["c", "t"]


async def test_a_type_the_runner_does_not_load_is_left_for_one_that_does(
    srv: Server,
    op: str,
    lab: Lab,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An older runner (without crawl.hold) beside a newer ingest: it defers, never fails."""
    monkeypatch.setattr(runner_module, "NOT_LOADED_DELAY_S", 0.2)
    types = lab.types()
    old = consumer(task_concern(only(types, "crawl.quick")), client, keys, producer, codec)
    task_id = (await submit(srv, op, {"type": "crawl.hold", "payload": {"label": "h"}}))["id"]
    async with running(old):
        while old.stats.retried < 2:  # noqa: ASYNC110 - deferred at least twice
            await asyncio.sleep(0.02)
        view = await task(srv, op, task_id)
    assert view["status"] == "queued"
    assert view["attempts"] == 0
    assert view["error"] is None
    new = consumer(
        task_concern(only(types, "crawl.hold", "crawl.quick")), client, keys, producer, codec
    )
    lab.release.set()
    async with running(new):
        await until_status(srv, op, task_id, "completed")


async def test_a_freed_slot_goes_to_the_most_urgent_task_whichever_runner_read_it(
    srv: Server,
    op: str,
    lab: Lab,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    """Two runners (two concerns: two processes), crawl.hold one at a time across both. Low
    tasks are read and wait; a critical one submitted after them runs first."""
    types = only(lab.types(), "crawl.hold")
    runners = [
        consumer(task_concern(types), client, keys, producer, codec, f"runner-{n}", batch=2)
        for n in (1, 2)
    ]
    first = (await submit(srv, op, {"type": "crawl.hold", "payload": {"label": "first"}}))["id"]
    async with running(runners[0]), running(runners[1]):
        await until_status(srv, op, first, "running")
        lows = [
            (
                await submit(
                    srv,
                    op,
                    {"type": "crawl.hold", "payload": {"label": f"low{i}"}, "priority": "low"},
                )
            )["id"]
            for i in range(3)
        ]
        urgent = (
            await submit(
                srv,
                op,
                {"type": "crawl.hold", "payload": {"label": "urgent"}, "priority": "critical"},
            )
        )["id"]
        waiting = keys.task_slots("crawl", "crawl.hold", "waiting")
        members: Any = []
        while not any(m.endswith(urgent.encode()) for m in members):
            await asyncio.sleep(0.02)  # until the critical task waits in Redis
            members = await client.zrange(waiting, 0, -1)
        lab.release.set()
        for task_id in (urgent, *lows):
            await until_status(srv, op, task_id, "completed")
    assert lab.started[:2] == ["first", "urgent"]
    assert sorted(lab.started[2:]) == ["low0", "low1", "low2"]


# ---------------------------------------------------------------------- time limits


@pytest.fixture
def crawl_runner(
    lab: Lab, client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> Consumer:
    crawl = {n: t for n, t in lab.types().items() if t.queue == "crawl"}
    return consumer(task_concern(crawl), client, keys, producer, codec)


async def test_the_soft_limit_lets_a_task_save_partial_results(
    srv: Server, op: str, crawl_runner: Consumer
) -> None:
    task_id = (await submit(srv, op, {"type": "crawl.slow"}))["id"]
    async with running(crawl_runner):
        view = await until_status(srv, op, task_id, "completed", "failed")
    assert view["status"] == "completed"
    assert view["result"]["partial"] is True
    assert view["result"]["steps"] >= 1
    assert view["time_limit"] == "soft"


async def test_the_hard_limit_ends_a_task_that_ignores_the_soft_one(
    srv: Server, op: str, crawl_runner: Consumer
) -> None:
    task_id = (await submit(srv, op, {"type": "crawl.stubborn"}))["id"]
    async with running(crawl_runner):
        view = await until_status(srv, op, task_id, "completed", "failed")
    assert view["status"] == "failed"
    assert view["time_limit"] == "hard"
    assert view["error"].startswith("TimeLimit: the hard time limit (0.6 s)")
    assert view["attempts"] == 1  # retry_on_timeout is off: not tried again


async def test_a_timed_out_task_is_retried_when_its_type_says_so(
    srv: Server, op: str, lab: Lab, crawl_runner: Consumer
) -> None:
    task_id = (await submit(srv, op, {"type": "crawl.retried", "payload": {"label": "r"}}))["id"]
    async with running(crawl_runner):
        view = await until_status(srv, op, task_id, "completed", "failed")
    assert view["status"] == "failed"
    assert view["time_limit"] == "soft"
    assert view["error"].startswith("SoftTimeLimit")
    assert view["attempts"] == 2
    assert lab.started == ["r", "r"]


async def test_blocking_code_runs_in_a_child_that_the_limits_reach(
    srv: Server, op: str, crawl_runner: Consumer
) -> None:
    ids = {
        name: (await submit(srv, op, {"type": name, "payload": payload}))["id"]
        for name, payload in (
            ("crawl.add", {"a": 2, "b": 3}),
            ("crawl.blocking", {}),
            ("crawl.blocked", {}),
        )
    }
    async with running(crawl_runner):
        views = {n: await until_status(srv, op, i, "completed", "failed") for n, i in ids.items()}
    assert views["crawl.add"]["result"] == 5, views
    soft = views["crawl.blocking"]
    assert soft["status"] == "completed", soft
    assert soft["time_limit"] == "soft", soft
    assert soft["result"]["partial"] is True  # SIGUSR1 raised SoftTimeLimit out of time.sleep
    hard = views["crawl.blocked"]
    assert hard["status"] == "failed", hard
    assert hard["time_limit"] == "hard", hard


# ---------------------------------------------------------------------- roles, history


async def test_a_submit_token_submits_its_types_and_sees_only_its_own_tasks(
    srv: Server, op: str, lab: Lab, crawl_runner: Consumer
) -> None:
    alice = await srv.token("alice", [], submit=["crawl.*"])
    bob = await srv.token("bob", [], submit=["crawl.*"])
    status, answer, _ = await srv.post("/v1/tasks", {"type": "ticket.quick"}, token=alice)
    assert status == 403
    assert answer["path"] == "$.type"
    mine = (await submit(srv, alice, {"type": "crawl.hold", "payload": {"label": "a"}}))["id"]
    assert (await task(srv, alice, mine))["submitted_by"] == "alice"
    for method in ("GET", "DELETE"):  # bob cannot see it, nor cancel it
        status, answer, _ = await srv.post(f"/v1/tasks/{mine}", token=bob, method=method)
        assert status == 404, answer
    # a client-chosen id that another submitter already uses is refused
    body = {"type": "crawl.quick", "id": mine}
    status, answer, _ = await srv.post("/v1/tasks", body, token=bob)
    assert status == 409
    assert answer["error"] == "task_id_taken"
    # alice cancels her own queued task; who did it is recorded
    status, view, _ = await srv.post(f"/v1/tasks/{mine}", token=alice, method="DELETE")
    assert status == 200
    assert view["status"] == "cancelled"
    assert view["cancelled_by"] == "alice"
    theirs = (await submit(srv, bob, {"type": "crawl.quick", "payload": {"label": "b"}}))["id"]
    async with running(crawl_runner):
        await until_status(srv, op, theirs, "completed")
    status, page, _ = await srv.post("/v1/tasks", token=alice, method="GET")
    assert status == 200
    assert [t["id"] for t in page["tasks"]] == [mine]
    status, page, _ = await srv.post("/v1/tasks", token=op, method="GET")
    assert [t["id"] for t in page["tasks"]] == [theirs, mine]  # operators see all, newest first
    status, page, _ = await srv.post("/v1/tasks?status=completed", token=op, method="GET")
    assert [t["id"] for t in page["tasks"]] == [theirs]
    for bad in ("status=nope", "limit=0", "limit=x", "before=-1", "stauts=failed"):
        status, answer, _ = await srv.post(f"/v1/tasks?{bad}", token=op, method="GET")
        assert (status, answer["error"]) == (400, "invalid_query"), bad


async def test_the_same_client_task_id_names_the_same_task(
    srv: Server, op: str, lab: Lab, crawl_runner: Consumer, client: aioredis.Redis, keys: Keys
) -> None:
    body = {"type": "crawl.quick", "id": "task_123", "payload": {"label": "once"}}
    first = await submit(srv, op, body)
    again = await submit(srv, op, body)
    assert first["id"] == again["id"] == "task_123"
    async with running(crawl_runner):
        await until_status(srv, op, "task_123", "completed")
        await asyncio.sleep(0.2)  # a second entry, if there were one, would run meanwhile
    assert lab.started == ["once"]
    stats = await TaskHistory(client, keys).stats()
    assert stats["crawl.quick"].completed == 1
    assert stats["crawl.quick"].runs == 1


async def test_the_history_cli_lists_finished_tasks(
    srv: Server,
    op: str,
    crawl_runner: Consumer,
    redis_url: str,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    task_id = (await submit(srv, op, {"type": "crawl.quick", "payload": {"label": "h"}}))["id"]
    async with running(crawl_runner):
        await until_status(srv, op, task_id, "completed")
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    run = await asyncio.to_thread(
        cli_in_process, monkeypatch, capsys, env, "tasks", "history", "--json"
    )
    assert run.returncode == 0, run.stderr
    lines = [x for x in run.stdout.splitlines() if x.startswith("{")]  # the session logs here
    assert [msgspec.json.decode(x)["id"] for x in lines] == [task_id]
    text = await asyncio.to_thread(cli_in_process, monkeypatch, capsys, env, "tasks", "history")
    [row] = [x for x in text.stdout.splitlines() if task_id in x]
    # when it finished: ISO-8601 UTC and how long ago (issue 19 item 7)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \((\d+ s ago|now)\) ", row), row
    bad = await asyncio.to_thread(
        cli_in_process, monkeypatch, capsys, env, "tasks", "--queues", "nope"
    )
    assert bad.returncode == 2
    assert "unknown queue(s) nope" in bad.stderr


async def test_queued_and_running_tasks_are_listed_and_shown_and_cancelled(
    srv: Server,
    op: str,
    lab: Lab,
    crawl_runner: Consumer,
    client: aioredis.Redis,
    redis_url: str,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The active index (issue 19 item 2): GET /v1/tasks and `tasks list` show queued and
    running tasks before finished ones; `tasks show` and `tasks cancel` act on one."""
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}

    async def cli(*args: str) -> Any:
        return await asyncio.to_thread(cli_in_process, monkeypatch, capsys, env, "tasks", *args)

    async with running(crawl_runner):  # (a Consumer runs once)
        done = (await submit(srv, op, {"type": "crawl.quick", "payload": {"label": "d"}}))["id"]
        await until_status(srv, op, done, "completed")
        held = (await submit(srv, op, {"type": "crawl.hold", "payload": {"label": "r"}}))["id"]
        await until_status(srv, op, held, "running")
        # no runner reads the tickets queue here: this one stays queued
        body = {"type": "ticket.quick", "payload": {"label": "q"}}
        queued = (await submit(srv, op, body))["id"]
        status, page, _ = await srv.post("/v1/tasks", token=op, method="GET")
        assert status == 200
        assert [(t["id"], t["status"]) for t in page["tasks"]] == [
            (queued, "queued"),
            (held, "running"),
            (done, "completed"),
        ]
        status, page, _ = await srv.post("/v1/tasks?status=running", token=op, method="GET")
        assert [t["id"] for t in page["tasks"]] == [held]
        status, page, _ = await srv.post("/v1/tasks?limit=1", token=op, method="GET")
        assert [t["id"] for t in page["tasks"]] == [queued]
        assert page["next"]  # the rest, finished ones included, is reachable
        listed = await cli("list", "--json")
        assert listed.returncode == 0, listed.stderr
        rows = [msgspec.json.decode(x) for x in listed.stdout.splitlines() if x.startswith("{")]
        assert [r["id"] for r in rows] == [queued, held, done]
        shown = await cli("show", held)
        assert shown.returncode == 0, shown.stderr
        assert "crawl.hold" in shown.stdout
        assert "running" in shown.stdout
        cancelled = await cli("cancel", queued)
        assert cancelled.returncode == 0, cancelled.stderr
        assert "cancelled (it was queued)" in cancelled.stdout
        status, view, _ = await srv.post(f"/v1/tasks/{queued}", token=op, method="GET")
        assert (view["status"], view["cancelled_by"]) == ("cancelled", "cli")
        lab.release.set()
        await until_status(srv, op, held, "completed")
    # nothing is active any more: the index is empty
    assert await client.zcard(keys.task_active()) == 0
    missing = await cli("show", "nope")
    assert missing.returncode == 1
    assert "not found: task nope" in missing.stderr
    again = await cli("cancel", done)
    assert again.returncode == 1
    assert "already completed" in again.stdout


# ---------------------------------------------------------------------- load shedding


async def test_a_runner_over_its_ceiling_sheds_and_submissions_get_503_when_all_do(
    srv: Server,
    op: str,
    lab: Lab,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(runner_module, "SHED_DELAY_S", 0.2)
    types = only(lab.types(), "crawl.quick")
    # 1 % of memory: this host is always above it, so this runner always sheds
    hot = consumer(
        task_concern(types, limits=LoadLimits(max_memory_percent=1)),
        client,
        keys,
        producer,
        codec,
        "hot",
    )
    registry = RunnerRegistry(client, keys)
    async with running(hot):
        while not [r for r in await registry.list("crawl") if r.shedding]:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.1)  # the ingest's cached view of the runners expires
        status, answer, headers = await srv.post("/v1/tasks", {"type": "crawl.quick"}, token=op)
        assert (status, answer["error"]) == (503, "overloaded"), answer
        assert int(headers["Retry-After"]) >= 1
        cool = consumer(task_concern(types), client, keys, producer, codec, "cool")
        async with running(cool):
            while len(await registry.list("crawl")) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.1)
            task_id = (await submit(srv, op, {"type": "crawl.quick", "payload": {"label": "x"}}))[
                "id"
            ]
            await until_status(srv, op, task_id, "completed")
    assert hot.stats.acked == 0  # the shedding runner started nothing
    assert lab.started == ["x"]


async def test_the_dashboard_panel_shows_finished_tasks_and_runners(
    srv: Server, op: str, crawl_runner: Consumer, client: aioredis.Redis, keys: Keys
) -> None:
    from streamproc.tasks.panel import COLUMNS, read_tasks

    task_id = (await submit(srv, op, {"type": "crawl.stubborn"}))["id"]
    async with running(crawl_runner):
        await until_status(srv, op, task_id, "failed")
        registry = RunnerRegistry(client, keys)
        while not await registry.list():  # noqa: ASYNC110 - the registry is polled
            await asyncio.sleep(0.05)
        data = await read_tasks(client, keys)
    [row] = data.rows
    assert dict(zip(COLUMNS, row, strict=True)) | {"finished": None, "took s": None} == {
        "finished": None,
        "task": task_id,
        "type": "crawl.stubborn",
        "queue": "crawl",
        "status": "failed (hard limit)",
        "took s": None,
        "attempts": 1,
        "submitter": "ops",
    }
    assert data.total == 1
    assert data.note.startswith("1 live runner(s)")
