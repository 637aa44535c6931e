"""Task status in Redis: one hash per task, kept ``ttl_s`` (24 h) after its last change.

Every state change is one Lua script, so the API and the runner never race:

    queued ──start──▶ running ──finish──▶ completed | failed | cancelled
       │                 │ └──finish(queued)──▶ queued (a retry is scheduled)
       └─cancel─▶ cancelled        └─cancel─▶ cancel_requested=1 + a signal on the cancel list
    queued | running ──fail──▶ failed  (the engine dead-lettered the task's entry)
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec
import orjson
import redis.asyncio as aioredis

from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = ("TaskStatus", "TaskStore", "TaskView", "now_iso")

TaskStatus = Literal["queued", "running", "completed", "failed", "cancelled"]

_CREATE = Lua("""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
""")
# KEYS: hash, cancel list. ARGV: now, ttl_s, who.
_CANCEL = Lua("""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st == 'queued' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'cancel_requested', '1',
             'finished_at', ARGV[1], 'updated_at', ARGV[1], 'cancelled_by', ARGV[3])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 'cancelled'
end
if st == 'running' then
  if redis.call('HGET', KEYS[1], 'cancel_requested') ~= '1' then
    redis.call('HSET', KEYS[1], 'cancel_requested', '1', 'updated_at', ARGV[1],
               'cancelled_by', ARGV[3])
    redis.call('RPUSH', KEYS[2], '1')
    redis.call('EXPIRE', KEYS[2], ARGV[2])
  end
  return 'cancelling'
end
return st
""")
# KEYS: hash. ARGV: now, ttl_s. 'run', 'skip' or 'missing'.
_START = Lua("""
local st = redis.call('HGET', KEYS[1], 'status')
if not st then return 'missing' end
if st ~= 'queued' and st ~= 'running' then return 'skip' end
if redis.call('HGET', KEYS[1], 'cancel_requested') == '1' then
  redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', ARGV[1], 'updated_at', ARGV[1])
  return 'skip'
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started_at', ARGV[1], 'updated_at', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 'run'
""")
# KEYS: hash. ARGV: progress, detail JSON, now, ttl_s. -1 not running, else cancel flag.
_PROGRESS = Lua("""
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
redis.call('HSET', KEYS[1], 'progress', ARGV[1], 'detail', ARGV[2], 'updated_at', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return tonumber(redis.call('HGET', KEYS[1], 'cancel_requested') or '0')
""")
# KEYS: hash, cancel list. ARGV: status, now, ttl_s, field, value... 0 if it was not running.
_FINISH = Lua("""
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'updated_at', ARGV[2], unpack(ARGV, 4))
if ARGV[1] ~= 'queued' then redis.call('HSET', KEYS[1], 'finished_at', ARGV[2]) end
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
""")
# KEYS: hash, cancel list. ARGV: error, now, ttl_s. 0 if it was not queued or running.
_FAIL = Lua("""
local st = redis.call('HGET', KEYS[1], 'status')
if st ~= 'queued' and st ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error', ARGV[1], 'finished_at', ARGV[2],
           'updated_at', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
""")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class TaskView(msgspec.Struct, kw_only=True):
    """What ``GET /v1/tasks/{id}`` answers."""

    id: str
    type: str
    #: The queue it runs in (``TaskType.queue``).
    queue: str = "default"
    priority: Literal["low", "normal", "high", "critical"]
    status: TaskStatus
    #: 0.0 … 1.0, as last reported by the task.
    progress: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    #: The task's own progress details (e.g. pages crawled, bugs found).
    detail: dict[str, Any] | None = None
    result: Any = None
    error: str | None = None
    attempts: int = 0
    cancel_requested: bool = False
    #: Who asked to cancel it (an agent name), when someone did.
    cancelled_by: str | None = None
    #: "soft" or "hard" when the task reached that time limit (the last attempt).
    time_limit: Literal["soft", "hard"] | None = None
    submitted_by: str = ""
    created_at: str
    started_at: str | None = None
    finished_at: str | None = None
    updated_at: str


def _json_or_none(raw: str | None) -> Any:
    return orjson.loads(raw) if raw else None


def _view(raw: Any) -> TaskView | None:
    if not raw:
        return None
    f = {k.decode(): v.decode() for k, v in raw.items()}
    limit = f.get("time_limit")
    return TaskView(
        id=f["id"],
        type=f["type"],
        queue=f.get("queue") or "default",
        priority=f["priority"],
        status=f["status"],
        progress=float(f.get("progress") or 0),
        detail=_json_or_none(f.get("detail")),
        result=_json_or_none(f.get("result")),
        error=f.get("error") or None,
        attempts=int(f.get("attempts") or 0),
        cancel_requested=f.get("cancel_requested") == "1",
        cancelled_by=f.get("cancelled_by") or None,
        time_limit=limit if limit in ("soft", "hard") else None,
        submitted_by=f.get("submitted_by", ""),
        created_at=f["created_at"],
        started_at=f.get("started_at"),
        finished_at=f.get("finished_at"),
        updated_at=f["updated_at"],
    )


class TaskStore:
    """Reads and changes task hashes (``Keys.task``)."""

    def __init__(self, client: aioredis.Redis, keys: Keys, *, ttl_s: int = 24 * 3600) -> None:
        self.client, self.keys, self.ttl_s = client, keys, ttl_s

    async def create(
        self,
        task_id: str,
        *,
        type: str,
        priority: str,
        submitted_by: str,
        cluster_id: str = "",
        queue: str = "default",
    ) -> bool:
        """Create a queued task; False if it exists (an idempotent retry). ``cluster_id``: the
        cluster the task is for (its payload's ``cluster_id``), kept for who may read it."""
        now = now_iso()
        fields = {
            "id": task_id,
            "type": type,
            "queue": queue,
            "priority": priority,
            "status": "queued",
            "progress": "0",
            "attempts": "0",
            "cancel_requested": "0",
            "submitted_by": submitted_by,
            "created_at": now,
            "updated_at": now,
        }
        if cluster_id:
            fields["cluster_id"] = cluster_id
        args: list[Any] = [self.ttl_s]
        for k, v in fields.items():
            args += (k, v)
        created = bool(await _CREATE(self.client, [self.keys.task(task_id)], args))
        if created:  # the index of tasks not ended (listings drop the ones that ended)
            await self.client.zadd(self.keys.task_active(), {task_id: int(time.time() * 1000)})
        return created

    async def _ended(self, task_id: str) -> None:
        await self.client.zrem(self.keys.task_active(), task_id)

    async def discard(self, task_id: str) -> None:
        await self.client.delete(self.keys.task(task_id))

    async def get(self, task_id: str) -> TaskView | None:
        return _view(await self.client.hgetall(self.keys.task(task_id)))

    async def get_many(self, task_ids: list[str]) -> list[TaskView | None]:
        """The tasks in one round trip (None where one expired)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                pipe.hgetall(self.keys.task(task_id))
            return [_view(raw) for raw in await pipe.execute()]

    async def owner(self, task_id: str) -> str | None:
        """Who submitted the task; None when it does not exist."""
        raw: Any = await self.client.hget(self.keys.task(task_id), "submitted_by")
        return raw.decode() if raw is not None else None

    async def cancel(self, task_id: str, *, by: str = "") -> str:
        """'cancelled' (was queued), 'cancelling' (running), 'missing', or the end status."""
        keys = [self.keys.task(task_id), self.keys.task_cancel(task_id)]
        reply = await _CANCEL(self.client, keys, [now_iso(), self.ttl_s, by])
        verdict = reply.decode() if isinstance(reply, bytes) else str(reply)
        if verdict == "cancelled":
            await self._ended(task_id)
        return verdict

    async def start(self, task_id: str) -> str:
        reply = await _START(self.client, [self.keys.task(task_id)], [now_iso(), self.ttl_s])
        return reply.decode() if isinstance(reply, bytes) else str(reply)

    async def progress(self, task_id: str, fraction: float, detail: dict[str, Any]) -> int:
        """-1 when the task is not running any more, else its cancel flag (0/1)."""
        fraction = min(1.0, max(0.0, fraction))
        return int(
            await _PROGRESS(
                self.client,
                [self.keys.task(task_id)],
                [repr(fraction), orjson.dumps(detail), now_iso(), self.ttl_s],
            )
        )

    async def finish(self, task_id: str, status: str, **fields: str | bytes) -> bool:
        args: list[Any] = [status, now_iso(), self.ttl_s]
        for k, v in fields.items():
            args += (k, v)
        keys = [self.keys.task(task_id), self.keys.task_cancel(task_id)]
        finished = bool(await _FINISH(self.client, keys, args))
        await self._ended(task_id)
        return finished

    async def fail(self, task_id: str, *, error: str) -> bool:
        """End a queued or running task ``failed`` (its entry will not run again).

        False when the task is unknown (expired, another prefix) or already ended.
        """
        keys = [self.keys.task(task_id), self.keys.task_cancel(task_id)]
        failed = bool(await _FAIL(self.client, keys, [error, now_iso(), self.ttl_s]))
        await self._ended(task_id)
        return failed
