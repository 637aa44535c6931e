"""The render concern (group ``renders``): report and frame renders in the render pool.

Reads ``ticks`` (weekly-report tick -> a ``render.requested`` for the report, with an id derived
from the tick's, so a tick handled twice asks once) and ``renders`` (run the job). Each job
runs in ``streamproc.offload.RenderPool`` with its kind's priority, concurrency, device and
timeout (WORKLOADS §1/§3, table ``RENDER_TYPES``); the artefacts go to a local folder or S3
(``media.store``, shared with the media jobs);
then ``report.ready`` / ``render.done`` carries their location. Progress goes to the stream of
topic ``render-progress`` (``redis-cli XREAD BLOCK 0 STREAMS <p>:{render-progress}:stream $``).

A timeout or crashed worker is a transient error (retried with backoff, then dead-lettered); a
GPU-only job on a host without GPU, or bad input, is permanent (dead-lettered at once).
Configure with ``configure(RenderSettings(...))`` before consuming, or from the environment
(``streamproc consume`` reads ``STREAMPROC_RENDER_<FIELD>``: ``STORE``, ``S3_ENDPOINT_URL``,
``S3_REGION``, and the pool's ``POOL_CPU_WORKERS``, ``POOL_WORKERS_PER_GPU``, ``POOL_GPUS``
(``0,1``; empty = none; unset = detect), ``POOL_MAX_QUEUED``, ``POOL_MAX_TASKS_PER_CHILD``).
Defaults: local folder ``artefacts/``, 2 CPU workers, GPUs detected.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec

from consumers.render_jobs import (
    DayMetrics,
    FrameInput,
    ReportInput,
    frame_job,
    report_job,
    unpack_files,
)
from media.store import LocalStore, S3Store, Store, open_store
from schemas.metrics import daily_key
from schemas.renders import RenderDone, RenderProgress, RenderRequested, ReportReady
from schemas.ticks import WeeklyReportTick
from streamproc.concern import Concern, Context
from streamproc.event import derived_id as _derived_id
from streamproc.offload import (
    Device,
    Job,
    JobProgress,
    LoopLagMonitor,
    OffloadSettings,
    RenderPool,
    WorkerContext,
)
from streamproc.settings import RetryPolicy

__all__ = (
    "CONCERN",
    "RENDER_TYPES",
    "LocalStore",
    "RenderSettings",
    "RenderType",
    "S3Store",
    "Store",
    "configure",
    "derived_id",
    "runtime",
)

_NS = uuid.UUID("2f0c5b7e-61a4-4d3f-8e0b-9a7c1d2e3f40")
#: Progress entries kept per stream (MAXLEN ~).
PROGRESS_MAXLEN = 10_000


def derived_id(cause_id: str, what: str) -> str:
    """The engine's ``derived_id`` in this module's namespace (ids stored so far stay valid)."""
    return _derived_id(cause_id, what, namespace=_NS)


@dataclass(frozen=True)
class RenderType:
    fn: Callable[[bytes, WorkerContext], bytes]
    priority: int
    concurrency: int
    device: Device
    cpu_fallback: bool
    timeout_s: float


#: WORKLOADS §3 render (10, 2, GPU, 1 h), preview (5, 4, 5 min); §1 weekly report (2 parallel).
RENDER_TYPES: dict[str, RenderType] = {
    "render": RenderType(frame_job, 10, 2, "gpu", cpu_fallback=True, timeout_s=3600),
    "preview": RenderType(frame_job, 5, 4, "gpu", cpu_fallback=True, timeout_s=300),
    "report": RenderType(report_job, 3, 2, "cpu", cpu_fallback=True, timeout_s=600),
}


class RenderSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: ``s3://bucket/prefix`` or a folder (``file://`` optional).
    store: str = "artefacts"
    #: S3 endpoint (moto, MinIO); empty = AWS.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    pool: OffloadSettings = msgspec.field(default_factory=OffloadSettings)
    #: Metrics hash per day: ``<p>:{metrics:<YYYY-MM-DD>}:daily`` (field -> number,
    #: ``schemas.metrics.daily_key``; this name replaces ``metrics`` in the tag).
    metrics_state: str = "metrics"


def make_store(s: RenderSettings) -> Store:
    return open_store(s.store, endpoint_url=s.s3_endpoint_url, region=s.s3_region)


class _Runtime:
    """The pool, store and per-kind limits of this process (started on first use)."""

    def __init__(self, settings: RenderSettings) -> None:
        self.settings = settings
        self.pool: RenderPool | None = None
        self.store: Store = make_store(settings)
        self.limits = {k: asyncio.Semaphore(t.concurrency) for k, t in RENDER_TYPES.items()}
        self.lag = LoopLagMonitor()
        self._lag_task: asyncio.Task[None] | None = None
        self._starting = asyncio.Lock()
        self._ctx: Context | None = None

    async def ensure_pool(self, ctx: Context) -> RenderPool:
        self._ctx = ctx  # progress is written with the latest context's client
        async with self._starting:
            if self.pool is None:
                pool = RenderPool(self.settings.pool, on_progress=self._progress)
                self.pool = await pool.start()
                self._lag_task = asyncio.create_task(self.lag.run())
        return self.pool

    async def _progress(self, p: JobProgress) -> None:
        ctx = self._ctx
        if ctx is None:
            return
        event = RenderProgress(
            key=p.job_id,
            source="renders",
            job_id=p.job_id,
            kind=p.kind,
            state=p.state,
            fraction=p.fraction,
            message=p.message,
        )
        fields: Any = ctx.producer.codec.encode(event)
        await ctx.redis.xadd(
            ctx.keys.stream(RenderProgress.topic), fields, maxlen=PROGRESS_MAXLEN, approximate=True
        )

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


_runtime: _Runtime | None = None


def runtime() -> _Runtime:
    global _runtime
    if _runtime is None:
        _runtime = _Runtime(RenderSettings())
    return _runtime


def use_settings(settings: RenderSettings) -> None:
    """Set this process's render settings before the pool starts (the CLI, from the env)."""
    global _runtime
    if _runtime is not None and _runtime.pool is not None:
        raise RuntimeError("the render pool is running: use `await configure(...)`")
    _runtime = _Runtime(settings)


async def configure(settings: RenderSettings) -> None:
    """Replace this process's render settings (closing a pool already started)."""
    global _runtime
    if _runtime is not None:
        await _runtime.close()
    _runtime = _Runtime(settings)


# ---------------------------------------------------------------------- handlers


async def on_weekly_report_tick(tick: WeeklyReportTick, ctx: Context) -> None:
    await ctx.producer.publish(
        RenderRequested(
            id=derived_id(tick.id, "report"),
            key="weekly-report",
            source="renders",
            kind="report",
            period_end=tick.scheduled_for,
            period_days=7,
            cause_id=tick.id,
        )
    )


async def _daily_metrics(ctx: Context, name: str, start: datetime, days: int) -> list[DayMetrics]:
    out = []
    for i in range(days):
        day = (start + timedelta(days=i)).strftime("%Y-%m-%d")
        raw: dict[Any, Any] = await ctx.redis.hgetall(daily_key(ctx.keys, day, name))
        values = {}
        for k, v in raw.items():
            with contextlib.suppress(ValueError):
                values[k.decode()] = float(v)
        out.append(DayMetrics(day=day, values=values))
    return out


async def on_render_requested(req: RenderRequested, ctx: Context) -> None:
    rt = runtime()
    kind = RENDER_TYPES[req.kind]
    if req.kind == "report":
        end = req.period_end or req.occurred_at
        start = end - timedelta(days=req.period_days)
        days = await _daily_metrics(ctx, rt.settings.metrics_state, start, req.period_days)
        payload = msgspec.msgpack.encode(
            ReportInput(title="Weekly report", period_start=start, period_end=end, days=days)
        )
    else:
        payload = msgspec.msgpack.encode(
            FrameInput(width=req.width, height=req.height, frames=req.frames, seed=req.seed)
        )
    job = Job(
        fn=kind.fn,
        payload=payload,
        job_id=req.id,
        kind=req.kind,
        device=kind.device,
        cpu_fallback=kind.cpu_fallback,
        priority=kind.priority,
        timeout_s=kind.timeout_s,
    )
    async with rt.limits[req.kind]:
        pool = await rt.ensure_pool(ctx)
        files = unpack_files(await pool.run(job))
    locations = {}
    for name, data in sorted(files.items()):
        key = ctx.keys.render_artefact(req.kind, req.id, name)
        locations[name] = await asyncio.to_thread(rt.store.put, key, data)
    if req.kind == "report":
        await ctx.producer.publish(
            ReportReady(
                id=derived_id(req.id, "ready"),
                key=req.key,
                source="renders",
                job_id=req.id,
                location=locations["index.html"],
                files=list(locations.values()),
                period_start=start,
                period_end=end,
                cause_id=req.cause_id or req.id,
            )
        )
    else:
        backend = files.get("backend.txt", b"numpy").decode()
        first = next(v for k, v in sorted(locations.items()) if k.endswith(".png"))
        await ctx.producer.publish(
            RenderDone(
                id=derived_id(req.id, "done"),
                key=req.key,
                source="renders",
                job_id=req.id,
                kind=req.kind,
                location=first,
                device=backend,
                cause_id=req.cause_id or req.id,
            )
        )


CONCERN = Concern(
    group="renders",
    topics=("ticks", "renders"),
    handlers={WeeklyReportTick: on_weekly_report_tick, RenderRequested: on_render_requested},
    concurrency=sum(t.concurrency for t in RENDER_TYPES.values()),
    retry=RetryPolicy(max_retries=3, base_s=2.0, cap_s=60.0),
    # Renders run long: the consumer's heartbeat renews them; reclaim only after 2 min silence.
    settings={"min_idle_ms": 120_000},
)
