"""``STREAMPROC_TASK_CONCURRENCY``: a queue's concurrency (across every runner) from the
environment, read by the application's ``configure`` (``consumers.tasks``) and applied to
tasks that start afterwards; a bad value stops the role with exit 2 and names the variable
and the item."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from consumers import tasks as app_tasks
from schemas.tasks import QUEUES
from streamproc import Codec, Keys, Producer
from streamproc.config import parse_task_concurrency
from streamproc.errors import ConfigError
from streamproc.tasks import TaskContext, TaskType, task_concerns
from tests.helpers import cli_in_process
from tests.test_cli import cli
from tests.test_ingest_support import Server, running_ingest
from tests.test_task_queues import consumer
from tests.test_tasks import running, submit, until_status

pytestmark = pytest.mark.timeout(60)

VAR = "STREAMPROC_TASK_CONCURRENCY"


class Step(msgspec.Struct):
    label: str = ""


class Held:
    """Tasks that start, say so, and wait to be let go."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release = asyncio.Event()

    async def hold(self, p: Step, ctx: TaskContext) -> str:
        self.started.append(p.label)
        await self.release.wait()
        return p.label

    def types(self) -> dict[str, TaskType]:
        return {
            # Its own limit is the queue's figure in code: it follows the queue's figure.
            "crawl.wide": TaskType(
                name="crawl.wide", run=self.hold, payload_type=Step, queue="crawl", concurrency=2
            ),
            # A stricter limit of its own: kept whatever the queue's figure.
            "crawl.narrow": TaskType(
                name="crawl.narrow", run=self.hold, payload_type=Step, queue="crawl"
            ),
        }


@pytest.fixture
def held() -> Held:
    return Held()


@pytest.fixture
async def srv(
    client: aioredis.Redis, keys: Keys, producer: Producer, held: Held
) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, task_types=held.types()) as s:
        yield s


@pytest.fixture
def restore_app_queues() -> Iterator[None]:
    yield
    app_tasks.configure_from_env({})


async def waiting(client: aioredis.Redis, keys: Keys, task_type: str) -> int:
    """Tasks waiting for a slot (of the queue crawl, or of ``task_type`` within it)."""
    lists = [keys.task_slots("crawl", t, "waiting") for t in (None, task_type)]
    return sum([int(await client.zcard(k)) for k in lists])


async def until(check: Any) -> None:
    while not await check():  # noqa: ASYNC110
        await asyncio.sleep(0.01)  # the state is in Redis: nothing to wait on here


async def test_a_queue_figure_changed_after_the_concerns_were_built_holds_for_new_tasks(
    srv: Server,
    held: Held,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    """The application builds its concerns at import and reads the environment later: the
    queue's figure is read as each task starts. crawl: 2 in code, 3 from the environment →
    three run at once, the fourth waits for a slot; the narrower type keeps its own 1."""
    limits: dict[str, int | None] = {"crawl": 2}
    [concern] = task_concerns(held.types(), queues=limits)
    limits.update(parse_task_concurrency("crawl=3", queues=limits))
    op = await srv.token("ops", [], operator=True)
    ids = [
        (await submit(srv, op, {"type": "crawl.wide", "payload": {"label": f"w{n}"}}))["id"]
        for n in range(4)
    ]
    runner = consumer(concern, client, keys, producer, codec)
    async with running(runner):

        async def three_run_one_waits() -> bool:
            return len(held.started) == 3 and await waiting(client, keys, "crawl.wide") == 1

        await until(three_run_one_waits)
        held.release.set()
        for task_id in ids:
            await until_status(srv, op, task_id, "completed")
        held.release.clear()
        narrow = [
            (await submit(srv, op, {"type": "crawl.narrow", "payload": {"label": f"n{n}"}}))["id"]
            for n in range(2)
        ]

        async def one_runs_one_waits() -> bool:
            return len(held.started) == 5 and await waiting(client, keys, "crawl.narrow") == 1

        await until(one_runs_one_waits)
        held.release.set()
        for task_id in narrow:
            await until_status(srv, op, task_id, "completed")
    assert sorted(held.started) == ["n0", "n1", "w0", "w1", "w2", "w3"]


def test_the_application_reads_the_variable_and_an_empty_one_restores_the_code(
    restore_app_queues: None,
) -> None:
    limits = app_tasks.QUEUE_LIMITS  # what the concerns read, changed in place
    code = {q: n for q, n in QUEUES.items() if q in limits}
    assert limits == code
    app_tasks.configure_from_env({VAR: " crawl=3, tickets = 6 ,"})
    assert limits == {**code, "crawl": 3, "tickets": 6}
    app_tasks.configure_from_env({VAR: "video=5"})  # a queue with no figure in code
    assert limits == {**code, "video": 5}
    app_tasks.configure_from_env({})
    assert limits == code


BAD = [
    ("nope=2", "'nope=2'", "unknown queue 'nope'"),
    ("crawl=3,Crawl=4", "'Crawl=4'", "unknown queue 'Crawl'"),
    ("crawl=0", "'crawl=0'", "not within 1..1000"),
    ("tickets=-1", "'tickets=-1'", "not within 1..1000"),
    ("crawl=2.5", "'crawl=2.5'", "not an integer"),
    ("crawl=three", "'crawl=three'", "not an integer"),
    ("crawl=\u0663", "'crawl=\u0663'", "not an integer"),
    ("media=1000000000", "'media=1000000000'", "not within 1..1000"),
    ("media=" + "9" * 5000, repr("media=" + "9" * 5000), "not within 1..1000"),
    ("crawl", "'crawl'", "expected queue=count"),
    ("crawl:3", "'crawl:3'", "expected queue=count"),
    ("crawl=--1", "'crawl=--1'", "not an integer"),
    ("crawl=3;tickets=4", "'crawl=3;tickets=4'", "expected queue=count"),
    ("crawl=3=4", "'crawl=3=4'", "expected queue=count"),
    ("=3", "'=3'", "expected queue=count"),
    ("crawl=", "'crawl='", "not an integer"),
    ("crawl=2,crawl=3", "'crawl=3'", "given twice"),
]


@pytest.mark.parametrize(("raw", "item", "why"), BAD)
def test_a_bad_value_names_the_variable_and_the_item(
    raw: str, item: str, why: str, restore_app_queues: None
) -> None:
    limits = app_tasks.QUEUE_LIMITS
    before = dict(limits)
    with pytest.raises(ConfigError) as e:
        app_tasks.configure_from_env({VAR: raw})
    assert str(e.value).startswith(f"{VAR}={raw!r}: item {item}: ")
    assert why in str(e.value)
    assert limits == before  # nothing applied


@pytest.mark.parametrize("raw", ["crawl=0", "nope=2", "crawl:3"])
def test_a_runner_started_with_a_bad_value_exits_2_saying_why(
    raw: str,
    redis_url: str,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    restore_app_queues: None,
) -> None:
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix, VAR: raw}
    run = cli_in_process(monkeypatch, capsys, env, "tasks", "--queues", "crawl")
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"{VAR}={raw!r}: item " in run.stderr


def test_a_real_runner_process_with_a_bad_value_exits_2_before_it_runs(
    redis_url: str, keys: Keys
) -> None:
    """The same through ``python -m streamproc tasks`` (what a container runs)."""
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix, VAR: "crawl=3,tickets=0"}
    run = cli("tasks", "--queues", "crawl", env=env)
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert f"{VAR}='crawl=3,tickets=0': item 'tickets=0': count 0 is not within" in run.stderr
