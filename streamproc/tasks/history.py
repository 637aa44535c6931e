"""Finished tasks: a history bounded by the task TTL, and counts per task type.

- ``<p>:tasks:history``: a sorted set of task ids scored by when they ended (ms). Entries older
  than the retention (the task TTL: the hashes they point to are gone by then) and beyond
  ``MAX_HISTORY`` are trimmed on every write.
- ``<p>:tasks:stats``: a hash of counters per task type since the key was created:
  ``<type>:completed``, ``:failed``, ``:cancelled``, ``:runs`` (attempts that ran) and ``:ms``
  (their total run time). These are what the seed-003 JSON ``/metrics`` answers, for every
  runner process at once (Prometheus counters are per process).

**Paging is exact.** Redis orders a sorted set by score, then by member (bytes); a page's
cursor (``HistoryCursor``) is the last entry it looked at — its score *and* its member — so
the next page starts right after that entry, also when many tasks ended in the same
millisecond (a millisecond alone as the cursor skipped the rest of that millisecond). One
script (``_PAGE``) finds the entry's place and reads on from it; when the entry has left the
set meanwhile (trimmed, or ended again with a new score), it reads from the start of the
cursor's millisecond and the entries at or before the cursor are dropped here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

import msgspec
import redis.asyncio as aioredis
import structlog

from streamproc._lua import Lua
from streamproc.keys import Keys
from streamproc.tasks.store import TaskStore, TaskView

__all__ = ("CURSOR_PATTERN", "MAX_HISTORY", "HistoryCursor", "TaskHistory", "TypeStats")

log = structlog.get_logger("streamproc.tasks")

#: The most finished tasks the history keeps, whatever the retention.
MAX_HISTORY = 100_000
_ENDS = ("completed", "failed", "cancelled")


#: A page of tasks (``list`` is a method name inside TaskHistory).
Views = list[TaskView]
#: The statuses of a task that has not ended.
ACTIVE: tuple[str, ...] = ("queued", "running")


#: A cursor's text: ``<ms>`` (everything that ended before that millisecond) or
#: ``<ms>.<hex of the task id>`` (everything after that entry). Also the OpenAPI pattern.
CURSOR_PATTERN = r"^[0-9]{1,18}(?:\.(?:[0-9a-f]{2}){1,256})?$"
_CURSOR_RE = re.compile(CURSOR_PATTERN)


class HistoryCursor(NamedTuple):
    """Where a page ended: the entry scored ``ms`` whose member is ``task_id``; or, with an
    empty ``task_id``, just before ``ms`` (every entry scored ``ms`` or more is behind)."""

    ms: int
    task_id: str = ""

    def encode(self) -> str:
        """An opaque token for a URL (``GET /v1/tasks?before=``): ``CURSOR_PATTERN``."""
        return f"{self.ms}.{self.member.hex()}" if self.task_id else str(self.ms)

    @classmethod
    def decode(cls, text: str) -> HistoryCursor:
        """The cursor of ``encode``'s token; ValueError saying why when it is not one."""
        if not _CURSOR_RE.fullmatch(text):
            raise ValueError(
                "not a cursor: use the 'next' link of the page before (or a time in epoch ms)"
            )
        ms, _, member = text.partition(".")
        # Any bytes: a member that is not UTF-8 (no task id is) just matches no entry.
        return cls(int(ms), bytes.fromhex(member).decode("utf-8", "surrogateescape"))

    @property
    def member(self) -> bytes:
        """The task id as the sorted set's member (bytes, as Redis orders them)."""
        return self.task_id.encode("utf-8", "surrogateescape")


# KEYS: the sorted set. ARGV: ms ('+inf' on the first page), member ('' = before ms), n.
# Answers up to n entries after the cursor, newest first (WITHSCORES). When the cursor's
# member is not there with that score, the entries from the start of its millisecond come
# too (up to that millisecond's count more): the caller drops those at or before the cursor.
_PAGE = Lua("""
local key, ms, member, n = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
local start, extra = nil, 0
if member ~= '' then
  local score = redis.call('ZSCORE', key, member)
  if score and tonumber(score) == tonumber(ms) then
    start = redis.call('ZREVRANK', key, member) + 1
  else
    start = redis.call('ZCOUNT', key, '(' .. ms, '+inf')
    extra = redis.call('ZCOUNT', key, ms, ms)
  end
else
  start = redis.call('ZCOUNT', key, ms, '+inf')
end
return redis.call('ZREVRANGE', key, start, start + n + extra - 1, 'WITHSCORES')
""")


def _after(entry: tuple[int, bytes], cursor: HistoryCursor) -> bool:
    """Does ``entry`` (score, member) come after ``cursor`` in newest-first order?"""
    ms, member = entry
    if not cursor.task_id:
        return ms < cursor.ms
    return ms < cursor.ms or (ms == cursor.ms and member < cursor.member)


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
        before: HistoryCursor | None = None,
        statuses: Sequence[str] = (),
        types: Sequence[str] = (),
        submitted_by: str | None = None,
        scan_max: int = 5000,
    ) -> tuple[list[TaskView], HistoryCursor | None]:
        """Finished tasks after ``before`` (None: the newest), newest first, filtered; and the
        cursor of the next page, None at the end. At most ``scan_max`` ids are looked at per
        call (the cursor then says where the next call goes on)."""
        return await self._scan(
            self.keys.task_history(),
            store,
            limit=limit,
            before=before,
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
            before=None,
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
        before: HistoryCursor | None,
        statuses: Sequence[str],
        types: Sequence[str],
        submitted_by: str | None,
        scan_max: int,
        prune: bool = False,
    ) -> tuple[Views, HistoryCursor | None]:
        out: Views = []
        cursor = before
        scanned = 0
        while len(out) < limit and scanned < scan_max:
            n = min(200, scan_max - scanned)
            args = ["+inf", "", n] if cursor is None else [cursor.ms, cursor.member, n]
            raw: Any = await _PAGE(self.redis, [key], args)
            pairs = [(int(float(raw[i + 1])), raw[i]) for i in range(0, len(raw), 2)]
            chunk = [(ms, m) for ms, m in pairs if cursor is None or _after((ms, m), cursor)]
            chunk = chunk[:n]
            if not chunk:
                return out, None
            scanned += len(chunk)
            views = await store.get_many([m.decode() for _, m in chunk])
            if prune:
                gone = [m for (_, m), v in zip(chunk, views, strict=True) if not _active(v)]
                if gone:
                    await self.redis.zrem(key, *gone)
            for (ms, member), view in zip(chunk, views, strict=True):
                cursor = HistoryCursor(ms, member.decode("utf-8", "surrogateescape"))
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
        return out, cursor
