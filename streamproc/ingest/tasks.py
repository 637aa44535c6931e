"""The task API: ``POST /v1/tasks``, ``GET /v1/tasks/{id}``, ``DELETE /v1/tasks/{id}``.

Operator tokens only. A task is a hash (its status, kept 24 h; see ``TaskStore``) and an event
on the stream of its priority (``streamproc.tasks.events``); the runner is
``streamproc.tasks.runner``.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from streamproc.connection import REDIS_DOWN
from streamproc.event import new_event_id
from streamproc.groups import group_info
from streamproc.ingest._http import Problem, idempotency_key, json_response, redis_unavailable
from streamproc.ingest.decode import validation_problem
from streamproc.tasks.events import PRIORITIES, Priority, task_event_class
from streamproc.tasks.metrics import TASKS_SUBMITTED
from streamproc.tasks.runner import TaskType
from streamproc.tasks.store import TaskStore, TaskView

if TYPE_CHECKING:
    from streamproc.ingest.app import Ingest

__all__ = ("TaskAccepted", "TaskApi", "TaskSubmit")

_TASK_NS = uuid.UUID("3d1f8a6c-2b4e-4f7a-8c9d-1e5b7a3c9f20")
_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
_TASK_ID = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9-]+$")]


class TaskSubmit(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/tasks``."""

    type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = "normal"


class TaskAccepted(msgspec.Struct, kw_only=True):
    """Answer of ``POST /v1/tasks`` (202)."""

    id: str
    status: str
    priority: Priority
    #: Tasks of this priority or more urgent not yet taken by a runner, this one included.
    position: int
    entry_id: str
    location: str


class TaskApi:
    def __init__(self, ingest: Ingest, types: Mapping[str, TaskType], *, group: str) -> None:
        self.ingest, self.types, self.group = ingest, dict(types), group
        self.store = TaskStore(ingest.client, ingest.keys, ttl_s=ingest.settings.task_ttl_s)
        self._decoder = msgspec.json.Decoder(TaskSubmit)

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/tasks", self.submit)
        router.add_get("/v1/tasks/{task_id}", self.get)
        router.add_delete("/v1/tasks/{task_id}", self.cancel)

    # ------------------------------------------------------------------ submit

    async def submit(self, request: web.Request) -> web.Response:
        ing = self.ingest
        agent = await ing.authenticate(request, operator=True)
        ing.body_format(request, allowed=("json",))
        idem = idempotency_key(request)
        body = await ing.read_body(request)
        if not body.strip():
            raise Problem(400, "empty_body", "the request body is empty")
        sub = self._decode(body)
        answer = await self.create(
            sub.type, sub.payload, priority=sub.priority, submitted_by=agent.name, idem=idem
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
        payload_path: str = "$.payload",
    ) -> TaskAccepted:
        """Validate ``payload`` against the type, store the task and publish its request.

        The one way a task is created: ``POST /v1/tasks`` and the application's own routes
        (``POST /clusters/{id}/optimize``) call it. Refusals are ``Problem`` s whose paths
        start at ``payload_path``; a retry with the same ``idem`` names the same task.
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
        task_id = str(uuid.uuid5(_TASK_NS, f"{submitted_by}:{idem}")) if idem else new_event_id()
        event = task_event_class(priority)(
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
        position = await self._position(priority)
        if created:
            TASKS_SUBMITTED.labels(tt.name, priority).inc()
        view = await self.store.get(task_id)
        return TaskAccepted(
            id=task_id,
            status=view.status if view else "queued",
            priority=priority,
            position=position,
            entry_id=entry_id,
            location=f"/v1/tasks/{task_id}",
        )

    def _decode(self, body: bytes) -> TaskSubmit:
        try:
            return self._decoder.decode(body)
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

    async def _position(self, priority: str) -> int:
        """Entries of this or a more urgent priority the runners have not taken yet."""
        total = 0
        try:
            for p in PRIORITIES[: PRIORITIES.index(priority) + 1]:
                stream = self.ingest.keys.stream(task_event_class(p).topic)
                info = await group_info(self.ingest.client, stream, self.group)
                lag = info.lag if info is not None else None
                total += int(lag) if lag is not None else int(await self.ingest.client.xlen(stream))
        except _REDIS_FAILED:
            return -1
        return total

    # ------------------------------------------------------------------ read, cancel

    async def get(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        return _view(await self._load(request))

    async def cancel(self, request: web.Request) -> web.Response:
        await self.ingest.authenticate(request, operator=True)
        task_id = _task_id(request)
        try:
            verdict = await self.store.cancel(task_id)
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
        if verdict == "missing":
            raise Problem(404, "not_found", f"no task {task_id!r} (or it expired)")
        view = await self._load(request)
        if verdict in ("completed", "failed"):
            raise Problem(
                409, "already_finished", f"task {task_id} is {verdict}", task_status=verdict
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


def _task_id(request: web.Request) -> str:
    task_id = request.match_info["task_id"]
    try:
        return msgspec.convert(task_id, _TASK_ID)
    except msgspec.ValidationError:
        raise Problem(404, "not_found", "no such task (malformed id)") from None


def _view(view: TaskView, *, status: int = 200) -> web.Response:
    return json_response(msgspec.to_builtins(view), status=status)
