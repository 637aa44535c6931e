"""Routes for seed 003's worker-node clients, on the task API (issue 16).

Seed 003 ran one FastAPI "worker node" per container: ``POST /task/submit``,
``GET /task/{task_id}``, ``GET /health``, ``GET /metrics``, with an in-process queue. Here the
same four answer for the whole task system: a task goes through ``TaskApi.create`` (the one
way a task is created) into its queue's streams and runs on whichever runner has room.

- ``POST /task/submit`` ``{task_type?, payload, priority?, task_id?}`` → 200
  ``{status, task_id, position, ...}``. The type is ``task_type``, else ``payload.function``
  (the seed's body names the function inside the payload). The payload goes to the type as it
  is: a type that takes the seed's ``{function, args, kwargs}`` declares ``SeedCall`` as its
  payload type. A client-chosen ``task_id`` is idempotent (``TaskApi.create``).
- ``GET /task/{task_id}``: the seed's fields (``status`` in the seed's words: queued, running,
  completed, failed; a cancelled task is ``failed`` with ``state`` ``cancelled``, so a seed
  client's poll loop ends) and ours.
- ``GET /health``: JSON over the live runners (``RunnerRegistry``) and this ingest process.
- ``GET /metrics`` with ``Accept: application/json`` (preferred over text): JSON counts per
  task type (``TaskHistory``); any other Accept (Prometheus's, ``*/*``) keeps the Prometheus
  text. A middleware picks, so ``/metrics`` stays one route.

Every route takes a bearer token like ``/v1/tasks``: an operator, or an agent with the submit
scope, which reads only its own tasks (another's is the same 404 as an unknown id).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs in the lock (types-psutil)
from aiohttp import web
from redis.exceptions import RedisError

from streamproc.connection import REDIS_DOWN
from streamproc.ingest._http import Problem, json_response, redis_unavailable
from streamproc.ingest.tasks import TASK_ID
from streamproc.tasks.events import PRIORITIES, Priority
from streamproc.tasks.runners import RunnerInfo
from streamproc.tasks.store import TaskView

if TYPE_CHECKING:
    from streamproc.ingest.app import Ingest
    from streamproc.ingest.tasks import TaskApi

__all__ = (
    "CompatAccepted",
    "CompatHealth",
    "CompatMetrics",
    "CompatSubmit",
    "CompatTask",
    "SeedCall",
    "add_compat_routes",
)

_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
TypeName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class CompatSubmit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /task/submit`` (seed 003's ``TaskRequest`` plus ``task_type``)."""

    payload: dict[str, Any]
    #: The task type; when absent, ``payload.function`` names it.
    task_type: TypeName | None = None
    #: Letters, digits and ``_.:-`` (the seed's ``task_123``, UUIDs); the same submitter
    #: again gets the same task, another submitter's id is a 409.
    task_id: TASK_ID | None = None
    priority: Priority = "normal"


class SeedCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Seed 003's payload, ``{function, args, kwargs}``, for a task type that takes it as is."""

    function: TypeName
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)


class CompatAccepted(msgspec.Struct, kw_only=True):
    """Answer of ``POST /task/submit`` (200)."""

    #: "queued" for a new task; a repeated ``task_id`` answers its task's status now.
    status: str
    task_id: str
    #: Tasks of this priority or more urgent not yet taken by a runner, this one included.
    position: int
    task_type: str
    priority: Priority
    location: str


SeedStatus = Literal["queued", "running", "completed", "failed"]


class CompatTask(msgspec.Struct, kw_only=True):
    """Answer of ``GET /task/{task_id}``: seed 003's fields, then ours."""

    task_id: str
    status: SeedStatus
    result: Any = None
    error: str | None = None
    queued_at: str
    started_at: str | None = None
    completed_at: str | None = None
    #: Our status: the seed's four and ``cancelled``.
    state: str
    task_type: str
    queue: str
    priority: str
    progress: float = 0.0
    detail: dict[str, Any] | None = None
    attempts: int = 0
    cancel_requested: bool = False
    submitted_by: str = ""
    updated_at: str


class ProcessHealth(msgspec.Struct, kw_only=True):
    """One runner process (its queues together), or this ingest."""

    worker_id: str
    role: Literal["runner", "ingest"]
    host: str
    pid: int
    queues: list[str] = msgspec.field(default_factory=list)
    active_tasks: int = 0
    shedding: bool = False
    #: The host's CPU and memory in use, percent.
    cpu_percent: float
    memory_percent: float
    uptime_seconds: float


class CompatHealth(msgspec.Struct, kw_only=True):
    """Answer of ``GET /health``: seed 003's fields over the whole task system, then ours."""

    #: healthy; degraded: no live runner, or every one sheds load (tasks wait).
    status: Literal["healthy", "degraded"]
    #: Tasks running now, on every live runner.
    active_tasks: int
    #: Tasks waiting, every queue and priority.
    queue_size: int
    #: The mean over the hosts of the live runners and of this ingest.
    cpu_percent: float
    memory_percent: float
    #: This ingest process's.
    uptime_seconds: float
    #: This ingest process (``ingest-<host>-<pid>``); ``workers`` lists the runners.
    worker_id: str
    timestamp: str
    queue_sizes: dict[str, int]
    runners: int
    shedding: int
    reason: str | None = None
    workers: list[ProcessHealth]


class TypeMetrics(msgspec.Struct, kw_only=True):
    tasks_completed: int
    tasks_failed: int
    tasks_cancelled: int
    #: Attempts that ran (retries count).
    runs: int
    #: Seconds, the mean over ``runs``.
    average_execution_time: float


class CompatMetrics(msgspec.Struct, kw_only=True):
    """``GET /metrics`` as JSON: seed 003's fields, every runner together, and per type."""

    tasks_completed: int
    tasks_failed: int
    tasks_cancelled: int
    tasks_queued: int
    average_execution_time: float
    #: This ingest process's.
    uptime_seconds: float
    cpu_cores: int
    memory_total_gb: float
    runs: int
    by_type: dict[str, TypeMetrics]


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def wants_json(accept: str) -> bool:
    """True when ``Accept`` prefers application/json to the Prometheus text formats.

    ``*/*`` alone (curl, requests, aiohttp) is not a preference: the text stays the default.
    """
    best_json = best_text = 0.0
    for part in accept.split(","):
        media, *params = (p.strip() for p in part.split(";"))
        q = 1.0
        for p in params:
            name, _, value = p.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        media = media.lower()
        if media == "application/json":
            best_json = max(best_json, q)
        elif media in ("text/plain", "application/openmetrics-text", "text/*"):
            best_text = max(best_text, q)
    return best_json > 0 and best_json >= best_text


class _Compat:
    """The handlers and what they share (one per ingest process)."""

    def __init__(self, ingest: Ingest, api: TaskApi) -> None:
        self.ingest, self.api = ingest, api
        self.started = time.monotonic()
        self.host = socket.gethostname()
        self.worker_id = f"ingest-{self.host}-{os.getpid()}"
        self._decoder = msgspec.json.Decoder(CompatSubmit)
        psutil.cpu_percent(interval=None)  # starts the measurement; /health reads since then

    def _down(self, e: BaseException) -> Problem:
        return redis_unavailable(self.ingest.settings.retry_after_s, e)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: web.Request) -> web.Response:
        api = self.api
        agent, idem, sub = await api.read_submission(request, self._decoder)
        type_name, type_path = self._type_of(sub)
        api.check_submit(agent, type_name, path=type_path)
        answer = await api.create(
            type_name,
            sub.payload,
            priority=sub.priority,
            submitted_by=agent.name,
            idem=idem,
            task_id=sub.task_id,
        )
        accepted = CompatAccepted(
            status=answer.status,
            task_id=answer.id,
            position=answer.position,
            task_type=type_name,
            priority=answer.priority,
            location=f"/task/{answer.id}",
        )
        return web.Response(
            body=msgspec.json.encode(accepted),
            content_type="application/json",
            headers={"Location": accepted.location},
        )

    def _type_of(self, sub: CompatSubmit) -> tuple[str, str]:
        """``task_type``, else ``payload.function``, and the path that named it; 422s there."""
        known = sorted(self.api.types)
        name: Any
        if sub.task_type is not None:
            name, path = sub.task_type, "$.task_type"
        else:
            name, path = sub.payload.get("function"), "$.payload.function"
            if name is None:
                raise Problem(
                    422,
                    "missing_task_type",
                    "no task type: give task_type, or payload.function naming one; known: "
                    + ", ".join(known),
                    path="$.task_type",
                    known_types=known,
                )
            if not isinstance(name, str):
                raise Problem(
                    422,
                    "invalid",
                    f"payload.function must be a string naming a task type, not {name!r}",
                    path=path,
                )
        if name not in self.api.types:
            raise Problem(
                422,
                "unknown_task_type",
                f"unknown task type {name[:200]!r}; known: {', '.join(known)}",
                path=path,
                known_types=known,
            )
        return name, path

    # ------------------------------------------------------------------ read

    async def get(self, request: web.Request) -> web.Response:
        agent = await self.api.submitter(request)
        raw = request.match_info["task_id"]
        try:
            task_id = msgspec.convert(raw, TASK_ID)
        except msgspec.ValidationError:
            raise Problem(404, "not_found", "no such task (malformed id)") from None
        try:
            view = await self.api.store.get(task_id)
        except _REDIS_FAILED as e:
            raise self._down(e) from e
        if view is None:
            raise Problem(404, "not_found", f"no task {task_id!r} (or it expired)")
        self.api.check_owner(agent, view)
        return json_response(msgspec.to_builtins(_compat_view(view)))

    # ------------------------------------------------------------------ health, metrics

    async def health(self, request: web.Request) -> web.Response:
        await self.api.submitter(request)
        try:
            runners = await self.api.runners.list()
            sizes = await self.api.queue_sizes()
        except _REDIS_FAILED as e:
            raise self._down(e) from e
        mine = ProcessHealth(
            worker_id=self.worker_id,
            role="ingest",
            host=self.host,
            pid=os.getpid(),
            cpu_percent=float(psutil.cpu_percent(interval=None)),
            memory_percent=float(psutil.virtual_memory().percent),
            uptime_seconds=round(time.monotonic() - self.started, 3),
        )
        workers = _by_process(runners)
        # A runner's figures are its host's: each host counted once, this one measured here;
        # a runner's first beat comes before its first sample (memory 0: not measured yet).
        hosts = {w.host: (w.cpu_percent, w.memory_percent) for w in workers if w.memory_percent}
        hosts[mine.host] = (mine.cpu_percent, mine.memory_percent)
        shedding = sum(w.shedding for w in workers)
        reason = None
        if not workers:
            reason = "no live task runner: tasks wait until one starts"
        elif shedding == len(workers):
            reason = "every task runner sheds load"
        queue_sizes: dict[str, int] = {p: int(sizes.get(p, 0)) for p in PRIORITIES}
        answer = CompatHealth(
            status="degraded" if reason else "healthy",
            active_tasks=sum(w.active_tasks for w in workers),
            queue_size=sum(queue_sizes.values()),
            cpu_percent=round(sum(c for c, _ in hosts.values()) / len(hosts), 1),
            memory_percent=round(sum(m for _, m in hosts.values()) / len(hosts), 1),
            uptime_seconds=mine.uptime_seconds,
            worker_id=self.worker_id,
            timestamp=_now_iso(),
            queue_sizes=queue_sizes,
            runners=len(workers),
            shedding=shedding,
            reason=reason,
            workers=[mine, *workers],
        )
        return json_response(msgspec.to_builtins(answer))

    async def metrics(self, request: web.Request) -> web.Response:
        await self.api.submitter(request)
        try:
            stats = await self.api.history.stats()
            sizes = await self.api.queue_sizes()
        except _REDIS_FAILED as e:
            raise self._down(e) from e
        by_type = {
            name: TypeMetrics(
                tasks_completed=s.completed,
                tasks_failed=s.failed,
                tasks_cancelled=s.cancelled,
                runs=s.runs,
                average_execution_time=round(s.average_s, 6),
            )
            for name, s in stats.items()
        }
        runs = sum(s.runs for s in stats.values())
        total_s = sum(s.duration_s_total for s in stats.values())
        answer = CompatMetrics(
            tasks_completed=sum(s.completed for s in stats.values()),
            tasks_failed=sum(s.failed for s in stats.values()),
            tasks_cancelled=sum(s.cancelled for s in stats.values()),
            tasks_queued=sum(int(n) for n in sizes.values()),
            average_execution_time=round(total_s / runs, 6) if runs else 0.0,
            uptime_seconds=round(time.monotonic() - self.started, 3),
            cpu_cores=os.cpu_count() or 1,
            memory_total_gb=round(psutil.virtual_memory().total / 1024**3, 3),
            runs=runs,
            by_type=by_type,
        )
        return json_response(msgspec.to_builtins(answer))


def _by_process(runners: list[RunnerInfo]) -> list[ProcessHealth]:
    """One entry per runner process (the registry has one per process and queue)."""
    out: dict[tuple[str, int], ProcessHealth] = {}
    now = time.time()
    for r in runners:
        key = (r.host, r.pid)
        p = out.get(key)
        if p is None:
            p = out[key] = ProcessHealth(
                worker_id=r.id.rpartition("@")[0] or r.id,
                role="runner",
                host=r.host,
                pid=r.pid,
                cpu_percent=r.cpu_percent,
                memory_percent=r.memory_percent,
                uptime_seconds=round(max(0.0, now - r.started_at), 3) if r.started_at else 0.0,
            )
        p.queues.append(r.queue)
        p.active_tasks += r.active
        p.shedding = p.shedding or r.shedding
    return list(out.values())


def _compat_view(view: TaskView) -> CompatTask:
    seed: SeedStatus = "failed" if view.status == "cancelled" else view.status
    error = view.error
    if view.status == "cancelled" and not error:
        error = "cancelled"
    return CompatTask(
        task_id=view.id,
        status=seed,
        result=view.result,
        error=error,
        queued_at=view.created_at,
        started_at=view.started_at,
        completed_at=view.finished_at,
        state=view.status,
        task_type=view.type,
        queue=view.queue,
        priority=view.priority,
        progress=view.progress,
        detail=view.detail,
        attempts=view.attempts,
        cancel_requested=view.cancel_requested,
        submitted_by=view.submitted_by,
        updated_at=view.updated_at,
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_compat_routes(app: web.Application, ingest: Ingest, task_api: TaskApi) -> None:
    """Add seed 003's routes to the ingest's aiohttp ``app`` (before it starts).

    ``GET /metrics`` itself stays the ingest's (Prometheus text); a middleware answers it as
    JSON when the request's Accept prefers application/json.
    """
    compat = _Compat(ingest, task_api)
    app.router.add_post("/task/submit", compat.submit)
    app.router.add_get("/task/{task_id}", compat.get)
    app.router.add_get("/health", compat.health)

    @web.middleware
    async def json_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.path == "/metrics"
            and request.method == "GET"
            and wants_json(request.headers.get("Accept", ""))
        ):
            return await compat.metrics(request)
        return await handler(request)

    app.middlewares.append(json_metrics)
