"""The dashboard's Tasks panel (``App(panels=[TASKS_PANEL])``): the finished tasks of the
history, newest first (type, status, duration, submitter), and the live runners in its note.

Read once per dashboard snapshot: one ZREVRANGEBYSCORE of the history and one pipelined
HGETALL per task shown (at most ``MAX_ROWS``), the runner registry and the history's size.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from streamproc.dashboard.panels import MAX_ROWS, Cell, Panel, PanelData
from streamproc.keys import Keys
from streamproc.tasks.cli import _took
from streamproc.tasks.history import TaskHistory
from streamproc.tasks.runners import RunnerRegistry
from streamproc.tasks.store import TaskStore

__all__ = ("COLUMNS", "TASKS_PANEL", "read_tasks")

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


TASKS_PANEL = Panel("tasks", "Tasks", read_tasks)
