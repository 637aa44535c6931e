"""Tasks on the dashboard.

- ``TASKS_PANEL`` (``App(panels=[TASKS_PANEL])``, "Task history"): the finished tasks, newest
  first (type, status, duration, submitter), and the live runners in its note. Read once per
  dashboard snapshot: one ZREVRANGEBYSCORE of the history and one pipelined HGETALL per task
  shown (at most ``MAX_ROWS``), the runner registry and the history's size.
- ``task_rows`` / ``cancel_task``: the dashboard's Tasks view (``/dashboard/api/tasks``):
  queued and running tasks, then finished ones, each with its runtime, the runner holding its
  entry and its payload (from its request entry, found by its id near its creation time), and
  the cancel ``DELETE /v1/tasks/{id}`` does (``TaskStore.cancel`` + the history).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from streamproc.dashboard.panels import MAX_ROWS, Cell, Panel, PanelData
from streamproc.errors import ConfigError
from streamproc.keys import Keys
from streamproc.tasks.cli import _took
from streamproc.tasks.events import task_event_class, task_group
from streamproc.tasks.history import ACTIVE, TaskHistory
from streamproc.tasks.runners import RunnerRegistry
from streamproc.tasks.store import TaskStore, TaskView

__all__ = ("COLUMNS", "TASKS_PANEL", "TaskRow", "cancel_task", "read_tasks", "task_rows")

COLUMNS = ["finished", "task", "type", "queue", "status", "took s", "attempts", "submitter"]


async def read_tasks(redis: aioredis.Redis, keys: Keys) -> PanelData:
    views, _ = await TaskHistory(redis, keys).list(
        TaskStore(redis, keys), limit=MAX_ROWS, scan_max=MAX_ROWS * 2
    )
    total: Any = await redis.zcard(keys.task_history())
    runners = await RunnerRegistry(redis, keys).list()
    rows: list[list[Cell]] = [
        [
            v.finished_at,
            v.id,
            v.type,
            v.queue,
            v.status + (f" ({v.time_limit} limit)" if v.time_limit else ""),
            _took(v.started_at, v.finished_at),
            v.attempts,
            v.submitted_by,
        ]
        for v in views
    ]
    shedding = [r.id for r in runners if r.shedding]
    note = (
        f"{len(runners)} live runner(s), {sum(r.active for r in runners)} task(s) running"
        + (f"; shedding load: {', '.join(shedding)}" if shedding else "")
        + "; finished tasks are kept for the task TTL (24 h)"
    )
    return PanelData(columns=COLUMNS, rows=rows, total=int(total), note=note)


TASKS_PANEL = Panel("tasks", "Task history", read_tasks)


# ---------------------------------------------------------------------- the Tasks view
# The dashboard's own Tasks section (``/dashboard/api/tasks``): live and finished tasks with
# their runner and payload, and Cancel. Above is the application panel of finished tasks.

#: A task's request entry is looked for among the entries stamped this long before (clocks of
#: ingest and Redis apart) to this long after its creation time (ingest publishes it right
#: after writing the hash), ``_ENTRY_SCAN`` of them at most.
_ENTRY_BEFORE_MS = 10_000
_ENTRY_AFTER_MS = 60_000
_ENTRY_SCAN = 500


class TaskRow(msgspec.Struct, kw_only=True):
    """One task for the dashboard: the task's status hash plus what its stream entry says."""

    task: TaskView
    #: Seconds it ran (started → finished, or → now while running); None before it started.
    runtime_s: float | None
    #: The consumer holding its entry while it runs (XPENDING); None when none does.
    runner: str | None = None
    #: The request's payload (from its stream entry), when the entry is still in the stream.
    payload: Any = None
    entry_id: str | None = None


def _ms(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None


def _stream_of(keys: Keys, view: TaskView) -> str | None:
    try:
        return keys.stream(task_event_class(view.priority, view.queue).topic)
    except (ValueError, ConfigError):
        return None


def _payload(fields: Mapping[bytes, bytes]) -> Any:
    raw = fields.get(b"data", b"")
    try:
        event = _decode(raw)
    except msgspec.DecodeError:
        return raw.decode(errors="replace")
    return event.get("payload") if isinstance(event, dict) else None


async def _entries(
    redis: aioredis.Redis, keys: Keys, views: Sequence[TaskView]
) -> list[tuple[str | None, Any, str | None]]:
    """Per task: (entry id, payload, runner) of its request entry, found by its event id (=
    the task id) among the entries of its priority's topic stamped around its creation; the
    runner is the consumer holding the entry while the task runs (XPENDING). Two pipelined
    round trips for every task shown."""
    wanted: list[tuple[TaskView, str] | None] = []
    async with redis.pipeline(transaction=False) as pipe:
        for v in views:
            created, stream = _ms(v.created_at), _stream_of(keys, v)
            if created is None or stream is None:
                wanted.append(None)
                continue
            pipe.xrange(
                stream,
                min=str(max(0, created - _ENTRY_BEFORE_MS)),
                max=str(created + _ENTRY_AFTER_MS),
                count=_ENTRY_SCAN,
            )
            wanted.append((v, stream))
        found: list[Any] = await pipe.execute() if any(wanted) else []
    replies = iter(found)
    out: list[tuple[str | None, Any, str | None]] = []
    holders: list[tuple[int, str, str, str]] = []  # (row, stream, group, entry id)
    for want in wanted:
        if want is None:
            out.append((None, None, None))
            continue
        view, stream = want
        match = next(
            (
                (entry_id, fields)
                for entry_id, fields in next(replies)
                if fields.get(b"id", b"").decode(errors="replace") == view.id
            ),
            None,
        )
        if match is None:
            out.append((None, None, None))
            continue
        entry_id = match[0].decode()
        out.append((entry_id, _payload(match[1]), None))
        if view.status == "running":
            holders.append((len(out) - 1, stream, task_group(view.queue), entry_id))
    if holders:
        async with redis.pipeline(transaction=False) as pipe:
            for _, stream, group, entry_id in holders:
                pipe.xpending_range(stream, group, min=entry_id, max=entry_id, count=1)
            pending: list[Any] = await pipe.execute()
        for (row, _, _, _), rows in zip(holders, pending, strict=True):
            if rows:
                name = rows[0]["consumer"]
                runner = name.decode(errors="replace") if isinstance(name, bytes) else str(name)
                out[row] = (out[row][0], out[row][1], runner)
    return out


_decode = msgspec.json.Decoder().decode


def _runtime_s(view: TaskView, now_ms: int) -> float | None:
    start = _ms(view.started_at)
    if start is None:
        return None
    end = _ms(view.finished_at) if view.status not in ("running", "queued") else now_ms
    return None if end is None else round(max(0, end - start) / 1000, 3)


async def task_rows(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    statuses: Sequence[str] = (),
    types: Sequence[str] = (),
    limit: int = 50,
) -> tuple[list[TaskRow], int]:
    """Queued and running tasks first (the active index), then finished ones (the history),
    newest first, filtered as ``GET /v1/tasks`` does; and how many tasks are active."""
    store, history = TaskStore(redis, keys), TaskHistory(redis, keys)
    active = [s for s in statuses if s in ACTIVE] if statuses else list(ACTIVE)
    ended = [s for s in statuses if s not in ACTIVE] if statuses else []
    views: list[TaskView] = []
    if active:
        views = await history.active(store, limit=limit, statuses=active, types=types)
    if (ended or not statuses) and len(views) < limit:
        done, _ = await history.list(store, limit=limit - len(views), statuses=ended, types=types)
        views += done
    now_ms = int(time.time() * 1000)
    rows = []
    for v, (entry_id, payload, runner) in zip(
        views, await _entries(redis, keys, views), strict=True
    ):
        rows.append(
            TaskRow(
                task=v,
                runtime_s=_runtime_s(v, now_ms),
                runner=runner,
                payload=payload,
                entry_id=entry_id,
            )
        )
    total: Any = await redis.zcard(keys.task_active())
    return rows, int(total)


async def cancel_task(redis: aioredis.Redis, keys: Keys, task_id: str, *, by: str) -> str:
    """Cancel as ``DELETE /v1/tasks/{id}`` does: 'cancelled' (it was queued: ends now and
    goes to the history), 'cancelling' (running: asked to stop), 'missing', or its end."""
    store = TaskStore(redis, keys)
    view = await store.get(task_id)
    if view is None:
        return "missing"
    verdict = await store.cancel(task_id, by=by)
    if verdict == "cancelled":
        await TaskHistory(redis, keys).record(task_id, view.type, "cancelled", None)
    return verdict
