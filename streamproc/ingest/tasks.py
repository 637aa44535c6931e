"""The task API: ``POST /v1/tasks``, ``GET /v1/tasks``, ``GET`` and ``DELETE /v1/tasks/{id}``.

Who may do what:

- an **operator** token submits any task type, reads, lists and cancels every task;
- a **submit** token (``streamproc agents add NAME --submit 'crawl.*'``) submits the task types
  it is given, and reads, lists and cancels only the tasks it submitted. Another agent's task
  answers 404, as if it did not exist (its id says nothing to the caller).

Every cancel records who asked (``cancelled_by``) and is logged. A task is a hash (its status,
kept 24 h; see ``TaskStore``) and an event on the stream of its queue and priority
(``streamproc.tasks.events``); the runners are ``streamproc.tasks.runner``. When every live
runner of the task's queue sheds load, a submission answers 503 with Retry-After.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, TypeVar
from urllib.parse import urlencode

import msgspec
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from streamproc.connection import REDIS_DOWN
from streamproc.event import new_event_id
from streamproc.groups import group_info
from streamproc.ingest._http import (
    Problem,
    check_query,
    idempotency_key,
    json_response,
    redis_unavailable,
)
from streamproc.ingest.auth import Agent
from streamproc.ingest.decode import validation_problem
from streamproc.tasks.events import PRIORITIES, Priority, task_event_class, task_group
from streamproc.tasks.history import ACTIVE, HistoryCursor, TaskHistory
from streamproc.tasks.metrics import TASKS_SUBMITTED
from streamproc.tasks.runner import TaskType
from streamproc.tasks.runners import RunnerRegistry
from streamproc.tasks.store import TaskStore, TaskView

if TYPE_CHECKING:
    from streamproc.ingest.app import Ingest

__all__ = ("TASK_ID", "TaskAccepted", "TaskApi", "TaskSubmit")

log = structlog.get_logger("streamproc.ingest")

S = TypeVar("S")

_TASK_NS = uuid.UUID("3d1f8a6c-2b4e-4f7a-8c9d-1e5b7a3c9f20")
_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
#: A task id: generated (a UUIDv7) or chosen by the client (seed 003's ``task_123``).
TASK_ID = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
]
#: How long the runners' shedding state is cached by a submitting ingest process.
SHED_CACHE_S = 1.0
_STATUSES = ("queued", "running", "completed", "failed", "cancelled")
_LIST_QUERY = frozenset({"status", "type", "submitted_by", "limit", "before"})


class TaskSubmit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/tasks``."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = "normal"
    #: A client-chosen task id: submitting it again names the same task (no second run).
    id: TASK_ID | None = None


class TaskAccepted(msgspec.Struct, kw_only=True):
    """Answer of ``POST /v1/tasks`` (202)."""

    id: str
    status: str
    priority: Priority
    queue: str
    #: Tasks of this queue and priority or more urgent not yet taken by a runner, this one
    #: included.
    position: int
    entry_id: str
    location: str


class TaskApi:
    def __init__(self, ingest: Ingest, types: Mapping[str, TaskType], **_: Any) -> None:
        self.ingest, self.types = ingest, dict(types)
        ttl_s = ingest.settings.task_ttl_s
        self.store = TaskStore(ingest.client, ingest.keys, ttl_s=ttl_s)
        self.history = TaskHistory(ingest.client, ingest.keys, retention_s=ttl_s)
        self.runners = RunnerRegistry(ingest.client, ingest.keys)
        self._decoder = msgspec.json.Decoder(TaskSubmit)
        self._shed: dict[str, tuple[float, bool]] = {}

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/tasks", self.submit)
        router.add_get("/v1/tasks", self.list)
        router.add_get("/v1/tasks/{task_id}", self.get)
        router.add_delete("/v1/tasks/{task_id}", self.cancel)

    # ------------------------------------------------------------------ who

    async def submitter(self, request: web.Request) -> Agent:
        """The caller, if it may use the task API at all: an operator or a submit token."""
        agent = await self.ingest.authenticate(request)
        if not agent.operator and not agent.submit:
            raise Problem(
                403,
                "forbidden",
                f"agent {agent.name!r} is not an operator and may submit no task type "
                "(streamproc agents add NAME --submit TYPES)",
            )
        return agent

    def check_submit(self, agent: Agent, type_name: str, *, path: str = "$.type") -> None:
        """403 when ``agent`` may not submit ``type_name`` (named at ``path`` in the body)."""
        if not agent.may_submit(type_name):
            raise Problem(
                403,
                "forbidden",
                f"agent {agent.name!r} may not submit {type_name!r} tasks",
                path=path,
            )

    def check_owner(self, agent: Agent, view: TaskView) -> None:
        """Operators see every task, others their own; another's answers 404 like none."""
        if not agent.operator and view.submitted_by != agent.name:
            raise Problem(404, "not_found", f"no task {view.id!r} (or it expired)")

    # ------------------------------------------------------------------ submit

    async def submit(self, request: web.Request) -> web.Response:
        agent, idem, sub = await self.read_submission(request, self._decoder)
        self.check_submit(agent, sub.type)
        answer = await self.create(
            sub.type,
            sub.payload,
            priority=sub.priority,
            submitted_by=agent.name,
            idem=idem,
            task_id=sub.id,
        )
        return web.Response(
            body=msgspec.json.encode(answer),
            status=202,
            content_type="application/json",
            headers={"Location": answer.location},
        )

    async def create(
        self,
        type_name: str,
        payload: Mapping[str, Any],
        *,
        priority: Priority = "normal",
        submitted_by: str,
        idem: str | None = None,
        task_id: str | None = None,
        payload_path: str = "$.payload",
    ) -> TaskAccepted:
        """Validate ``payload`` against the type, store the task and publish its request.

        The one way a task is created: ``POST /v1/tasks``, ``POST /task/submit`` and the
        application's own routes (``POST /clusters/{id}/optimize``) call it. Refusals are
        ``Problem`` s whose paths start at ``payload_path``; a retry with the same ``idem`` or
        ``task_id`` names the same task; another submitter's ``task_id`` is a 409.
        """
        ing = self.ingest
        tt = self.types.get(type_name)
        if tt is None:
            known = sorted(self.types)
            raise Problem(
                422,
                "unknown_task_type",
                f"unknown task type {type_name!r}; known: {', '.join(known)}",
                path="$.type",
                known_types=known,
            )
        try:
            checked = msgspec.to_builtins(msgspec.convert(dict(payload), tt.payload_type))
        except msgspec.ValidationError as e:
            err = ing.decoder._item_error(0, payload_path, str(e))
            raise validation_problem([err], 1, [], what="payload") from None
        if task_id is None:
            task_id = (
                str(uuid.uuid5(_TASK_NS, f"{submitted_by}:{idem}")) if idem else new_event_id()
            )
        await self._refuse_if_shedding(tt.queue)
        event = task_event_class(priority, tt.queue)(
            id=task_id,
            key=tt.name,
            source=submitted_by,
            received_at=datetime.now(UTC),
            task_type=tt.name,
            payload=checked,
            priority=priority,
        )
        try:
            cluster = checked.get("cluster_id") if isinstance(checked, dict) else None
            created = await self.store.create(
                task_id,
                type=tt.name,
                priority=priority,
                submitted_by=submitted_by,
                cluster_id=cluster if isinstance(cluster, str) else "",
                queue=tt.queue,
            )
            if not created:
                owner = await self.store.owner(task_id)
                if owner is not None and owner != submitted_by:
                    raise Problem(
                        409,
                        "task_id_taken",
                        f"task id {task_id!r} belongs to another submitter's task",
                        path="$.task_id",
                    )
        except _REDIS_FAILED as e:
            raise redis_unavailable(ing.settings.retry_after_s, e) from e
        try:
            # The event id is the task id: a retried submission adds no second entry.
            [entry_id] = await ing.publish([event], None)
        except Problem:
            if created:
                with contextlib.suppress(*_REDIS_FAILED):
                    await self.store.discard(task_id)
            raise
        position = await self._position(priority, tt.queue)
        if created:
            TASKS_SUBMITTED.labels(tt.name, priority).inc()
        view = await self.store.get(task_id)
        return TaskAccepted(
            id=task_id,
            status=view.status if view else "queued",
            priority=priority,
            queue=tt.queue,
            position=position,
            entry_id=entry_id,
            location=f"/v1/tasks/{task_id}",
        )

    async def _refuse_if_shedding(self, queue: str) -> None:
        """503 when the queue has live runners and every one of them sheds load."""
        now = time.monotonic()
        cached = self._shed.get(queue)
        if cached is None or cached[0] <= now:
            try:
                runners = await self.runners.list(queue)
            except _REDIS_FAILED as e:
                raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
            cached = self._shed[queue] = (
                now + SHED_CACHE_S,
                bool(runners) and all(r.shedding for r in runners),
            )
        if cached[1]:
            retry_after = max(1, int(self.ingest.settings.retry_after_s))
            raise Problem(
                503,
                "overloaded",
                f"every runner of queue {queue!r} is over its CPU or memory ceiling; "
                "try again later",
                headers={"Retry-After": str(retry_after)},
                queue=queue,
            )

    async def read_submission(
        self, request: web.Request, decoder: msgspec.json.Decoder[S]
    ) -> tuple[Agent, str | None, S]:
        """A submission's caller, Idempotency-Key and body decoded with ``decoder``: the
        checks every submit route makes (token, JSON, size, empty, shape)."""
        ing = self.ingest
        agent = await self.submitter(request)
        ing.body_format(request, allowed=("json",))
        idem = idempotency_key(request)
        body = await ing.read_body(request)
        if not body.strip():
            raise Problem(400, "empty_body", "the request body is empty")
        return agent, idem, self.decode(decoder, body)

    def decode(self, decoder: msgspec.json.Decoder[S], body: bytes) -> S:
        """``body`` decoded, or the ingest's precise 400/422 (path, byte position)."""
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as e:
            err = self.ingest.decoder._item_error(0, "$", str(e))
            err["error"] = "invalid"
            raise validation_problem([err], 1, [], what="task") from None
        except msgspec.DecodeError as e:
            raise self.ingest.decoder._malformed(e, False, size=len(body)) from None
        except UnicodeDecodeError as e:
            raise Problem(400, "invalid_utf8", f"text is not valid UTF-8: {e.reason}") from None
        except RecursionError:
            raise Problem(400, "too_deep", "the body is nested too deeply") from None

    async def _position(self, priority: str, queue: str) -> int:
        """Entries of this queue and priority or more urgent the runners have not taken."""
        total = 0
        try:
            for p in PRIORITIES[: PRIORITIES.index(priority) + 1]:
                total += await self._waiting(p, queue)
        except _REDIS_FAILED:
            return -1
        return total

    async def _waiting(self, priority: str, queue: str) -> int:
        stream = self.ingest.keys.stream(task_event_class(priority, queue).topic)
        info = await group_info(self.ingest.client, stream, task_group(queue))
        lag = info.lag if info is not None else None
        return int(lag) if lag is not None else int(await self.ingest.client.xlen(stream))

    async def queue_sizes(self) -> dict[str, int]:
        """Tasks not yet taken by a runner, per priority, over every queue."""
        queues = sorted({t.queue for t in self.types.values()})
        return {p: sum([await self._waiting(p, q) for q in queues]) for p in PRIORITIES}

    # ------------------------------------------------------------------ read, list, cancel

    async def get(self, request: web.Request) -> web.Response:
        agent = await self.submitter(request)
        view = await self._load(request)
        self.check_owner(agent, view)
        return _view(view)

    async def list(self, request: web.Request) -> web.Response:
        """Tasks, newest first: ``?status=&type=&submitted_by=&limit=&before=``. Queued and
        running ones (the active index) come first, on the first page only; then finished
        ones (the history), whose page ``next`` continues. ``status`` chooses among both."""
        agent = await self.submitter(request)
        check_query(request, _LIST_QUERY)
        q = request.query
        statuses = [s for s in q.getall("status", []) if s]
        bad = [s for s in statuses if s not in _STATUSES]
        if bad:
            raise Problem(
                400, "invalid_query", f"status must be one of {', '.join(_STATUSES)}", path="status"
            )
        limit = _int_query(q.get("limit"), "limit", default=50, low=1, high=500)
        before = _cursor_query(q.get("before"))
        who = q.get("submitted_by") or None
        if not agent.operator:
            who = agent.name  # a submit token lists its own tasks only
        types = [t for t in q.getall("type", []) if t]
        active = [s for s in statuses if s in ACTIVE] if statuses else list(ACTIVE)
        ended = [s for s in statuses if s not in ACTIVE] if statuses else []
        try:
            views: list[TaskView] = []
            if active and before is None:
                views = await self.history.active(
                    self.store, limit=limit, statuses=active, types=types, submitted_by=who
                )
            cursor: HistoryCursor | None = None
            if (ended or not statuses) and len(views) >= limit:
                # The page is full: finished ones next (all that ended before now).
                cursor = HistoryCursor(int(time.time() * 1000) + 1)
            elif ended or not statuses:
                done, cursor = await self.history.list(
                    self.store,
                    limit=limit - len(views),
                    before=before,
                    statuses=ended,
                    types=types,
                    submitted_by=who,
                )
                views += done
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
        return json_response(
            {
                "tasks": [msgspec.to_builtins(v) for v in views],
                "next": _next_link(request, cursor) if cursor is not None else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        agent = await self.submitter(request)
        view = await self._load(request)
        self.check_owner(agent, view)
        try:
            verdict = await self.store.cancel(view.id, by=agent.name)
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
        if verdict == "missing":
            raise Problem(404, "not_found", f"no task {view.id!r} (or it expired)")
        log.info("task_cancel_requested", task_id=view.id, by=agent.name, verdict=verdict)
        if verdict == "cancelled":
            await self.history.record(view.id, view.type, "cancelled", None)
        view = await self._load(request)
        if verdict in ("completed", "failed"):
            raise Problem(
                409, "already_finished", f"task {view.id} is {verdict}", task_status=verdict
            )
        # queued → cancelled now (200); running → cancelling, ends 'cancelled' (202).
        return _view(view, status=202 if verdict == "cancelling" else 200)

    async def _load(self, request: web.Request) -> TaskView:
        task_id = _task_id(request)
        try:
            view = await self.store.get(task_id)
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
        if view is None:
            raise Problem(404, "not_found", f"no task {task_id!r} (or it expired)")
        return view


def _cursor_query(raw: str | None) -> HistoryCursor | None:
    """``before``: the ``next`` link's cursor (``HistoryCursor``), or a time in epoch ms."""
    if raw is None:
        return None
    try:
        return HistoryCursor.decode(raw)
    except ValueError as e:
        raise Problem(400, "invalid_query", f"before: {e}", path="before") from None


def _next_link(request: web.Request, cursor: HistoryCursor) -> str:
    """The next page: the same filters and limit, after ``cursor``."""
    query = [(k, v) for k, v in request.query.items() if k != "before"]
    return f"/v1/tasks?{urlencode([*query, ('before', cursor.encode())])}"


def _int_query(raw: str | None, name: str, *, default: Any, low: int, high: int) -> Any:
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise Problem(400, "invalid_query", f"{name} must be an integer", path=name) from None
    if not low <= value <= high:
        raise Problem(400, "invalid_query", f"{name} must be {low}..{high}", path=name)
    return value


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    try:
        return msgspec.convert(task_id, TASK_ID)
    except msgspec.ValidationError:
        raise Problem(404, "not_found", "no such task (malformed id)") from None


def _view(view: TaskView, *, status: int = 200) -> web.Response:
    return json_response(msgspec.to_builtins(view), status=status)
