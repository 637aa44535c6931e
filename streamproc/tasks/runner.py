"""The task runner: one concern per task queue, reading one stream per priority.

``task_concerns(types, queues=...)`` builds one consumer group per queue (``TaskType.queue``;
``streamproc.tasks.events``), so a runner process runs the queues it is given
(``streamproc tasks --queues crawl,tickets``) and never sees another queue's tasks. Delivery,
acks, reclaim of a crashed runner's tasks and retries are the engine's; this module adds what
tasks need on top:

- **priority**: the group reads the queue's critical stream first, then high, normal, low.
  A task waits for its slots (``QueueSlots``) in a Redis list ordered by (priority, age), so
  across every runner replica the most urgent, then the oldest, task takes a freed slot.
- **concurrency**: per task type (``TaskType.concurrency``) and per queue (``queues[name]``),
  across all runner processes: leases in Redis renewed while the task runs, expiring
  ``SLOT_TTL_S`` after a runner died. ``queues`` is read again as each task starts, so an
  application may change a queue's figure in place after building the concerns (from its
  settings); a type whose own limit is at least its queue's figure at build time has no limit
  of its own and follows the queue's figure.
- **status and progress** in the task's hash (``TaskStore``), kept 24 h; finished tasks go to
  the history and the per-type counts (``TaskHistory``).
- **time limits**: at ``soft_time_limit_s`` the task gets ``SoftTimeLimit`` raised inside it
  (at the ``await`` it waits on), and may catch it to save partial results and return; at
  ``time_limit_s`` it is ended. A ``blocking`` type runs in a child process per attempt
  (``streamproc.tasks.process``): SIGUSR1 raises the soft limit there, SIGKILL ends it. The
  limit reached shows in the status (``time_limit``); ``retry_on_timeout`` says whether a task
  that ran out of time is tried again.
- **retries** per task type: an exception is retried with exponential backoff and jitter from
  ``retry_base_s`` up to ``max_retries`` (status back to ``queued`` with the error);
  ``Permanent``, the type's ``permanent_errors`` and the last retry end it ``failed``. A
  ``Defer`` (a breaker open, a 429) waits without using an attempt.
- **cooperative cancel**: ``DELETE /v1/tasks/{id}`` pushes to the task's cancel list; the
  runner waits on it (BLPOP) beside the task and cancels it; it ends ``cancelled``.
- **load shedding**: above its CPU or memory ceiling a runner starts no new task (it defers
  them to a runner with room) and says so in the runner registry (``streamproc.tasks.runners``).
- **not loaded here**: a task whose type this runner does not have (an older runner beside a
  newer ingest) is deferred, never failed: a runner that has the type takes it.
- **dead letters**: an entry the engine dead-letters itself (poison, undecodable) ends its
  task ``failed`` with the reason (``on_dead_letter``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog

from streamproc._backoff import backoff_delay_s
from streamproc.concern import Concern, Context, DeadLetterInfo, Scope
from streamproc.errors import ConfigError, Defer, Permanent, Retry
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.settings import RetryPolicy
from streamproc.tasks.events import (
    DEFAULT_QUEUE,
    PRIORITIES,
    TaskRequested,
    check_queue,
    task_events,
    task_group,
)
from streamproc.tasks.history import TaskHistory
from streamproc.tasks.metrics import TASK_SECONDS, TASKS_FINISHED
from streamproc.tasks.process import SoftTimeLimit, run_in_process
from streamproc.tasks.runners import (
    HEARTBEAT_S,
    SAMPLE_S,
    LoadLimits,
    LoadMonitor,
    RunnerRegistry,
    runner_info,
)
from streamproc.tasks.slots import QueueSlots, wait_order
from streamproc.tasks.store import TaskStore

__all__ = (
    "TASK_GROUP",
    "SoftTimeLimit",
    "TaskContext",
    "TaskType",
    "queue_of",
    "task_concern",
    "task_concerns",
)

log = structlog.get_logger("streamproc.tasks")

#: The default queue's group.
TASK_GROUP = task_group(DEFAULT_QUEUE)
#: How long one BLPOP on a running task's cancel list waits (under the socket timeout).
CANCEL_POLL_S = 1.0
#: A task this runner does not load, or reads while shedding load, comes back after this.
NOT_LOADED_DELAY_S = 30.0
SHED_DELAY_S = 5.0


@dataclass(frozen=True, kw_only=True)
class TaskType:
    """A kind of task: the function that runs it, its payload type, queue, limits, retries."""

    name: str
    #: ``async fn(payload, ctx) -> result`` (the result must encode as JSON); for a
    #: ``blocking`` type a module-level ``fn(payload) -> result`` run in a child process.
    run: Callable[..., Any]
    #: msgspec type the payload is validated against, at submission and again at run time.
    payload_type: Any = dict
    #: The queue (consumer group) that runs it.
    queue: str = DEFAULT_QUEUE
    #: Tasks of this type running at once, across all runner processes.
    concurrency: int = 1
    max_retries: int = 3
    #: Backoff of the n-th retry: min(cap, base * 2**(n-1)) scaled by U(0.5, 1) (jitter).
    retry_base_s: float = 1.0
    retry_cap_s: float = 60.0
    #: ``SoftTimeLimit`` is raised in the task after this long (None: no soft limit).
    soft_time_limit_s: float | None = None
    #: The task is ended after this long (None: no limit).
    time_limit_s: float | None = None
    #: Is a task that ran out of time (soft limit let out, or hard limit) retried?
    retry_on_timeout: bool = False
    #: ``run`` is blocking code: each attempt runs in a child process the hard limit can kill.
    blocking: bool = False
    permanent_errors: tuple[type[BaseException], ...] = ()

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_retries < 0:
            raise ConfigError(f"task type {self.name!r}: concurrency >= 1, max_retries >= 0")
        check_queue(self.queue)
        for name in ("soft_time_limit_s", "time_limit_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"task type {self.name!r}: {name} must be > 0")
        soft, hard = self.soft_time_limit_s, self.time_limit_s
        if soft is not None and hard is not None and soft >= hard:
            raise ConfigError(f"task type {self.name!r}: soft_time_limit_s must be < time_limit_s")
        if self.blocking and asyncio.iscoroutinefunction(self.run):
            raise ConfigError(f"task type {self.name!r}: a blocking type's run is a plain function")


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
        #: Set when the soft time limit was reached.
        self.soft_limit_reached = False

    async def progress(self, fraction: float, **detail: Any) -> None:
        """Record progress (0..1) and details; the client sees them on ``GET``."""
        flag = await self.store.progress(self.task_id, fraction, detail)
        if flag == 1:
            self.cancel_requested = True


class _SoftLimited:
    """Awaits a coroutine; once ``armed``, the next cancellation thrown into it arrives as
    ``SoftTimeLimit`` instead (and the task's cancel request is withdrawn)."""

    __slots__ = ("_coro", "armed")

    def __init__(self, coro: Any) -> None:
        self._coro, self.armed = coro, False

    def __await__(self) -> Generator[Any, None, Any]:
        return self

    def __iter__(self) -> _SoftLimited:
        return self

    def __next__(self) -> Any:
        return self._coro.send(None)

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        exc = typ if isinstance(typ, BaseException) else (val if val is not None else typ())
        if self.armed and isinstance(exc, asyncio.CancelledError):
            self.armed = False
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            return self._coro.throw(SoftTimeLimit("soft time limit reached"))
        return self._coro.throw(exc)

    def close(self) -> None:
        self._coro.close()


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


def queue_of(types: Mapping[str, TaskType]) -> dict[str, dict[str, TaskType]]:
    """The types by queue."""
    out: dict[str, dict[str, TaskType]] = {}
    for name, t in types.items():
        out.setdefault(t.queue, {})[name] = t
    return out


def task_concerns(
    types: Mapping[str, TaskType],
    *,
    queues: Mapping[str, int | None] | None = None,
    ttl_s: int = 24 * 3600,
    settings: Mapping[str, Any] | None = None,
    limits: LoadLimits | None = None,
) -> tuple[Concern, ...]:
    """One concern per queue the ``types`` use; ``queues[name]``: the queue's concurrency
    across every runner (None or absent: only the types' own limits)."""
    if not types:
        raise ConfigError("task_concerns needs at least one task type")
    by_queue = queue_of(types)
    for q in queues or {}:
        check_queue(q)
        if q not in by_queue:
            raise ConfigError(f"queue {q!r} has a concurrency but no task type")
    monitor = LoadMonitor(limits or LoadLimits())
    return tuple(
        _queue_concern(
            q,
            qtypes,
            queue_limit=(queues or {}).get(q),
            live=queues,
            ttl_s=ttl_s,
            settings=settings,
            monitor=monitor,
        )
        for q, qtypes in sorted(by_queue.items())
    )


def task_concern(
    types: Mapping[str, TaskType],
    *,
    ttl_s: int = 24 * 3600,
    settings: Mapping[str, Any] | None = None,
    queue_limit: int | None = None,
    limits: LoadLimits | None = None,
) -> Concern:
    """The concern of ``types``, which must all be in one queue."""
    by_queue = queue_of(types)
    if len(by_queue) != 1:
        raise ConfigError(
            f"task_concern: the types are in {len(by_queue)} queues ({', '.join(by_queue)}); "
            "use task_concerns"
        )
    [(q, qtypes)] = by_queue.items()
    monitor = LoadMonitor(limits or LoadLimits())
    return _queue_concern(
        q, qtypes, queue_limit=queue_limit, ttl_s=ttl_s, settings=settings, monitor=monitor
    )


@dataclass
class _QueueState:
    """One queue concern's figures in this process, for the runner registry."""

    active: int = 0


def _queue_concern(
    queue: str,
    types: Mapping[str, TaskType],
    *,
    queue_limit: int | None,
    ttl_s: int,
    settings: Mapping[str, Any] | None,
    monitor: LoadMonitor,
    live: Mapping[str, int | None] | None = None,
) -> Concern:
    if queue_limit is not None and queue_limit < 1:
        raise ConfigError(f"queue {queue!r}: concurrency must be >= 1")
    cap = queue_limit or 10**6
    #: Types held by the queue's figure only (their own limit is not below it).
    follow = {n for n, t in types.items() if queue_limit is not None and t.concurrency >= cap}
    state = _QueueState()
    #: One TaskStore per Redis client and key prefix this concern has run tasks with.
    stores: dict[tuple[int, str], tuple[TaskStore, TaskHistory]] = {}

    def store_for(redis: aioredis.Redis, keys: Keys) -> tuple[TaskStore, TaskHistory]:
        k = (id(redis), keys.prefix)
        if k not in stores:
            stores[k] = (
                TaskStore(redis, keys, ttl_s=ttl_s),
                TaskHistory(redis, keys, retention_s=ttl_s),
            )
        return stores[k]

    async def handle(event: TaskRequested, ctx: Context) -> None:
        store, history = store_for(ctx.redis, ctx.keys)
        tt = types.get(event.task_type)
        if tt is None:
            log.warning("task_type_not_loaded", task_id=event.id, task_type=event.task_type)
            raise Defer(f"task type {event.task_type!r} is not loaded", delay_s=NOT_LOADED_DELAY_S)
        if monitor.shedding:
            raise Defer("this runner sheds load (CPU or memory)", delay_s=SHED_DELAY_S)
        rank = PRIORITIES.index(event.priority) if event.priority in PRIORITIES else 2
        created = event.received_at or event.occurred_at
        now_limit = live.get(queue, queue_limit) if live is not None else queue_limit
        slots = QueueSlots(
            ctx.redis,
            ctx.keys,
            queue=queue,
            task_type=tt.name,
            queue_limit=now_limit,
            type_limit=now_limit if now_limit and tt.name in follow else tt.concurrency,
        )
        # Every waiting task is in the queue's waiting list itself (no gate in this process
        # before it): a critical task read here is never stuck behind a low one read earlier.
        async with slots.hold(f"{ctx.consumer}:{event.id}", wait_order(rank, _ms(created))):
            verdict = await store.start(event.id)
            if verdict != "run":
                log.info("task_skipped", task_id=event.id, verdict=verdict)
                if verdict == "skip":
                    TASKS_FINISHED.labels(tt.name, "skipped").inc()
                return
            state.active += 1
            try:
                await _run(tt, event, ctx, store, history)
            finally:
                state.active -= 1

    async def on_dead_letter(info: DeadLetterInfo) -> None:
        """The engine dead-lettered a task entry: the task ends ``failed`` with the reason."""
        if not info.event_id:
            log.error("task_dead_letter_without_id", entry_id=info.entry_id, reason=info.reason)
            return
        store, history = store_for(info.redis, info.keys)  # the consumer's Redis and prefix
        error = f"dead-lettered ({info.reason}): {info.error_type}: {info.detail}"[:2000]
        if await store.fail(info.event_id, error=error):
            task_type = _task_type_of(info)
            TASKS_FINISHED.labels(task_type, "failed").inc()
            await history.record(info.event_id, task_type, "failed", None)
            log.error("task_dead_lettered", task_id=info.event_id, reason=info.reason)
        else:
            log.error("task_dead_letter_unrecorded", task_id=info.event_id, reason=info.reason)

    async def background(scope: Scope) -> None:
        """This runner in the registry, with its load, while it runs."""
        registry = RunnerRegistry(scope.redis, scope.keys)
        info = runner_info(scope.consumer, queue)
        beat_at = 0.0
        try:
            while True:
                monitor.sample()
                now = time.monotonic()
                if now >= beat_at or info.shedding != monitor.shedding:
                    beat_at = now + HEARTBEAT_S
                    info.active, info.shedding = state.active, monitor.shedding
                    info.cpu_percent = round(monitor.cpu_percent, 1)
                    info.memory_percent = round(monitor.memory_percent, 1)
                    try:
                        await registry.beat(info)
                    except Exception as e:  # Redis down: the next beat says it again
                        log.warning("task_runner_beat_failed", error=str(e))
                await asyncio.sleep(SAMPLE_S)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(registry.leave(info.id), 1.0)

    events = task_events(queue)
    concurrency = max(8, 2 * min(cap, sum(t.concurrency for t in types.values())))
    return Concern(
        group=task_group(queue),
        topics=tuple(c.topic for c in events),
        handlers=dict.fromkeys(events, handle),
        concurrency=concurrency,
        # Retries are decided per task type in _run; the group's limit only needs to allow them.
        retry=RetryPolicy(max_retries=max(t.max_retries for t in types.values())),
        settings={"batch": 10, "min_idle_ms": 60_000, **(settings or {})},
        on_dead_letter=on_dead_letter,
        background=background,
    )


def _ms(at: Any) -> int:
    try:
        return int(at.timestamp() * 1000)
    except (AttributeError, OverflowError, ValueError):
        return 0


def _task_type_of(info: DeadLetterInfo) -> str:
    """The task type named in a dead letter's body, or "unknown" (it may not decode)."""
    try:
        body = msgspec.json.decode(info.fields.get(b"data", b"{}"))
    except msgspec.DecodeError:
        return "unknown"
    task_type = body.get("task_type") if isinstance(body, dict) else None
    return task_type if isinstance(task_type, str) and task_type else "unknown"


async def _run(
    tt: TaskType, event: TaskRequested, ctx: Context, store: TaskStore, history: TaskHistory
) -> None:
    task_id = event.id
    try:
        payload = msgspec.convert(event.payload, tt.payload_type)
    except msgspec.ValidationError as e:
        await store.finish(task_id, "failed", error=f"invalid payload: {e}")
        TASKS_FINISHED.labels(tt.name, "failed").inc()
        await history.record(task_id, tt.name, "failed", None)
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
    wrapper: _SoftLimited | None = None

    def soft_reached() -> None:
        tctx.soft_limit_reached = True
        tctx.log.warning("task_soft_time_limit", limit_s=tt.soft_time_limit_s)

    async def call() -> Any:
        nonlocal wrapper
        if tt.blocking:
            return await run_in_process(
                tt.run,
                tt.payload_type,
                event.payload,
                soft_s=tt.soft_time_limit_s,
                hard_s=tt.time_limit_s,
                on_soft=soft_reached,
            )
        wrapper = _SoftLimited(tt.run(payload, tctx))
        async with asyncio.timeout(tt.time_limit_s):
            return await wrapper

    job = asyncio.create_task(call())

    def soft_limit() -> None:
        if job.done() or wrapper is None:
            return
        soft_reached()
        wrapper.armed = True
        job.cancel()

    soft_timer = None
    if tt.soft_time_limit_s is not None and not tt.blocking:
        soft_timer = asyncio.get_running_loop().call_later(tt.soft_time_limit_s, soft_limit)
    watcher = asyncio.create_task(_watch_cancel(tctx, job))
    started = time.monotonic()
    run_s: float | None = None
    try:
        result = await job
        encoded = msgspec.json.encode(result)
    except asyncio.CancelledError:
        me = asyncio.current_task()
        if tctx.cancel_requested and not (me and me.cancelling()):
            run_s = time.monotonic() - started
            await store.finish(task_id, "cancelled", error="cancelled on request")
            TASKS_FINISHED.labels(tt.name, "cancelled").inc()
            await history.record(task_id, tt.name, "cancelled", run_s)
            tctx.log.info("task_cancelled")
            return
        raise  # shutdown: the entry stays pending and the task runs again elsewhere
    except Defer as e:  # a breaker open, a 429: not the task's fault, no attempt used
        run_s = time.monotonic() - started
        await store.finish(task_id, "queued", error=f"waiting: {e}")
        await history.record(task_id, tt.name, None, run_s)
        raise
    except Exception as e:
        run_s = time.monotonic() - started
        limit = _limit_of(e, tctx)
        if limit == "hard":
            error = f"TimeLimit: the hard time limit ({tt.time_limit_s:g} s) was reached"
        elif limit == "soft":
            error = f"SoftTimeLimit: the soft time limit ({tt.soft_time_limit_s:g} s) was reached"
        else:
            error = f"{type(e).__name__}: {e}"[:2000]
        extra = {"time_limit": limit} if limit else {}
        final = isinstance(e, (Permanent, TypeError, *tt.permanent_errors)) or (
            limit is not None and not tt.retry_on_timeout
        )
        if final or ctx.attempt >= tt.max_retries:
            await store.finish(task_id, "failed", error=error, **extra)
            TASKS_FINISHED.labels(tt.name, "failed").inc()
            await history.record(task_id, tt.name, "failed", run_s)
            tctx.log.error("task_failed", error=error, attempt=ctx.attempt)
            return
        await store.finish(task_id, "queued", error=f"attempt {ctx.attempt + 1}: {error}", **extra)
        await history.record(task_id, tt.name, None, run_s)
        delay_s = backoff_delay_s(ctx.attempt + 1, tt.retry_base_s, tt.retry_cap_s)
        raise Retry(error, delay_s=delay_s) from e
    finally:
        if soft_timer is not None:
            soft_timer.cancel()
        TASK_SECONDS.labels(tt.name).observe(time.monotonic() - started)
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    run_s = time.monotonic() - started
    extra = {"time_limit": "soft"} if tctx.soft_limit_reached else {}
    await store.finish(task_id, "completed", result=encoded, progress="1", **extra)
    TASKS_FINISHED.labels(tt.name, "completed").inc()
    await history.record(task_id, tt.name, "completed", run_s)


def _limit_of(e: BaseException, tctx: TaskContext) -> str | None:
    """ "hard", "soft" or None: which time limit ``e`` means."""
    if isinstance(e, TimeoutError):
        return "hard"
    if isinstance(e, SoftTimeLimit):
        return "soft"
    return None
