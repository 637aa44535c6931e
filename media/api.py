"""Job status for clients (issue 15 §6): ``GET /v1/jobs/{id}`` and the job on the live feed.

A media job is a task whose type starts with ``media.`` (``media.transcode``, ``.preview``,
``.caption``, and any added later); its status is the task's hash (``TaskStore``). This module
adds two views of it for the people who follow a job, not only operators:

- **the route** (an ``App(routes=...)`` hook on the ingest service): the job's status,
  progress and stage, outputs (store locations and content types), error, attempts and
  timestamps. Operators read every job; a viewer token (``streamproc agents add --clusters``)
  reads the jobs of the clusters it may read (``Agent.may_read``); a job without a
  ``cluster_id`` is operator-only. Any other task id is a 404, as an unknown one is.
- **the feed**: a job whose payload names a ``cluster_id`` writes ``media.job`` entries to that
  cluster's feed (``notifications.feed_keys.append``; viewers read ``GET /clusters/{id}/feed``):
  its progress at most once a second (the first report at once, the last one before the
  outcome, one in between a second after the previous), then its outcome: ``completed``
  (with the outputs), ``failed``, ``retrying`` (a transient failure the runner retries) or
  ``cancelled``. ``follow`` does it around the job function; ``media._task_type`` wraps every
  media task type with it, so the engine's runner is unchanged.

The job's cluster is in its task hash (field ``cluster_id``): the task API stores a payload's
``cluster_id`` when it creates the task, and the job writes it again when an attempt starts.

Feed writes are best effort: a Redis error there is logged and the job goes on (its task hash
is the record; the feed is a view of it).
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, cast

import msgspec
import structlog
from redis.exceptions import RedisError

from notifications import feed_keys
from streamproc._lua import Lua
from streamproc.connection import REDIS_DOWN
from streamproc.errors import Permanent
from streamproc.ingest._http import Problem, json_response, redis_unavailable
from streamproc.tasks import TaskContext, TaskStatus, TaskStore, TaskType, TaskView

if TYPE_CHECKING:
    from aiohttp import web

    from streamproc.ingest import Ingest

__all__ = (
    "FEED_TYPE",
    "JobOutput",
    "JobView",
    "add_routes",
    "follow",
    "job_view",
    "outputs_of",
)

log = structlog.get_logger("media.api")

#: The ``type`` of a job's entries on its cluster's feed.
FEED_TYPE = "media.job"
#: Task types that are media jobs.
JOB_PREFIX = "media."
#: A job id is a task id (``streamproc.ingest.tasks``: a UUID, or one derived from an
#: Idempotency-Key).
_JOB_ID_RE = re.compile(r"[A-Za-z0-9-]{1,128}")
_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
#: A cancelled job this close to its type's ``timeout_s`` was stopped by the runner's limit.
_DEADLINE_SLACK_S = 1.0

# KEYS: the task hash. ARGV: cluster id. Written only into a task that exists (not expired).
_RECORD_CLUSTER = Lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'cluster_id', ARGV[1])
return 1
""")


class JobOutput(msgspec.Struct, frozen=True, kw_only=True):
    """A file the job wrote to the media store."""

    name: str
    #: ``file:///…`` or ``s3://bucket/key``.
    location: str
    content_type: str
    size_bytes: int | None = None


class JobView(msgspec.Struct, kw_only=True):
    """What ``GET /v1/jobs/{id}`` answers."""

    id: str
    #: The task type: ``media.transcode``, ``media.preview``, ``media.caption`` …
    type: str
    status: TaskStatus
    #: 0.0 … 1.0, as last reported.
    progress: float
    #: ``detail.stage``: ``fetch``, ``encode``, ``frames``, ``audio``, ``speech``, ``upload``,
    #: ``done`` … (None before the first report).
    stage: str | None
    #: Everything the job last reported with its progress.
    detail: dict[str, Any] | None
    #: Every output file named in the result, in its order (empty until completed).
    outputs: list[JobOutput]
    #: The job type's whole result (docs/media.md, "Results and progress").
    result: Any
    #: Why it failed; while a retry waits (status ``queued``), the failed attempt's error.
    error: str | None
    attempts: int
    #: The cluster it belongs to (None: operators only).
    cluster_id: str | None
    priority: str
    cancel_requested: bool
    created_at: str
    started_at: str | None
    finished_at: str | None
    updated_at: str


def outputs_of(result: Any) -> list[JobOutput]:
    """The output files in a job's result (JSON-like): every object with a ``location`` and a
    ``content_type``, depth first in order (a transcode's ``output``, a preview's frames then
    its sheet)."""
    found: list[JobOutput] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            location, ctype = node.get("location"), node.get("content_type")
            if isinstance(location, str) and isinstance(ctype, str):
                size = node.get("size_bytes")
                name = node.get("name")
                found.append(
                    JobOutput(
                        name=name if isinstance(name, str) else location.rsplit("/", 1)[-1],
                        location=location,
                        content_type=ctype,
                        size_bytes=size if isinstance(size, int) else None,
                    )
                )
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(result)
    return found


def _stage(detail: dict[str, Any] | None) -> str | None:
    stage = (detail or {}).get("stage")
    return stage if isinstance(stage, str) else None


def job_view(task: TaskView, cluster_id: str | None) -> JobView:
    return JobView(
        id=task.id,
        type=task.type,
        status=task.status,
        progress=task.progress,
        stage=_stage(task.detail),
        detail=task.detail,
        outputs=outputs_of(task.result),
        result=task.result,
        error=task.error,
        attempts=task.attempts,
        cluster_id=cluster_id,
        priority=task.priority,
        cancel_requested=task.cancel_requested,
        created_at=task.created_at,
        started_at=task.started_at,
        finished_at=task.finished_at,
        updated_at=task.updated_at,
    )


# ---------------------------------------------------------------------- the route


def add_routes(app: web.Application, ingest: Ingest) -> None:
    """Add ``GET /v1/jobs/{job_id}`` (an ``App(routes=...)`` hook)."""
    app.router.add_get("/v1/jobs/{job_id}", _Jobs(ingest).get, allow_head=False)


def _job_id(raw: str) -> str:
    if not _JOB_ID_RE.fullmatch(raw):
        raise Problem(
            400,
            "bad_job_id",
            "a job id is its task's id: 1-128 letters, digits and '-' "
            "(the id POST /v1/tasks answered)",
            path="path:job_id",
        )
    return raw


class _Jobs:
    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.store = TaskStore(ingest.client, ingest.keys, ttl_s=ingest.settings.task_ttl_s)

    async def get(self, request: web.Request) -> web.Response:
        ing = self.ingest
        agent = await ing.authenticate(request)
        job_id = _job_id(request.match_info["job_id"])
        try:
            task = await self.store.get(job_id)
            raw: Any = await ing.client.hget(ing.keys.task(job_id), "cluster_id")
        except _REDIS_FAILED as e:
            raise redis_unavailable(ing.settings.retry_after_s, e) from e
        if task is None or not task.type.startswith(JOB_PREFIX):
            # Another kind of task answers as an unknown id does: nothing about it shows.
            raise Problem(404, "not_found", f"no job {job_id!r} (or it expired)")
        cluster_id = raw.decode() if isinstance(raw, bytes) else None
        if not agent.operator:
            if cluster_id is None:
                raise Problem(
                    403,
                    "operator_only",
                    f"job {job_id} is readable by operators only: it names no cluster_id",
                )
            if not agent.may_read(cluster_id):
                raise Problem(
                    403,
                    "forbidden_cluster",
                    f"agent {agent.name!r} may not read the jobs of cluster {cluster_id!r}",
                )
        return json_response(msgspec.to_builtins(job_view(task, cluster_id)))


# ---------------------------------------------------------------------- the feed


async def follow(
    tt: TaskType,
    payload: Any,
    ctx: TaskContext,
    cluster_id: str,
    *,
    interval_s: float = 1.0,
) -> Any:
    """Run ``tt.run(payload, …)`` with its progress and outcome on ``cluster_id``'s feed.

    The job gets a context whose ``progress`` records in the task (as always) and feeds the
    cluster (throttled to one entry per ``interval_s``); the outcome is judged by the runner's
    rule (``streamproc.tasks.runner``): a ``Permanent``, ``TimeoutError``, ``TypeError`` or
    one of ``tt.permanent_errors``, or the last attempt, ends the task ``failed``; any other
    exception is retried (``retrying`` on the feed). A cancel on request is ``cancelled``; the
    runner's time limit (``tt.time_limit_s``) is ``failed``; a shutdown writes nothing (the job
    runs again elsewhere).
    """
    loop = asyncio.get_running_loop()
    deadline = None if tt.time_limit_s is None else loop.time() + tt.time_limit_s
    await _RECORD_CLUSTER(ctx.redis, [ctx.keys.task(ctx.task_id)], [cluster_id])
    feed = _JobFeed(ctx, cluster_id, interval_s)
    try:
        # The job functions take media.jobs.JobContext (task_id, attempt, progress, and
        # redis/keys when there): the wrapper is one, not a TaskContext.
        result = await tt.run(payload, cast("TaskContext", _FeedContext(ctx, feed)))
    except asyncio.CancelledError:
        if ctx.cancel_requested:
            await feed.end("cancelled", error="cancelled on request")
        elif deadline is not None and loop.time() >= deadline - _DEADLINE_SLACK_S:
            await feed.end("failed", error="TimeoutError: ")
        else:
            feed.stop()
        raise
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:2000]
        final = isinstance(e, (Permanent, TimeoutError, TypeError, *tt.permanent_errors))
        retried = not final and ctx.attempt < tt.max_retries
        await feed.end("retrying" if retried else "failed", error=error)
        raise
    outputs = msgspec.to_builtins(outputs_of(msgspec.to_builtins(result)))
    await feed.end("completed", progress=1.0, outputs=outputs)
    return result


class _FeedContext:
    """The job's context: ``progress`` goes through the feed; everything else is the task's."""

    def __init__(self, ctx: TaskContext, feed: _JobFeed) -> None:
        self._ctx, self._feed = ctx, feed
        self.task_id, self.attempt = ctx.task_id, ctx.attempt

    async def progress(self, fraction: float, **detail: Any) -> None:
        await self._feed.progress(fraction, **detail)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ctx, name)


class _JobFeed:
    """One attempt's entries on its cluster's feed, progress throttled to one per interval."""

    def __init__(self, ctx: TaskContext, cluster_id: str, interval_s: float) -> None:
        self.ctx, self.cluster_id, self.interval_s = ctx, cluster_id, interval_s
        self._loop = asyncio.get_running_loop()
        #: Sends one at a time, so entries reach the stream in the order they were made.
        self._lock = asyncio.Lock()
        #: The latest progress not sent yet.
        self._pending: dict[str, Any] | None = None
        self._sent_at: float | None = None
        #: Sends the pending progress when the interval is over; ``_asleep`` until then.
        self._timer: asyncio.Task[None] | None = None
        self._asleep = False

    async def progress(self, fraction: float, **detail: Any) -> None:
        await self.ctx.progress(fraction, **detail)  # the task's record first, unthrottled
        self._pending = self._entry(
            "running", progress=min(1.0, max(0.0, fraction)), stage=_stage(detail), detail=detail
        )
        wait_s = 0.0 if self._sent_at is None else self._sent_at + self.interval_s - self._now()
        if wait_s <= 0:
            await self._flush()
        elif self._timer is None:
            self._asleep = True
            self._timer = asyncio.create_task(self._later(wait_s))

    async def end(self, status: str, **data: Any) -> None:
        """The last progress (if it waits), then the outcome."""
        await self._stop_timer()
        await self._flush()
        async with self._lock:
            await self._append(self._entry(status, **data))

    def stop(self) -> None:
        """Shutdown: nothing more is sent."""
        if self._timer is not None:
            self._timer.cancel()

    def _now(self) -> float:
        return self._loop.time()

    def _entry(self, status: str, **data: Any) -> dict[str, Any]:
        return {
            "job_id": self.ctx.task_id,
            "type": self.ctx.task_type,
            "status": status,
            "attempt": self.ctx.attempt + 1,
            **data,
        }

    async def _later(self, wait_s: float) -> None:
        try:
            await asyncio.sleep(wait_s)
        finally:
            self._asleep = False
        try:
            await self._flush()
        finally:
            self._timer = None

    async def _stop_timer(self) -> None:
        timer = self._timer
        if timer is None:
            return
        if self._asleep:  # cancelled while asleep: no write is cut in half
            timer.cancel()
        await asyncio.gather(timer, return_exceptions=True)
        self._timer = None

    async def _flush(self) -> None:
        async with self._lock:
            entry, self._pending = self._pending, None
            if entry is None:
                return
            self._sent_at = self._now()
            await self._append(entry)

    async def _append(self, entry: dict[str, Any]) -> None:
        try:
            await feed_keys.append(self.ctx.redis, self.ctx.keys, self.cluster_id, FEED_TYPE, entry)
        except _REDIS_FAILED as e:
            log.warning(
                "job_feed_failed",
                task_id=self.ctx.task_id,
                cluster_id=self.cluster_id,
                status=entry["status"],
                error=str(e),
            )
