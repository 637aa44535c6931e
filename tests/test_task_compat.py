"""Seed 003's worker-node clients on the task API (``streamproc.ingest.compat``).

The client code below is the seed's "Usage Examples", unchanged but for two things: it is
given its ``requests`` (a small urllib shim that adds the bearer token, the one change a seed
client makes) and its worker URL. It runs in a thread against a real ingest socket on
127.0.0.1, with a real task runner consuming in the test's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.ingest.compat import SeedCall, wants_json
from streamproc.tasks import LoadLimits, TaskContext, TaskType, task_concern
from tests.test_ingest_support import Server, running_ingest

pytestmark = pytest.mark.timeout(60)

MAX_BODY = 64 * 1024
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")


# ---------------------------------------------------------------------- the seed's client


class _Response:
    def __init__(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.status_code, self.content, self.headers = status, body, headers

    def json(self) -> Any:
        return json.loads(self.content)


class SeedRequests:
    """What seed 003's examples use of ``requests``: ``post(url, json=)``, ``get(url)``."""

    def __init__(self, token: str) -> None:
        self.token = token

    def _call(self, method: str, url: str, body: Any = None, **_: Any) -> _Response:
        assert url.startswith("http://127.0.0.1:"), url  # only ever the local test server
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return _Response(r.status, r.read(), dict(r.headers))
        except urllib.error.HTTPError as e:
            return _Response(e.code, e.read(), dict(e.headers))

    def post(self, url: str, json: Any = None, **kw: Any) -> _Response:
        return self._call("POST", url, json, **kw)

    def get(self, url: str, **kw: Any) -> _Response:
        return self._call("GET", url, **kw)


def seed_submit_and_poll(requests: SeedRequests, base: str) -> dict[str, Any]:
    """Seed 003, "Submit Task to Worker" (its URL a parameter; returns the last status)."""
    # Submit task
    response = requests.post(
        f"{base}/task/submit",
        json={
            "payload": {"function": "process_data", "args": [1, 2, 3], "kwargs": {"mode": "fast"}},
            "priority": "high",
        },
    )

    task_id = response.json()["task_id"]
    print(f"Task submitted: {task_id}")

    # Check status
    while True:
        status_response = requests.get(f"{base}/task/{task_id}")
        status = status_response.json()

        print(f"Status: {status['status']}")

        if status["status"] in ["completed", "failed"]:
            print(f"Result: {status.get('result')}")
            print(f"Error: {status.get('error')}")
            break

        time.sleep(1)
    return dict(status)


def seed_monitor_workers(requests: SeedRequests, worker_urls: list[str]) -> None:
    """Seed 003, "Monitor Worker Health"."""
    for url in worker_urls:
        try:
            response = requests.get(f"{url}/health", timeout=5)
            health = response.json()

            print(f"\n{url}:")
            print(f"  Status: {health['status']}")
            print(f"  Active tasks: {health['active_tasks']}")
            print(f"  Queue size: {health['queue_size']}")
            print(f"  CPU: {health['cpu_percent']:.1f}%")
            print(f"  Memory: {health['memory_percent']:.1f}%")

        except Exception as e:
            print(f"\n{url}: ERROR - {e}")


def seed_least_loaded(requests: SeedRequests, worker_urls: list[str]) -> str | None:
    """Seed 003, "Load Balancing" (its bare ``except:`` narrowed to Exception for ruff)."""
    best_worker = None
    min_load = float("inf")

    for url in worker_urls:
        try:
            response = requests.get(f"{url}/health", timeout=2)
            health = response.json()

            # Calculate load score
            load = health["active_tasks"] * 2 + health["queue_size"] + health["cpu_percent"] / 10

            if load < min_load:
                min_load = load
                best_worker = url

        except Exception:
            continue

    return best_worker


# ---------------------------------------------------------------------- fixtures


class Work:
    """The task types a seed client calls: ``process_data`` takes the seed's payload."""

    def __init__(self) -> None:
        self.runs: list[str] = []

    async def process_data(self, p: SeedCall, ctx: TaskContext) -> dict[str, Any]:
        self.runs.append(ctx.task_id)
        return {"sum": sum(p.args), "mode": p.kwargs.get("mode")}

    async def explode(self, p: SeedCall, ctx: TaskContext) -> None:
        raise Permanent("bad input")

    def types(self) -> dict[str, TaskType]:
        return {
            "process_data": TaskType(
                name="process_data", run=self.process_data, payload_type=SeedCall, concurrency=4
            ),
            "explode": TaskType(name="explode", run=self.explode, payload_type=SeedCall),
        }


def _never_shed() -> LoadLimits:
    """This shared 2-core machine sits near 100 % CPU under the suite: no shedding here."""
    return LoadLimits(max_cpu_percent=100, max_memory_percent=100)


@pytest.fixture
def work() -> Work:
    return Work()


@pytest.fixture
async def srv(
    client: aioredis.Redis, keys: Keys, producer: Producer, work: Work
) -> AsyncIterator[Server]:
    async with running_ingest(
        client, keys, producer, task_types=work.types(), max_body_bytes=MAX_BODY
    ) as s:
        yield s


@pytest.fixture
async def op(srv: Server) -> str:
    return await srv.token("ops", [], operator=True)


@contextlib.asynccontextmanager
async def runner(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any], work: Work
) -> AsyncIterator[Consumer]:
    """A task runner consuming in this loop until the block ends."""
    consumer = Consumer(
        task_concern(work.types(), limits=_never_shed()),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="runner-1", block_ms=50, min_idle_ms=60_000),
    )
    run = asyncio.create_task(consumer.run())
    try:
        yield consumer
    finally:
        consumer.stop()
        await run


@pytest.fixture
async def running(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any], work: Work
) -> AsyncIterator[Consumer]:
    async with runner(client, keys, producer, codec, work) as c:
        yield c


async def health_when(srv: Server, token: str, *, runners: int) -> dict[str, Any]:
    """``/health`` once the registry shows ``runners`` live runners (they beat at start)."""
    while True:
        status, health, _ = await srv.post("/health", token=token, method="GET")
        assert status == 200, health
        if health["runners"] == runners:
            return dict(health)
        await asyncio.sleep(0.05)


async def until_ended(srv: Server, token: str, task_id: str) -> dict[str, Any]:
    """Poll ``GET /task/{id}`` as a client does until the task ended."""
    while True:
        status, view, _ = await srv.post(f"/task/{task_id}", token=token, method="GET")
        assert status == 200, view
        if view["state"] in ("completed", "failed", "cancelled"):
            return dict(view)
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def _printed(capsys: pytest.CaptureFixture[str]) -> Iterator[list[str]]:
    """What the client printed in the block (the runner's log lines left out)."""
    capsys.readouterr()
    lines: list[str] = []
    yield lines
    lines += [ln for ln in capsys.readouterr().out.splitlines() if not _LOG_LINE.match(ln)]


# ---------------------------------------------------------------------- tests


async def test_a_seed_client_submits_and_polls_its_task_to_completed(
    srv: Server, running: Consumer, work: Work, capsys: pytest.CaptureFixture[str]
) -> None:
    token = await srv.token("seed-client", [], operator=True)
    with _printed(capsys) as out:
        final = await asyncio.to_thread(seed_submit_and_poll, SeedRequests(token), srv.url)
    assert out[-3:] == ["Status: completed", "Result: {'sum': 6, 'mode': 'fast'}", "Error: None"]
    assert out[0] == f"Task submitted: {final['task_id']}"
    assert work.runs == [final["task_id"]]
    # The seed's fields, then ours.
    assert final["status"] == "completed"
    assert final["result"] == {"sum": 6, "mode": "fast"}
    assert final["error"] is None
    for stamp in ("queued_at", "started_at", "completed_at"):
        assert final[stamp].endswith("Z"), stamp
    assert final["queued_at"] <= final["started_at"] <= final["completed_at"]
    assert final["state"] == "completed"
    assert final["task_type"] == "process_data"
    assert final["priority"] == "high"
    assert final["attempts"] == 1
    assert final["submitted_by"] == "seed-client"


async def test_the_submit_answer_and_where_the_type_comes_from(srv: Server, op: str) -> None:
    body = {"payload": {"function": "process_data", "args": [1]}, "priority": "critical"}
    status, answer, headers = await srv.post("/task/submit", body, token=op)
    assert status == 200, answer
    assert answer["status"] == "queued"
    assert answer["position"] == 1  # nothing else waits at critical
    assert answer["task_type"] == "process_data"
    assert headers["Location"] == f"/task/{answer['task_id']}"
    # task_type wins over payload.function, whose payload is then the type's as it is
    body = {"task_type": "explode", "payload": {"function": "process_data"}}
    status, answer, _ = await srv.post("/task/submit", body, token=op)
    assert status == 200, answer
    assert answer["task_type"] == "explode"
    assert answer["position"] == 2  # normal: behind the critical one
    status, view, _ = await srv.post(f"/v1/tasks/{answer['task_id']}", token=op, method="GET")
    assert status == 200
    assert view["type"] == "explode"


async def test_a_client_chosen_task_id_is_idempotent(
    srv: Server,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    work: Work,
) -> None:
    _, alice = await srv.agents.add("alice", submit=["process_data"])
    _, bob = await srv.agents.add("bob", submit=["process_data"])
    body = {"task_id": "task_123", "payload": {"function": "process_data", "args": [2, 3]}}
    status, first, _ = await srv.post("/task/submit", body, token=alice)
    assert status == 200, first
    assert first["task_id"] == "task_123"
    status, again, _ = await srv.post("/task/submit", body, token=alice)
    assert status == 200, again
    assert again["task_id"] == "task_123"
    assert await client.xlen(keys.stream("tasks.normal")) == 1  # one request, not two
    status, taken, _ = await srv.post("/task/submit", body, token=bob)
    assert status == 409, taken
    assert taken["error"] == "task_id_taken"
    assert taken["path"] == "$.task_id"
    async with runner(client, keys, producer, codec, work):
        await until_ended(srv, alice, "task_123")
    assert work.runs == ["task_123"]
    # Submitting the finished task's id again answers it as it stands, and runs nothing.
    status, done, _ = await srv.post("/task/submit", body, token=alice)
    assert status == 200
    assert done["status"] == "completed"
    assert work.runs == ["task_123"]


BAD_BODIES: list[tuple[str, bytes, int, str, str | None]] = [
    ("not JSON", b'{"payload": ', 400, "malformed_json", None),
    ("not UTF-8", b'{"payload": {"function": "\xff"}}', 400, "invalid_utf8", None),
    ("an array", b"[1, 2]", 422, "invalid", "$"),
    ("no payload", b'{"priority": "high"}', 422, "invalid", "$"),
    ("payload not an object", b'{"payload": [1]}', 422, "invalid", "$.payload"),
    ("unknown field", b'{"payload": {}, "task_type": "explode", "x": 1}', 422, "invalid", "$"),
    ("bad priority", b'{"payload": {}, "priority": "urgent"}', 422, "invalid", "$.priority"),
    ("no type anywhere", b'{"payload": {"args": []}}', 422, "missing_task_type", "$.task_type"),
    (
        "function not a string",
        b'{"payload": {"function": 7}}',
        422,
        "invalid",
        "$.payload.function",
    ),
    (
        "unknown function",
        b'{"payload": {"function": "rm_rf"}}',
        422,
        "unknown_task_type",
        "$.payload.function",
    ),
    (
        "unknown task_type",
        b'{"payload": {}, "task_type": "nope"}',
        422,
        "unknown_task_type",
        "$.task_type",
    ),
    ("empty task_type", b'{"payload": {}, "task_type": ""}', 422, "invalid", "$.task_type"),
    (
        "task_id with a slash",
        b'{"payload": {"function": "process_data"}, "task_id": "a/b"}',
        422,
        "invalid",
        "$.task_id",
    ),
    (
        "task_id too long",
        b'{"payload": {"function": "process_data"}, "task_id": "' + b"a" * 129 + b'"}',
        422,
        "invalid",
        "$.task_id",
    ),
    (
        "args not a list",
        b'{"payload": {"function": "process_data", "args": 5}}',
        422,
        "invalid",
        "$.payload.args",
    ),
    (
        "unknown payload field",
        b'{"payload": {"function": "process_data", "argz": []}}',
        422,
        "invalid",
        "$.payload",
    ),
    (
        "nested too deep",
        b'{"payload": {"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}}",
        400,
        "too_deep",
        None,
    ),
    (
        "over the size limit",
        b'{"payload": {"x": "' + b"a" * MAX_BODY + b'"}}',
        413,
        "body_too_large",
        None,
    ),
    ("empty", b"", 400, "empty_body", None),
]


@pytest.mark.parametrize(
    ("body", "status", "error", "path"),
    [pytest.param(b, s, e, p, id=name) for name, b, s, e, p in BAD_BODIES],
)
async def test_broken_huge_and_hostile_bodies_are_refused_precisely(
    srv: Server, op: str, body: bytes, status: int, error: str, path: str | None
) -> None:
    got, answer, _ = await srv.post(
        "/task/submit", data=body, token=op, headers={"Content-Type": "application/json"}
    )
    assert got == status, answer
    assert answer["error"] == error, answer
    assert answer.get("path") == path, answer
    assert answer["detail"]


async def test_who_may_submit(srv: Server, op: str) -> None:
    body = {"payload": {"function": "process_data"}}
    assert (await srv.post("/task/submit", body))[0] == 401
    poster = await srv.token("poster", ["*"])  # posts events, no task scope
    status, answer, _ = await srv.post("/task/submit", body, token=poster)
    assert status == 403, answer
    _, narrow = await srv.agents.add("narrow", submit=["explode"])
    status, answer, _ = await srv.post("/task/submit", body, token=narrow)
    assert status == 403, answer
    assert answer["path"] == "$.payload.function"
    status, answer, _ = await srv.post(
        "/task/submit", data=b"x", token=op, headers={"Content-Type": "text/plain"}
    )
    assert status == 415


async def test_another_agent_cannot_read_the_task(srv: Server, op: str) -> None:
    _, alice = await srv.agents.add("alice", submit=["process_data"])
    _, bob = await srv.agents.add("bob", submit=["process_data"])
    status, sub, _ = await srv.post(
        "/task/submit", {"payload": {"function": "process_data"}}, token=alice
    )
    assert status == 200, sub
    path = f"/task/{sub['task_id']}"
    assert (await srv.post(path, token=alice, method="GET"))[0] == 200
    assert (await srv.post(path, token=op, method="GET"))[0] == 200
    status, theirs, _ = await srv.post(path, token=bob, method="GET")
    status_none, none, _ = await srv.post("/task/no-such-task", token=bob, method="GET")
    assert (status, status_none) == (404, 404)
    assert theirs["error"] == none["error"] == "not_found"  # an id says nothing to others
    assert (await srv.post(path, method="GET"))[0] == 401
    assert (await srv.post("/task/bad%20id", token=op, method="GET"))[0] == 404


async def test_a_cancelled_task_ends_a_seed_client_s_poll_as_failed(srv: Server, op: str) -> None:
    status, sub, _ = await srv.post(
        "/task/submit", {"payload": {"function": "process_data"}}, token=op
    )
    assert status == 200
    status, _, _ = await srv.post(f"/v1/tasks/{sub['task_id']}", token=op, method="DELETE")
    assert status == 200
    status, view, _ = await srv.post(f"/task/{sub['task_id']}", token=op, method="GET")
    assert status == 200
    assert (view["status"], view["state"]) == ("failed", "cancelled")
    assert view["error"]
    assert view["completed_at"]


async def test_health_over_the_live_runners_and_this_ingest(
    srv: Server,
    op: str,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    work: Work,
    capsys: pytest.CaptureFixture[str],
) -> None:
    health = await health_when(srv, op, runners=0)
    assert health["status"] == "degraded"
    assert "no live task runner" in health["reason"]
    for priority in ("low", "high"):
        body = {"payload": {"function": "explode"}, "priority": priority}
        assert (await srv.post("/task/submit", body, token=op))[0] == 200
    health = await health_when(srv, op, runners=0)
    assert health["queue_size"] == 2
    assert health["queue_sizes"] == {"critical": 0, "high": 1, "normal": 0, "low": 1}
    [ingest] = health["workers"]
    assert ingest["role"] == "ingest"
    assert health["worker_id"] == ingest["worker_id"]
    async with runner(client, keys, producer, codec, work):
        health = await health_when(srv, op, runners=1)
        assert health["status"] == "healthy"
        assert health["reason"] is None
        assert [w["role"] for w in health["workers"]] == ["ingest", "runner"]
        assert health["workers"][1]["queues"] == ["default"]
        assert health["workers"][1]["worker_id"] == "runner-1"
        assert 0 <= health["cpu_percent"] <= 100
        assert 0 < health["memory_percent"] <= 100, health
        assert health["uptime_seconds"] >= 0
        assert isinstance(health["active_tasks"], int)
        # The seed's monitoring and load-balancing code reads it unchanged.
        requests = SeedRequests(op)
        with _printed(capsys) as out:
            await asyncio.to_thread(seed_monitor_workers, requests, [srv.url])
        assert out[1:3] == [f"{srv.url}:", "  Status: healthy"]
        assert out[3].startswith("  Active tasks: ")
        assert out[4].startswith("  Queue size: ")
        assert re.fullmatch(r"  CPU: \d+\.\d%", out[5])
        assert re.fullmatch(r"  Memory: \d+\.\d%", out[6])
        assert await asyncio.to_thread(seed_least_loaded, requests, [srv.url]) == srv.url
    assert (await srv.post("/health", method="GET"))[0] == 401


async def test_metrics_as_json_when_asked_prometheus_text_otherwise(
    srv: Server, op: str, running: Consumer
) -> None:
    ids = []
    for body in (
        {"payload": {"function": "process_data", "args": [1]}},
        {"payload": {"function": "process_data", "args": [2]}},
        {"payload": {"function": "explode"}},
    ):
        status, sub, _ = await srv.post("/task/submit", body, token=op)
        assert status == 200, sub
        ids.append(sub["task_id"])
    for task_id in ids:
        await until_ended(srv, op, task_id)
    json_accept = {"Accept": "application/json"}
    status, m, headers = await srv.post("/metrics", token=op, method="GET", headers=json_accept)
    assert status == 200, m
    assert headers["Content-Type"].startswith("application/json")
    assert (m["tasks_completed"], m["tasks_failed"], m["tasks_cancelled"]) == (2, 1, 0)
    assert m["tasks_queued"] == 0
    assert m["runs"] == 3
    assert m["average_execution_time"] >= 0
    assert m["by_type"]["process_data"]["tasks_completed"] == 2
    assert m["by_type"]["explode"]["tasks_failed"] == 1
    assert m["cpu_cores"] >= 1
    assert m["memory_total_gb"] > 0
    assert m["uptime_seconds"] >= 0
    # Without the header (curl, requests, Prometheus): the Prometheus text, no token needed.
    status, text, headers = await srv.post("/metrics", method="GET")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "streamproc_tasks_submitted_total" in text
    assert (await srv.post("/metrics", method="GET", headers=json_accept))[0] == 401


@pytest.mark.parametrize(
    ("accept", "json_wanted"),
    [
        ("application/json", True),
        ("application/json, text/plain;q=0.5", True),
        ("text/plain, application/json;q=0.9", False),
        ("*/*", False),
        ("", False),
        (
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            False,
        ),
        ("application/json;q=0", False),
        ("application/json;q=x", False),
    ],
)
def test_which_accept_headers_get_json(accept: str, json_wanted: bool) -> None:
    assert wants_json(accept) is json_wanted


def test_the_openapi_document_lists_the_compat_routes() -> None:
    from streamproc.ingest.openapi import build_spec

    spec = msgspec.json.decode(msgspec.json.encode(build_spec([], {}, max_batch=10)))
    submit = spec["paths"]["/task/submit"]["post"]
    assert set(submit["responses"]) >= {
        "200",
        "400",
        "401",
        "403",
        "409",
        "413",
        "415",
        "422",
        "503",
    }
    assert "/task/{task_id}" in spec["paths"]
    assert "/health" in spec["paths"]
    assert "application/json" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
