"""Finished tasks: a history bounded by the task TTL, and counts per task type.

- ``<p>:tasks:history``: a sorted set of task ids scored by when they ended (ms). Entries older
  than the retention (the task TTL: the hashes they point to are gone by then) and beyond
  ``MAX_HISTORY`` are trimmed on every write.
- ``<p>:tasks:stats``: a hash of counters per task type since the key was created:
  ``<type>:completed``, ``:failed``, ``:cancelled``, ``:runs`` (attempts that ran) and ``:ms``
  (their total run time). These are what the seed-003 JSON ``/metrics`` answers, for every
  runner process at once (Prometheus counters are per process).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from streamproc.keys import Keys
from streamproc.tasks.store import TaskStore, TaskView

__all__ = ("MAX_HISTORY", "TaskHistory", "TypeStats")

log = structlog.get_logger("streamproc.tasks")

#: The most finished tasks the history keeps, whatever the retention.
MAX_HISTORY = 100_000
_ENDS = ("completed", "failed", "cancelled")


#: A page of tasks (``list`` is a method name inside TaskHistory).
Views = list[TaskView]
#: The statuses of a task that has not ended.
ACTIVE: tuple[str, ...] = ("queued", "running")


def _active(view: TaskView | None) -> bool:
    return view is not None and view.status in ACTIVE


class TypeStats(msgspec.Struct, kw_only=True):
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    #: Attempts that ran (a retried task counts each attempt).
    runs: int = 0
    duration_s_total: float = 0.0

    @property
    def average_s(self) -> float:
        return self.duration_s_total / self.runs if self.runs else 0.0


class TaskHistory:
    def __init__(self, redis: aioredis.Redis, keys: Keys, *, retention_s: int = 24 * 3600) -> None:
        self.redis, self.keys, self.retention_s = redis, keys, retention_s

    async def record(
        self, task_id: str, task_type: str, status: str | None, run_s: float | None
    ) -> None:
        """One attempt that ran for ``run_s`` (None: none ran) and, when ``status`` is an end
        state, the task's end. Best effort: a Redis error is logged, the task is not touched."""
        now_ms = int(time.time() * 1000)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                if run_s is not None:
                    pipe.hincrby(self.keys.task_stats(), f"{task_type}:runs", 1)
                    pipe.hincrby(self.keys.task_stats(), f"{task_type}:ms", int(run_s * 1000))
                if status in _ENDS:
                    pipe.hincrby(self.keys.task_stats(), f"{task_type}:{status}", 1)
                    key = self.keys.task_history()
                    pipe.zadd(key, {task_id: now_ms})
                    pipe.zremrangebyscore(key, "-inf", now_ms - self.retention_s * 1000)
                    pipe.zremrangebyrank(key, 0, -MAX_HISTORY - 1)
                await pipe.execute()
        except Exception as e:
            log.warning("task_history_failed", task_id=task_id, error=str(e))

    async def stats(self) -> dict[str, TypeStats]:
        raw: Any = await self.redis.hgetall(self.keys.task_stats())
        out: dict[str, TypeStats] = {}
        for k, v in raw.items():
            name, _, what = k.decode().rpartition(":")
            s = out.setdefault(name, TypeStats())
            n = int(v)
            if what == "ms":
                s.duration_s_total = n / 1000
            elif what in ("completed", "failed", "cancelled", "runs"):
                setattr(s, what, n)
        return dict(sorted(out.items()))

    async def list(
        self,
        store: TaskStore,
        *,
        limit: int = 50,
        before_ms: int | None = None,
        statuses: Sequence[str] = (),
        types: Sequence[str] = (),
        submitted_by: str | None = None,
        scan_max: int = 5000,
    ) -> tuple[list[TaskView], int | None]:
        """Finished tasks, newest first, filtered; and the cursor (``before_ms``) of the next
        page, None at the end. At most ``scan_max`` ids are looked at per call."""
        return await self._scan(
            self.keys.task_history(),
            store,
            limit=limit,
            before_ms=before_ms,
            statuses=statuses,
            types=types,
            submitted_by=submitted_by,
            scan_max=scan_max,
        )

    async def active(
        self,
        store: TaskStore,
        *,
        limit: int = 50,
        statuses: Sequence[str] = ACTIVE,
        types: Sequence[str] = (),
        submitted_by: str | None = None,
        scan_max: int = 5000,
    ) -> Views:
        """Queued and running tasks, newest first (``Keys.task_active``). Ids whose task has
        ended or expired meanwhile leave the index here (it is written beside the task, not
        with it)."""
        views, _ = await self._scan(
            self.keys.task_active(),
            store,
            limit=limit,
            before_ms=None,
            statuses=statuses,
            types=types,
            submitted_by=submitted_by,
            scan_max=scan_max,
            prune=True,
        )
        return views

    async def _scan(
        self,
        key: str,
        store: TaskStore,
        *,
        limit: int,
        before_ms: int | None,
        statuses: Sequence[str],
        types: Sequence[str],
        submitted_by: str | None,
        scan_max: int,
        prune: bool = False,
    ) -> tuple[Views, int | None]:
        top: Any = "+inf" if before_ms is None else f"({before_ms}"
        out: Views = []
        cursor: int | None = None
        scanned = 0
        while len(out) < limit and scanned < scan_max:
            chunk: Any = await self.redis.zrevrangebyscore(
                key, top, "-inf", start=0, num=min(200, scan_max - scanned), withscores=True
            )
            if not chunk:
                return out, None
            scanned += len(chunk)
            views = await store.get_many([m.decode() for m, _ in chunk])
            if prune:
                gone = [m for (m, _), v in zip(chunk, views, strict=True) if not _active(v)]
                if gone:
                    await self.redis.zrem(key, *gone)
            for (_, score), view in zip(chunk, views, strict=True):
                cursor = int(score)
                if view is None or (prune and not _active(view)):
                    continue
                if statuses and view.status not in statuses:
                    continue
                if types and view.type not in types:
                    continue
                if submitted_by is not None and view.submitted_by != submitted_by:
                    continue
                out.append(view)
                if len(out) >= limit:
                    break
            top = f"({cursor}"
        return out, cursor
