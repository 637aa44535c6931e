"""The ``worker-monitor`` concern: worker lifecycle events and one poll per tick.

- ``worker.created`` / ``worker.imported``: register the worker (``registry``), then add its
  job (``jobs.start``; idempotent, so a redelivery repairs a crash in between).
- ``worker.terminated``: remove the job, delete the record and its keys, tombstone the id.
- ``tick.worker_poll`` (``key`` = worker id): under the worker's poll lease, EC2
  DescribeInstanceStatus, then (running) CloudWatch CPU and memory averaged over the interval;
  publish ``worker.metrics``, ``worker.status_changed`` when the state moved, and an alert or
  recovery ``Notification`` when a threshold episode opens or closes; then write the record.
  A missing worker removes its own job; an instance EC2 reports terminated (or no longer knows,
  after ``NOT_FOUND_GRACE_S``) ends the worker like ``worker.terminated``.

Every published id is derived from the tick id, and the record is written after publishing:
a tick handled again (a crash before the ack) decides the same from the same record and its
events are dropped as duplicates, or it finds the record already written and decides nothing.
The record write is a script that writes only while the worker exists (not ``ctx.effect``: a
poll finishing after a termination must not bring back part of the record).

AWS failures (CallTransient, BreakerOpen, CallPermanent) are logged, counted in the record
(``consecutive_failures``, ``last_error``) and the tick is acked: the next interval polls again.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Any, NamedTuple

import structlog
from prometheus_client import Counter, Histogram

from schemas.notify import Notification, fit
from schemas.workers import (
    WORKER_ID_RE,
    WorkerCreated,
    WorkerImported,
    WorkerMetrics,
    WorkerPollTick,
    WorkerStatusChanged,
    WorkerTerminated,
)
from streamproc.breaker import BreakerOpen
from streamproc.concern import Concern, Context
from streamproc.connection import REDIS_DOWN
from streamproc.event import Event, derived_id, utcnow
from streamproc.outbound import CallPermanent, CallTransient
from streamproc.settings import RetryPolicy
from streamproc.trim import trim_stream
from workers import _aws, jobs
from workers._runtime import Runtime, runtime
from workers.registry import Worker, WorkerStore

__all__ = ("CONCERN", "NOT_FOUND_GRACE_S", "Alert", "alerts", "status_of")

log = structlog.get_logger("workers.monitor")

_NS = uuid.UUID("5d0c2e8b-7f41-4a36-b9d2-1e6a8c4f0b73")

#: EC2 may not list an instance launched moments ago: "not found" ends a worker only after
#: it has been registered this long.
NOT_FOUND_GRACE_S = 300

POLLS = Counter(
    "streamproc_worker_polls", "Worker poll ticks, by outcome", ["outcome"]
)  # ok, failed_transient, failed_permanent, missing, busy, disabled, terminated
POLL_SECONDS = Histogram(
    "streamproc_worker_poll_seconds",
    "Time to poll one worker (AWS calls included)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
LIFECYCLE = Counter(
    "streamproc_worker_lifecycle", "worker.created/imported/terminated outcomes", ["outcome"]
)
ALERTS = Counter("streamproc_worker_alerts", "Threshold episodes opened/closed", ["metric", "kind"])

_STATUS = {
    "pending": "pending",
    "running": "running",
    "stopping": "stopping",
    "stopped": "stopped",
    "shutting-down": "terminating",
    "terminated": "terminated",
}


def status_of(ec2_state: str) -> str:
    """The worker status of an EC2 state name (``not-found`` is ``terminated``)."""
    if ec2_state == _aws.NOT_FOUND:
        return "terminated"
    return _STATUS.get(ec2_state, "unknown")


class Alert(NamedTuple):
    metric: str  # "cpu" or "memory"
    opened: bool  # True: an episode starts; False: it ends
    value: float | None
    threshold: float


def alerts(
    w: Worker,
    status: str,
    cpu: float | None,
    memory: float | None,
    *,
    cpu_threshold: float,
    memory_threshold: float,
    margin: float,
) -> list[Alert]:
    """The episodes this poll opens or closes. Opens: above the threshold while none is open.
    Closes: below ``threshold - margin``, or the instance no longer runs. No data: no change."""
    out = []
    for metric, value, threshold, state in (
        ("cpu", cpu, cpu_threshold, w.alert_cpu),
        ("memory", memory, memory_threshold, w.alert_memory),
    ):
        if state == "alert":
            if status != "running" or (value is not None and value < threshold - margin):
                out.append(Alert(metric, False, value, threshold))
        elif status == "running" and value is not None and value > threshold:
            out.append(Alert(metric, True, value, threshold))
    return out


def _notification(rt: Runtime, tick: WorkerPollTick, w: Worker, a: Alert, status: str) -> Event:
    label = "CPU" if a.metric == "cpu" else "memory"
    who = f"worker {w.id}" + (f" ({w.name})" if w.name and w.name != w.id else "")
    where = f"instance {w.instance_id} in {w.region}" + (
        f", account {w.account_id}" if w.account_id else ""
    )
    if a.opened:
        title = f"{who}: {label} {a.value:.1f}% above {a.threshold:g}%"
        body = f"{where}: {label} averaged {a.value:.1f}% over the last {w.interval_s} s."
    elif a.value is None:
        title = f"{who}: {label} alert over (instance {status})"
        body = f"{where} is {status}; the {label} alert opened at {_since(w, a.metric)} is closed."
    else:
        title = f"{who}: {label} back to {a.value:.1f}%"
        body = (
            f"{where}: {label} is below {a.threshold - rt.settings.recovery_margin:g}% again "
            f"(alert opened at {_since(w, a.metric)})."
        )
    kind = "alert" if a.opened else "recovery"
    return fit(
        Notification(
            id=derived_id(tick.id, f"worker/{w.id}/{a.metric}/{kind}", namespace=_NS),
            source="worker-monitor",
            key=w.id,
            cluster_id=rt.settings.alert_cluster_id,
            severity="warning" if a.opened else "info",
            title=title,
            body=body,
            cause_id=tick.id,
        )
    )


def _since(w: Worker, metric: str) -> str:
    return (w.alert_cpu_since if metric == "cpu" else w.alert_memory_since) or "an unknown time"


# ---------------------------------------------------------------------- lifecycle


async def register(event: WorkerCreated | WorkerImported, ctx: Context) -> None:
    rt = runtime()
    store = WorkerStore(ctx.redis, ctx.keys)
    interval = event.interval_s or rt.settings.interval_s
    now = utcnow()
    outcome = await store.register(
        event,
        interval_s=interval,
        now_ms=int(now.timestamp() * 1000),
        now_iso=now.isoformat(timespec="seconds"),
    )
    LIFECYCLE.labels(outcome).inc()
    where = {"worker_id": event.worker_id, "instance_id": event.instance_id, "outcome": outcome}
    if outcome in ("tombstoned", "taken", "conflict"):
        reason = {
            "tombstoned": "the worker id was terminated within 7 days",
            "taken": "another worker monitors this instance",
            "conflict": "the worker id exists for another instance",
        }[outcome]
        log.warning("worker_refused", reason=reason, **where)
        return
    if outcome == "exists":  # imported again: the worker's own interval counts
        w = await store.get(event.worker_id)
        interval = w.interval_s if w is not None else interval
    if not rt.settings.enabled:
        log.info(
            "worker_registered_unmonitored", reason="STREAMPROC_WORKERS_ENABLED=false", **where
        )
        return
    added = await jobs.start(ctx.redis, ctx.keys, event.worker_id, interval)
    log.info("worker_registered", interval_s=interval, job_changed=added, **where)


async def terminate(event: WorkerTerminated, ctx: Context) -> None:
    await _end(ctx, event.worker_id, why=event.reason or "worker.terminated")


async def _end(ctx: Context, worker_id: str, *, why: str) -> None:
    store = WorkerStore(ctx.redis, ctx.keys)
    had_job = await jobs.stop(ctx.redis, ctx.keys, worker_id)
    existed = await store.terminate(worker_id, now_ms=int(utcnow().timestamp() * 1000))
    LIFECYCLE.labels("terminated" if existed else "terminated_unknown").inc()
    log.info("worker_terminated", worker_id=worker_id, existed=existed, had_job=had_job, why=why)


# ---------------------------------------------------------------------- polls


async def poll(tick: WorkerPollTick, ctx: Context) -> None:
    rt = runtime()
    worker_id = tick.key
    if not rt.settings.enabled:
        POLLS.labels("disabled").inc()
        return
    if not WORKER_ID_RE.fullmatch(worker_id):
        POLLS.labels("invalid").inc()
        log.warning("worker_poll_invalid_key", key=worker_id[:80], schedule=tick.schedule[:140])
        return
    store = WorkerStore(ctx.redis, ctx.keys)
    w = await store.get(worker_id)
    if w is None:
        POLLS.labels("missing").inc()
        removed = await jobs.stop(ctx.redis, ctx.keys, worker_id)
        log.info("worker_missing_job_stopped", worker_id=worker_id, removed=removed)
        return
    s = rt.aws_settings
    token = await store.lease(
        worker_id, int(2 * (s.connect_timeout_s + s.read_timeout_s) + 10) * 1000
    )
    if token is None:  # the previous poll still runs (slow AWS): this one is skipped
        POLLS.labels("busy").inc()
        log.info("worker_poll_skipped", worker_id=worker_id, reason="a poll is running")
        return
    try:
        with POLL_SECONDS.time():
            outcome = await _poll(rt, ctx, tick, store, w)
    finally:
        await store.release(worker_id, token)
    POLLS.labels(outcome).inc()
    await _keep_events_bounded(rt, ctx)


async def _keep_events_bounded(rt: Runtime, ctx: Context) -> None:
    """At most every 10 s per process: ``worker-events`` has no group in this repository,
    so nothing trims it; an outside reader's groups are waited for (safe trimming), and
    past ``events_maxlen`` entries it is cut (``XTRIM MAXLEN ~``) whoever reads it."""
    now = time.monotonic()
    if now < rt.events_trim_at:
        return
    rt.events_trim_at = now + 10.0
    stream = ctx.keys.stream(WorkerMetrics.topic)
    try:
        await trim_stream(ctx.redis, stream)
        await ctx.redis.xtrim(stream, maxlen=rt.settings.events_maxlen, approximate=True)
    except REDIS_DOWN as e:  # the poll is done; the next trim is in 10 s
        log.warning("worker_events_trim_failed", error=str(e))


async def _poll(
    rt: Runtime, ctx: Context, tick: WorkerPollTick, store: WorkerStore, w: Worker
) -> str:
    now = utcnow()
    stamp = now.isoformat(timespec="seconds")
    try:
        state = await rt.aws.call(
            ctx.redis,
            ctx.keys,
            w.account_id,
            "ec2",
            w.region,
            lambda c: _aws.instance_state(c, w.instance_id),
        )
        cpu = memory = None
        if state == "running":
            cpu, memory = await rt.aws.call(
                ctx.redis,
                ctx.keys,
                w.account_id,
                "cloudwatch",
                w.region,
                lambda c: _aws.usage(c, w.instance_id, window_s=w.interval_s, now=now),
            )
    except (CallTransient, BreakerOpen, CallPermanent) as e:
        kind = "failed_permanent" if isinstance(e, CallPermanent) else "failed_transient"
        failures = await store.polled(
            w.id, False, {"last_error": str(e)[:500], "last_error_at": stamp}
        )
        log.warning(
            "worker_poll_failed",
            worker_id=w.id,
            kind=kind,
            error_type=type(e).__name__,
            error=str(e)[:300],
            consecutive_failures=failures,
        )
        return kind
    if state == _aws.NOT_FOUND and _age_s(w, now) < NOT_FOUND_GRACE_S:
        await store.polled(
            w.id,
            False,
            {"last_error": "EC2 does not know the instance (yet)", "last_error_at": stamp},
        )
        return "not_found_yet"
    status = status_of(state)
    events: list[Event] = []
    if status != w.status:
        events.append(
            WorkerStatusChanged(
                id=derived_id(tick.id, f"worker/{w.id}/status", namespace=_NS),
                source="worker-monitor",
                key=w.id,
                worker_id=w.id,
                instance_id=w.instance_id,
                before=w.status,  # type: ignore[arg-type]
                after=status,  # type: ignore[arg-type]
                cause_id=tick.id,
            )
        )
    events.append(
        WorkerMetrics(
            id=derived_id(tick.id, f"worker/{w.id}/metrics", namespace=_NS),
            source="worker-monitor",
            key=w.id,
            worker_id=w.id,
            name=w.name,
            instance_id=w.instance_id,
            region=w.region,
            account_id=w.account_id,
            status=status,  # type: ignore[arg-type]
            cpu=cpu,
            memory=memory,
            polled_at=now,
            cause_id=tick.id,
        )
    )
    s = rt.settings
    found = alerts(
        w,
        status,
        cpu,
        memory,
        cpu_threshold=w.cpu_threshold or s.cpu_threshold,
        memory_threshold=w.memory_threshold or s.memory_threshold,
        margin=s.recovery_margin,
    )
    events += [_notification(rt, tick, w, a, status) for a in found]
    await ctx.producer.publish_many(events)
    for a in found:
        ALERTS.labels(a.metric, "opened" if a.opened else "closed").inc()
        (log.warning if a.opened else log.info)(
            "worker_alert_opened" if a.opened else "worker_alert_closed",
            worker_id=w.id,
            metric=a.metric,
            value=a.value,
            threshold=a.threshold,
        )
    if status == "terminated":
        await _end(ctx, w.id, why=f"EC2 reports the instance {state}")
        return "terminated"
    values: dict[str, Any] = {
        "status": status,
        "cpu": cpu,
        "memory": memory,
        "last_polled_at": stamp,
        "last_error": "",
    }
    if status != w.status:
        values["status_changed_at"] = stamp
    if cpu is not None or memory is not None:
        values["last_activity_at"] = stamp
    for a in found:
        values[f"alert_{a.metric}"] = "alert" if a.opened else "ok"
        values[f"alert_{a.metric}_since"] = stamp if a.opened else ""
    await store.polled(w.id, True, values)
    if status != w.status:
        log.info("worker_status_changed", worker_id=w.id, before=w.status, after=status)
    return "ok"


def _age_s(w: Worker, now: datetime) -> float:
    try:
        return (now - datetime.fromisoformat(w.created_at)).total_seconds()
    except ValueError:
        return float("inf")


CONCERN = Concern(
    group="worker-monitor",
    topics=("workers", "worker-ticks"),
    handlers={
        WorkerCreated: register,
        WorkerImported: register,
        WorkerTerminated: terminate,
        WorkerPollTick: poll,
    },
    # Polls wait on AWS (two calls, ~50-500 ms): 32 at once per process; per-worker order
    # does not matter (the poll lease keeps one poll of a worker at a time).
    concurrency=32,
    # Redis trouble only (AWS failures are acked): a poll tick is not worth many retries,
    # the next interval polls again; lifecycle events get the same few.
    retry=RetryPolicy(max_retries=3, base_s=1.0, cap_s=30.0),
    # Ticks are unique entries (deterministic ids, one per scheduled time): no dedup marker.
    settings={"dedup_window_ms": 0},
)

CONCERNS: tuple[Concern, ...] = (CONCERN,)
