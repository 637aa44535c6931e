"""Job status for clients: ``GET /v1/jobs/{id}`` and a job's progress on its cluster's feed.

A real ingest service on 127.0.0.1, a real Redis, the real task runner and a real preview job
on a generated 1 s clip (real ffmpeg); the throttling and the outcomes are checked with small
job functions run through ``media.api.follow`` with a real ``TaskContext``.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

import media
from media.api import FEED_TYPE, follow
from media.runtime import MediaRuntime, MediaSettings, use_settings
from notifications.feed import add_routes as add_feed_routes
from notifications.feed_keys import feed_key
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.tasks import TaskContext, TaskStore, TaskType, task_concern
from tests.test_ingest_support import Server, running_ingest
from tests.test_notify_feed import Sse, open_feed

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (make test-deps)"),
]

CLUSTER = "prod-eu"


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The media store with a 1 s test clip."""
    root = tmp_path_factory.mktemp("media-store")
    (root / "in").mkdir()
    subprocess.run(
        [
            "ffmpeg", "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=duration=1:size=160x120:rate=25",
            "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            str(root / "in" / "clip.mp4"),
        ],
        check=True,
    )  # fmt: skip
    return root


@pytest.fixture
def rt(store_dir: Path, tmp_path: Path) -> Iterator[MediaRuntime]:
    yield use_settings(MediaSettings(store=str(store_dir), work_dir=str(tmp_path / "w"), gpus=()))
    use_settings(MediaSettings())


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(
        client,
        keys,
        producer,
        task_types=media.TASK_TYPES,
        routes=[media.add_routes, add_feed_routes],
    ) as s:
        yield s


async def get(srv: Server, path: str, token: str | None) -> tuple[int, Any]:
    status, body, _ = await srv.post(path, token=token, method="GET")
    return status, body


async def viewer(srv: Server, name: str, *clusters: str) -> str:
    _, token = await srv.agents.add(name, clusters=clusters)
    return token


async def feed_entries(client: aioredis.Redis, keys: Keys, cluster_id: str) -> list[Any]:
    """The cluster's ``media.job`` entries: (ms of the entry id, data)."""
    rows: Any = await client.xrange(feed_key(keys, cluster_id))
    return [
        (int(entry_id.split(b"-")[0]), orjson.loads(fields[b"data"]))
        for entry_id, fields in rows
        if fields[b"type"] == FEED_TYPE.encode()
    ]


async def sse_until_outcome(feed: Sse) -> list[dict[str, Any]]:
    """``media.job`` events off an open feed, up to the job's outcome."""
    out: list[dict[str, Any]] = []
    while True:
        [event] = await feed.events(1)
        assert event["event"] == FEED_TYPE
        out.append(orjson.loads(event["data"]))
        if out[-1]["status"] != "running":
            return out


# ---------------------------------------------------------------------- end to end


async def test_a_preview_job_is_read_by_operators_and_its_clusters_viewers_and_fed_live(
    rt: MediaRuntime,
    srv: Server,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    op = await srv.token("op", (), operator=True)
    mine = await viewer(srv, "web-eu", "prod-*")
    other = await viewer(srv, "web-us", "prod-us")
    runner = Consumer(
        task_concern(media.TASK_TYPES),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="media-1", block_ms=50),
    )
    await runner.ensure_groups()
    payload = {"source": "in/clip.mp4", "count": 3, "width": 64, "cluster_id": CLUSTER}
    status, accepted, _ = await srv.post(
        "/v1/tasks", {"type": "media.preview", "payload": payload}, token=op
    )
    assert status == 202, accepted
    job = f"/v1/jobs/{accepted['id']}"

    # Queued: the task API kept the payload's cluster at submission, so its viewers read it.
    status, body = await get(srv, job, mine)
    assert (status, body["status"], body["cluster_id"]) == (200, "queued", CLUSTER), body
    status, body = await get(srv, job, op)
    assert (status, body["status"], body["cluster_id"], body["outputs"]) == (
        200,
        "queued",
        CLUSTER,
        [],
    )

    while await runner.process_once():
        pass

    status, seen = await get(srv, job, op)
    assert status == 200, seen
    assert seen["type"] == "media.preview"
    assert (seen["status"], seen["progress"], seen["stage"]) == ("completed", 1.0, "done")
    assert (seen["attempts"], seen["error"], seen["cluster_id"]) == (1, None, CLUSTER)
    assert [o["name"] for o in seen["outputs"]] == [
        "frame-001.jpg",
        "frame-002.jpg",
        "frame-003.jpg",
        "sheet.jpg",
    ]
    for out in seen["outputs"]:
        assert out["content_type"] == "image/jpeg"
        assert out["location"].startswith("file://")
        written = Path(out["location"].removeprefix("file://"))
        assert (await asyncio.to_thread(written.stat)).st_size == out["size_bytes"]
    assert [f["time_s"] for f in seen["result"]["frames"]] == pytest.approx(
        [1 / 6, 0.5, 5 / 6], abs=1e-3
    )
    for stamp in ("created_at", "started_at", "finished_at", "updated_at"):
        assert seen[stamp], stamp

    status, body = await get(srv, job, mine)
    assert (status, body) == (200, seen)
    status, body = await get(srv, job, other)
    assert (status, body["error"]) == (403, "forbidden_cluster"), body

    # The viewer's feed from the start: the first progress, the last, then the outcome.
    async with open_feed(srv, CLUSTER, mine, query="?from=start") as feed:
        await feed.opening()
        events = await sse_until_outcome(feed)
    running, done = events[:-1], events[-1]
    assert {e["job_id"] for e in events} == {accepted["id"]}
    assert {e["type"] for e in events} == {"media.preview"}
    assert (running[0]["progress"], running[0]["stage"]) == (0.0, "fetch")
    assert (running[-1]["progress"], running[-1]["stage"]) == (1.0, "done")
    assert len(running) < 6  # fetch, 3 frames, sheet, done: reported 6 times, throttled
    assert done == {
        "job_id": accepted["id"],
        "type": "media.preview",
        "status": "completed",
        "attempt": 1,
        "progress": 1.0,
        "outputs": seen["outputs"],
    }


# ---------------------------------------------------------------------- who reads what


async def test_unknown_other_tasks_bad_ids_and_tokens_are_refused_precisely(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    op = await srv.token("op", (), operator=True)
    agent = await srv.token("poster", ("cluster.*",))
    web = await viewer(srv, "web", "*")
    store = TaskStore(client, keys)
    await store.create("optimizer-1", type="optimizer.run", priority="normal", submitted_by="op")
    await store.create("media-1", type="media.transcode", priority="high", submitted_by="op")
    assert await store.start("media-1") == "run"

    for token in (op, web):
        # A task that is not a media job answers as an unknown id: nothing about it shows.
        for task_id in ("optimizer-1", "0190a3c4-0000-7000-8000-000000000000"):
            status, body = await get(srv, f"/v1/jobs/{task_id}", token)
            assert (status, body["error"]) == (404, "not_found"), body
            assert body["detail"] == f"no job {task_id!r} (or it expired)"

    status, body = await get(srv, "/v1/jobs/media-1", op)
    assert (status, body["status"], body["attempts"], body["stage"]) == (200, "running", 1, None)
    # Started without a cluster_id: operators only, whatever clusters the token reads.
    for token in (web, agent):
        status, body = await get(srv, "/v1/jobs/media-1", token)
        assert (status, body["error"]) == (403, "operator_only"), body
        assert "names no cluster_id" in body["detail"]

    for bad in ("a.b", "x" * 129, "%C3%BC", "a%20b", "a_b"):
        status, body = await get(srv, f"/v1/jobs/{bad}", op)
        assert (status, body["error"], body["path"]) == (400, "bad_job_id", "path:job_id"), bad

    status, body = await get(srv, "/v1/jobs/media-1", None)
    assert (status, body["error"]) == (401, "unauthorized")
    status, body = await get(srv, "/v1/jobs/media-1", "spk_not-a-token")
    assert (status, body["error"]) == (401, "unauthorized")


@pytest.mark.parametrize("bad", ["-eu", "prod eu", "a/b", "x" * 254, ""])
async def test_a_bad_cluster_id_in_a_media_payload_is_refused_at_submission(
    srv: Server, bad: str
) -> None:
    op = await srv.token("op", (), operator=True)
    for kind in ("media.transcode", "media.preview", "media.caption"):
        payload = {"source": "in/clip.mp4", "cluster_id": bad}
        status, body, _ = await srv.post("/v1/tasks", {"type": kind, "payload": payload}, token=op)
        assert (status, body["path"]) == (422, "$.payload.cluster_id"), body


# ---------------------------------------------------------------------- the feed


Job = Callable[[Any, Any], Awaitable[Any]]


async def run_followed(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    job: Job,
    *,
    attempt: int = 0,
    max_retries: int = 2,
) -> tuple[TaskContext, asyncio.Task[Any]]:
    """``job`` as the runner would start it (a started task), wrapped by ``follow``."""
    store = TaskStore(client, keys)
    await store.create("job-1", type="media.fake", priority="normal", submitted_by="op")
    assert await store.start("job-1") == "run"
    ctx = TaskContext(
        task_id="job-1",
        task_type="media.fake",
        attempt=attempt,
        store=store,
        redis=client,
        keys=keys,
        producer=producer,
    )
    tt = TaskType(name="media.fake", run=job, max_retries=max_retries, time_limit_s=60)
    return ctx, asyncio.create_task(follow(tt, {}, ctx, "c1"))


async def test_progress_is_fed_at_most_once_a_second_plus_the_first_and_the_last(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    reports = [round(i / 20, 2) for i in range(21)]  # every 0.1 s for 2 s

    async def job(payload: Any, ctx: Any) -> dict[str, Any]:
        for i, fraction in enumerate(reports):
            await ctx.progress(fraction, stage="encode", step=i)
            await asyncio.sleep(0.1)
        await ctx.progress(1.0, stage="upload")  # then 1.5 s of silence
        await asyncio.sleep(1.5)
        return {"output": {"name": "o.mp4", "location": "file:///o.mp4", "content_type": "v/m"}}

    _, task = await run_followed(client, keys, producer, job)
    assert (await task)["output"]["name"] == "o.mp4"
    entries = await feed_entries(client, keys, "c1")
    running = [(t, e) for t, e in entries if e["status"] == "running"]
    times = [t for t, _ in running]
    steps = [e["detail"].get("step") for _, e in running]
    # The first at once, then at most one a second (the latest report by then) ...
    assert steps[0] == 0
    assert 3 <= len(running) <= 5, steps
    assert steps[:-1] == sorted(steps[:-1])
    assert all(b - a >= 950 for a, b in itertools.pairwise(times)), times
    # ... and the upload's report a second after the one before it, in the silence, not
    # held until the outcome.
    assert running[-1][1]["stage"] == "upload"
    assert entries[-1][0] - times[-1] >= 300
    assert entries[-1][1] == {
        "job_id": "job-1",
        "type": "media.fake",
        "status": "completed",
        "attempt": 1,
        "progress": 1.0,
        "outputs": [
            {
                "name": "o.mp4",
                "location": "file:///o.mp4",
                "content_type": "v/m",
                "size_bytes": None,
            }
        ],
    }
    task_view = await TaskStore(client, keys).get("job-1")
    assert task_view is not None
    assert task_view.detail == {"stage": "upload"}  # the task itself saw every report


async def test_the_last_report_is_fed_before_the_outcome(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async def job(payload: Any, ctx: Any) -> None:
        for fraction in (0.0, 0.4, 0.8):
            await ctx.progress(fraction, stage="frames")

    _, task = await run_followed(client, keys, producer, job)
    await task
    entries = [e for _, e in await feed_entries(client, keys, "c1")]
    assert [(e["status"], e.get("progress")) for e in entries] == [
        ("running", 0.0),
        ("running", 0.8),
        ("completed", 1.0),
    ]


@pytest.mark.parametrize(
    ("error", "attempt", "status"),
    [
        (Permanent("corrupt input"), 0, "failed"),
        (RuntimeError("killed by a signal"), 0, "retrying"),
        (RuntimeError("killed by a signal"), 2, "failed"),  # the last of 2 retries
    ],
)
async def test_a_failure_is_fed_as_failed_or_retrying_by_the_runners_rule(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    error: Exception,
    attempt: int,
    status: str,
) -> None:
    async def job(payload: Any, ctx: Any) -> None:
        await ctx.progress(0.1, stage="fetch")
        raise error

    _, task = await run_followed(client, keys, producer, job, attempt=attempt)
    with pytest.raises(type(error)):
        await task
    *_, (_, last) = await feed_entries(client, keys, "c1")
    assert last == {
        "job_id": "job-1",
        "type": "media.fake",
        "status": status,
        "attempt": attempt + 1,
        "error": f"{type(error).__name__}: {error}",
    }


async def test_a_cancel_on_request_is_fed_and_a_shutdown_is_not(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    started = asyncio.Event()

    async def job(payload: Any, ctx: Any) -> None:
        await ctx.progress(0.0, stage="fetch")
        started.set()
        await asyncio.sleep(30)

    for on_request in (False, True):
        await client.delete(feed_key(keys, "c1"), keys.task("job-1"))
        started.clear()
        ctx, task = await run_followed(client, keys, producer, job)
        await started.wait()
        ctx.cancel_requested = on_request
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        statuses = [e["status"] for _, e in await feed_entries(client, keys, "c1")]
        assert statuses == (["running", "cancelled"] if on_request else ["running"])
