"""The task runner: a concern reading one stream per priority, most urgent first.

``task_concern(types)`` builds the consumer group. Delivery, acks, reclaim of a crashed
runner's tasks and retries are the engine's; this module adds what tasks need on top:

- **priority**: the group reads the ``tasks.critical`` stream first, then high, normal, low;
  tasks read together wait at their type's gate, which hands free slots to the most urgent
  (then the oldest) waiter. Order is strict among the tasks one runner process holds.
- **per-type concurrency**: each task type has its own gate (``TaskType.concurrency``) in each
  runner process, and the same limit across all runner processes (``GlobalSlots``: a sorted
  set of leases in Redis, renewed while the task runs, expiring ``SLOT_TTL_S`` after a runner
  died). A task waits for a slot by polling (50 ms growing to 1 s): across processes the
  order of waiters is not strict; within one process it is by priority.
- **status and progress** in the task's hash (``TaskStore``), kept 24 h.
- **cooperative cancel**: ``DELETE /v1/tasks/{id}`` pushes to the task's cancel list; the
  runner waits on it (BLPOP) beside the task and cancels the task's asyncio task, which ends
  ``cancelled``. A queued task is skipped when it comes up.
- **failures**: a task function's exception is retried with backoff up to the type's
  ``max_retries`` (status goes back to ``queued`` with the error); ``Permanent``, the type's
  ``permanent_errors``, a timeout or the last retry end it ``failed``. Failed tasks are acked,
  not dead-lettered: their hash says what happened.
- **dead letters**: an entry the engine dead-letters itself (poison: delivered too often;
  undecodable; the group's retries exhausted) ends its task ``failed`` with the reason, through
  the concern's ``on_dead_letter`` hook, instead of staying ``queued``/``running`` for 24 h.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from streamproc._backoff import backoff_delay_s
from streamproc.concern import Concern, Context, DeadLetterInfo
from streamproc.errors import ConfigError, Permanent, Retry
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.settings import RetryPolicy
from streamproc.tasks.events import PRIORITIES, TASK_EVENTS, TaskRequested
from streamproc.tasks.metrics import TASK_SECONDS, TASKS_FINISHED
from streamproc.tasks.slots import GlobalSlots, PriorityGate
from streamproc.tasks.store import TaskStore

__all__ = ("TASK_GROUP", "TaskContext", "TaskType", "task_concern")

log = structlog.get_logger("streamproc.tasks")

TASK_GROUP = "tasks"
#: How long one BLPOP on a running task's cancel list waits (under the socket timeout).
CANCEL_POLL_S = 1.0


@dataclass(frozen=True, kw_only=True)
class TaskType:
    """A kind of task: the function that runs it, its payload type and its limits."""

    name: str
    #: ``async fn(payload, ctx) -> result`` (the result must encode as JSON).
    run: Callable[[Any, TaskContext], Awaitable[Any]]
    #: msgspec type the payload is validated against, at submission and again at run time.
    payload_type: Any = dict
    #: Tasks of this type running at once, across all runner processes.
    concurrency: int = 1
    max_retries: int = 3
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    #: Hard time limit of one attempt; None = none. A timeout fails the task (no retry).
    timeout_s: float | None = None
    permanent_errors: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0:
            raise ConfigError(f"task type {self.name!r}: concurrency >= 1, max_retries >= 0")


class TaskContext:
    """What a task function gets: its id, Redis, the producer, and ``progress``."""

    def __init__(
        self,
        *,
        task_id: str,
        task_type: str,
        attempt: int,
        store: TaskStore,
        redis: aioredis.Redis,
        keys: Keys,
        producer: Producer,
    ) -> None:
        self.task_id, self.task_type, self.attempt = task_id, task_type, attempt
        self.store, self.redis, self.keys, self.producer = store, redis, keys, producer
        self.log = log.bind(task_id=task_id, task_type=task_type)
        #: Set when the task was cancelled on request (not by a shutdown).
        self.cancel_requested = False

    async def progress(self, fraction: float, **detail: Any) -> None:
        """Record progress (0..1) and details; the client sees them on ``GET``."""
        flag = await self.store.progress(self.task_id, fraction, detail)
        if flag == 1:
            self.cancel_requested = True


async def _watch_cancel(ctx: TaskContext, job: asyncio.Task[Any]) -> None:
    """Wait on the task's cancel list; on a signal, cancel the task."""
    key = ctx.keys.task_cancel(ctx.task_id)
    while not job.done():
        try:
            got = await ctx.redis.blpop([key], timeout=CANCEL_POLL_S)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # Redis down: the task goes on; try again shortly
            ctx.log.warning("cancel_watch_failed", error=str(e))
            await asyncio.sleep(CANCEL_POLL_S)
            continue
        if got:
            ctx.cancel_requested = True
            job.cancel()
            return


def task_concern(
    types: Mapping[str, TaskType],
    *,
    group: str = TASK_GROUP,
    ttl_s: int = 24 * 3600,
    settings: Mapping[str, Any] | None = None,
) -> Concern:
    """The consumer group that runs ``types``."""
    if not types:
        raise ConfigError("task_concern needs at least one task type")
    gates = {name: PriorityGate(t.concurrency) for name, t in types.items()}
    #: One TaskStore per Redis client and key prefix this concern has run tasks with.
    stores: dict[tuple[int, str], TaskStore] = {}

    def store_for(redis: aioredis.Redis, keys: Keys) -> TaskStore:
        k = (id(redis), keys.prefix)
        if k not in stores:
            stores[k] = TaskStore(redis, keys, ttl_s=ttl_s)
        return stores[k]

    async def handle(event: TaskRequested, ctx: Context) -> None:
        store = store_for(ctx.redis, ctx.keys)
        tt = types.get(event.task_type)
        if tt is None:
            if await store.start(event.id) == "run":
                await store.finish(event.id, "failed", error=f"unknown task type {event.task_type}")
            return
        rank = PRIORITIES.index(event.priority) if event.priority in PRIORITIES else 2
        slots = GlobalSlots(ctx.redis, ctx.keys.task_slots(tt.name), tt.concurrency)
        async with (
            gates[tt.name].slot(rank, event.id),
            slots.hold(f"{ctx.consumer}:{event.id}"),
        ):
            verdict = await store.start(event.id)
            if verdict != "run":
                log.info("task_skipped", task_id=event.id, verdict=verdict)
                if verdict == "skip":
                    TASKS_FINISHED.labels(tt.name, "skipped").inc()
                return
            await _run(tt, event, ctx, store)

    async def on_dead_letter(info: DeadLetterInfo) -> None:
        """The engine dead-lettered a task entry: the task ends ``failed`` with the reason."""
        if not info.event_id:
            log.error("task_dead_letter_without_id", entry_id=info.entry_id, reason=info.reason)
            return
        store = store_for(info.redis, info.keys)  # the consumer's own Redis and prefix
        error = f"dead-lettered ({info.reason}): {info.error_type}: {info.detail}"[:2000]
        if await store.fail(info.event_id, error=error):
            TASKS_FINISHED.labels(_task_type_of(info), "failed").inc()
            log.error("task_dead_lettered", task_id=info.event_id, reason=info.reason)
        else:
            log.error("task_dead_letter_unrecorded", task_id=info.event_id, reason=info.reason)

    concurrency = max(8, 2 * sum(t.concurrency for t in types.values()))
    return Concern(
        group=group,
        topics=tuple(c.topic for c in TASK_EVENTS),
        handlers=dict.fromkeys(TASK_EVENTS, handle),
        concurrency=concurrency,
        # Retries are decided per task type in _run; the group's limit only needs to allow them.
        retry=RetryPolicy(max_retries=max(t.max_retries for t in types.values())),
        settings={"batch": 10, "min_idle_ms": 60_000, **(settings or {})},
        on_dead_letter=on_dead_letter,
    )


def _task_type_of(info: DeadLetterInfo) -> str:
    """The task type named in a dead letter's body, or "unknown" (it may not decode)."""
    try:
        body = msgspec.json.decode(info.fields.get(b"data", b"{}"))
    except msgspec.DecodeError:
        return "unknown"
    task_type = body.get("task_type") if isinstance(body, dict) else None
    return task_type if isinstance(task_type, str) and task_type else "unknown"


async def _run(tt: TaskType, event: TaskRequested, ctx: Context, store: TaskStore) -> None:
    task_id = event.id
    try:
        payload = msgspec.convert(event.payload, tt.payload_type)
    except msgspec.ValidationError as e:
        await store.finish(task_id, "failed", error=f"invalid payload: {e}")
        TASKS_FINISHED.labels(tt.name, "failed").inc()
        return
    tctx = TaskContext(
        task_id=task_id,
        task_type=tt.name,
        attempt=ctx.attempt,
        store=store,
        redis=ctx.redis,
        keys=ctx.keys,
        producer=ctx.producer,
    )

    async def call() -> Any:
        async with asyncio.timeout(tt.timeout_s):
            return await tt.run(payload, tctx)

    job = asyncio.create_task(call())
    watcher = asyncio.create_task(_watch_cancel(tctx, job))
    started = time.monotonic()
    try:
        result = await job
        encoded = msgspec.json.encode(result)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if tctx.cancel_requested and not (me and me.cancelling()):
            await store.finish(task_id, "cancelled", error="cancelled on request")
            TASKS_FINISHED.labels(tt.name, "cancelled").inc()
            tctx.log.info("task_cancelled")
            return
        raise  # shutdown: the entry stays pending and the task runs again elsewhere
    except Exception as e:
        error = f"{type(e).__name__}: {e}"[:2000]
        final = isinstance(e, (Permanent, TimeoutError, TypeError, *tt.permanent_errors))
        if final or ctx.attempt >= tt.max_retries:
            await store.finish(task_id, "failed", error=error)
            TASKS_FINISHED.labels(tt.name, "failed").inc()
            tctx.log.error("task_failed", error=error, attempt=ctx.attempt)
            return
        await store.finish(task_id, "queued", error=f"attempt {ctx.attempt + 1}: {error}")
        delay_s = backoff_delay_s(ctx.attempt + 1, tt.retry_base_s, tt.retry_cap_s)
        raise Retry(error, delay_s=delay_s) from e
    finally:
        TASK_SECONDS.labels(tt.name).observe(time.monotonic() - started)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    await store.finish(task_id, "completed", result=encoded, progress="1")
    TASKS_FINISHED.labels(tt.name, "completed").inc()
