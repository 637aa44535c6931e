"""The render pool: CPU/GPU-heavy jobs in worker processes, off the event loop.

- **spawn** context (explicit): safe with CUDA and with a running event loop. The parent never
  touches CUDA; GPUs are found with ``nvidia-smi`` (or by asking ``torch`` in a child process).
- **One single-worker ProcessPoolExecutor per slot**: a slot is pinned to one device
  (``CUDA_VISIBLE_DEVICES=<i>`` in its worker, ``""`` for CPU slots), and a hard timeout or a
  crash takes down one worker, not its neighbours' jobs.
- **Backpressure**: at most ``max_queued`` jobs wait for a slot; further callers of ``run()``
  wait for room. Waiting jobs take free slots by priority (higher first), then FIFO.
- **Hard timeout**: a running process-pool call cannot be cancelled, so the slot's worker is
  SIGKILLed and the slot rebuilt; the job raises ``JobTimeout`` (transient: the group's retry
  policy retries it, then dead-letters it). Cancelling ``run()`` (consumer shutdown) does the same.
- **Crash** (``os._exit``, segfault, OOM kill): BrokenProcessPool → the slot is rebuilt, the job
  raises ``WorkerCrashed`` (transient).
- **max_tasks_per_child** recycles workers (leaky native libraries).
- **Progress**: a job calls ``ctx.progress(fraction, message)`` in its worker; it reaches the
  parent over a pipe read by the event loop and goes to the ``on_progress`` callback (the render
  concern publishes it to a stream clients follow), with queued/running/done/failed states.
- Jobs take and return **bytes** (``fn(payload: bytes, ctx: WorkerContext) -> bytes``), ``fn`` a
  module-level function (pickled by reference).
- GPU jobs without a GPU: run on a CPU slot when ``cpu_fallback``; otherwise ``NoGPUError``
  (``Permanent``) at once.

``LoopLagMonitor`` measures how late the event loop wakes up (metric
``streamproc_event_loop_lag_seconds``), the proof that renders do not block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Literal

import msgspec
import structlog
from prometheus_client import Counter, Gauge, Histogram

from streamproc._gate import PriorityGate
from streamproc.errors import ConfigError, Permanent, StreamprocError

__all__ = (
    "Device",
    "Job",
    "JobFailed",
    "JobProgress",
    "JobTimeout",
    "LoopLagMonitor",
    "NoGPUError",
    "OffloadSettings",
    "RenderPool",
    "WorkerContext",
    "WorkerCrashed",
    "detect_gpus",
)

log = structlog.get_logger("streamproc.offload")

Device = Literal["cpu", "gpu"]
_JobState = Literal["queued", "running", "progress", "done", "failed"]

LOOP_LAG = Histogram(
    "streamproc_event_loop_lag_seconds",
    "How late the event loop woke up for a timer",
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0),
)
LOOP_LAG_LAST = Gauge("streamproc_event_loop_lag_last_seconds", "The latest loop lag sample")
JOBS = Counter("streamproc_offload_jobs", "Offloaded jobs by kind and outcome", ["kind", "outcome"])
JOBS_WAITING = Gauge("streamproc_offload_jobs_waiting", "Jobs waiting for a slot")
WORKERS_REBUILT = Counter(
    "streamproc_offload_workers_rebuilt", "Slots rebuilt after a timeout or crash", ["reason"]
)


class JobFailed(StreamprocError):
    """The job raised in its worker (transient: retried per the group's policy)."""


class JobTimeout(JobFailed):
    """The job ran past its timeout; its worker was killed."""


class WorkerCrashed(JobFailed):
    """The job's worker process died (os._exit, signal, OOM kill); the slot was rebuilt."""


class NoGPUError(Permanent):
    """A GPU-only job and no GPU here."""


class OffloadSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Worker processes for CPU jobs (and GPU jobs that fall back to the CPU).
    cpu_workers: int = 2
    #: Worker processes per GPU.
    workers_per_gpu: int = 1
    #: GPU indices to use; None = detect (nvidia-smi, else torch in a child process).
    gpus: tuple[int, ...] | None = None
    #: Jobs waiting for a slot, at most; more callers wait (backpressure).
    max_queued: int = 64
    #: Jobs a worker runs before it is replaced; 0 = never.
    max_tasks_per_child: int = 50

    def __post_init__(self) -> None:
        for name, low, high in (
            ("cpu_workers", 1, 512),
            ("workers_per_gpu", 1, 64),
            ("max_queued", 0, 1_000_000),
            ("max_tasks_per_child", 0, 1_000_000),
        ):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"OffloadSettings.{name} must be {low}..{high}, got {value}")
        if self.gpus is not None and any(not 0 <= g < 1024 for g in self.gpus):
            raise ConfigError(f"OffloadSettings.gpus: GPU indices are 0..1023, got {self.gpus}")


@dataclass(frozen=True, kw_only=True)
class Job:
    """One unit of offloaded work. ``fn`` must be a module-level function (picklable)."""

    fn: Callable[[bytes, WorkerContext], bytes]
    payload: bytes
    job_id: str
    kind: str = "job"
    device: Device = "cpu"
    #: A GPU job that can also run (slower) on the CPU.
    cpu_fallback: bool = True
    #: Higher runs first among waiting jobs.
    priority: int = 0
    timeout_s: float = 300.0


class JobProgress(msgspec.Struct, frozen=True, kw_only=True):
    job_id: str
    kind: str
    state: _JobState
    fraction: float = 0.0
    message: str = ""
    device: str = ""


# ---------------------------------------------------------------------- worker side

_progress_pipe: Connection | None = None
_encoder = msgspec.msgpack.Encoder()


class WorkerContext:
    """What a job sees in its worker: its id, the device it got, a progress reporter."""

    def __init__(self, job_id: str, kind: str, device: str) -> None:
        self.job_id, self.kind = job_id, kind
        #: "cuda" (one GPU visible, as cuda:0) or "cpu".
        self.device = device

    def progress(self, fraction: float, message: str = "") -> None:
        if _progress_pipe is not None:
            msg = JobProgress(
                job_id=self.job_id,
                kind=self.kind,
                state="progress",
                fraction=min(max(fraction, 0.0), 1.0),
                message=message[:500],
                device=self.device,
            )
            _progress_pipe.send_bytes(_encoder.encode(msg))  # small: one atomic write


def _init_worker(env: dict[str, str], pipe: Connection) -> None:
    global _progress_pipe
    os.environ.update(env)  # before any job imports a CUDA library
    _progress_pipe = pipe


def _run_job(
    fn: Callable[[bytes, WorkerContext], bytes], payload: bytes, job_id: str, kind: str, device: str
) -> tuple[int, bytes, str]:
    """In the worker: (0, result, "") | (1, b"", error) transient | (2, b"", error) permanent."""
    try:
        out = fn(payload, WorkerContext(job_id, kind, device))
    except Permanent as e:
        return 2, b"", f"{type(e).__name__}: {e}"
    except Exception as e:
        tb = traceback.format_exc(limit=5)
        return 1, b"", f"{type(e).__name__}: {e}\n{tb}"[:4000]
    if not isinstance(out, bytes | bytearray | memoryview):
        return 2, b"", f"job returned {type(out).__name__}, expected bytes"
    return 0, bytes(out), ""


# ---------------------------------------------------------------------- GPU detection


def detect_gpus(timeout_s: float = 10.0) -> tuple[int, ...]:
    """GPU indices visible to this host, without initialising CUDA in this process.

    ``nvidia-smi`` when installed; otherwise, when torch is importable, asked in a child
    process; otherwise none. Blocking: call it in a thread.
    """
    smi = shutil.which("nvidia-smi")
    try:
        if smi:
            out = subprocess.run(
                [smi, "--query-gpu=index", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=True,
            ).stdout
            return tuple(int(line) for line in out.split() if line.strip().isdigit())
        if importlib.util.find_spec("torch") is not None:
            out = subprocess.run(
                [sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=True,
            ).stdout
            return tuple(range(int(out.strip() or 0)))
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        log.warning("gpu_detection_failed", error=str(e))
    return ()


# ---------------------------------------------------------------------- parent side


class _Slot:
    """One worker process (a single-worker executor) pinned to one device."""

    def __init__(self, name: str, device: Device, env: dict[str, str], pool: RenderPool) -> None:
        self.name, self.device, self.env, self.pool = name, device, env, pool
        self.executor: ProcessPoolExecutor | None = None
        self.reader, self.writer = pool._mp.Pipe(duplex=False)

    def _build(self) -> ProcessPoolExecutor:
        s = self.pool.settings
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=self.pool._mp,
            initializer=_init_worker,
            initargs=(self.env, self.writer),
            max_tasks_per_child=s.max_tasks_per_child or None,
        )

    def kill(self) -> ProcessPoolExecutor | None:
        """SIGKILL the worker now; returns the dead executor (to be joined in a thread)."""
        ex, self.executor = self.executor, None
        if ex is not None:
            # ProcessPoolExecutor has no public way to kill its workers before Python 3.14
            # (Executor.kill_workers); _processes is the documented-by-use workaround.
            for p in list(getattr(ex, "_processes", {}).values()):
                with contextlib.suppress(OSError, ValueError):
                    p.kill()
            ex.shutdown(wait=False, cancel_futures=True)
        return ex

    async def reset(self, reason: str) -> None:
        WORKERS_REBUILT.labels(reason).inc()
        dead = self.kill()
        if dead is not None:
            await asyncio.to_thread(dead.shutdown, wait=True)

    async def submit(self, job: Job, device: str) -> Any:
        for attempt in range(2):
            if self.executor is None:
                self.executor = await asyncio.to_thread(self._build)
            try:
                # submit() may start a process: in a thread, so the loop never waits for it.
                return await asyncio.to_thread(
                    self.executor.submit,
                    _run_job,
                    job.fn,
                    job.payload,
                    job.job_id,
                    job.kind,
                    device,
                )
            except BrokenProcessPool:
                await self.reset("broken")
                if attempt:
                    raise
        raise AssertionError("unreachable")


class RenderPool:
    """Runs Jobs in worker processes; ``await run(job)`` returns the job's bytes."""

    def __init__(
        self,
        settings: OffloadSettings | None = None,
        *,
        on_progress: Callable[[JobProgress], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings or OffloadSettings()
        self.on_progress = on_progress
        self._mp = multiprocessing.get_context("spawn")
        self.gpus: tuple[int, ...] = ()
        self._slots: list[_Slot] = []
        #: One gate per device: free slots go to the highest ``Job.priority``, then FIFO.
        self._gates: dict[Device, PriorityGate[_Slot]] = {
            d: PriorityGate(on_waiting=self._count_waiting) for d in ("cpu", "gpu")
        }
        self._admission: asyncio.Semaphore | None = None
        self._progress_q: asyncio.Queue[JobProgress] = asyncio.Queue(maxsize=10_000)
        self._progress_task: asyncio.Task[None] | None = None
        self.progress_dropped = 0
        self.started = False

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> RenderPool:
        s = self.settings
        self.gpus = s.gpus if s.gpus is not None else await asyncio.to_thread(detect_gpus)
        loop = asyncio.get_running_loop()
        for i in range(s.cpu_workers):
            self._add(_Slot(f"cpu{i}", "cpu", {"CUDA_VISIBLE_DEVICES": ""}, self), loop)
        for g in self.gpus:
            for k in range(s.workers_per_gpu):
                env = {"CUDA_VISIBLE_DEVICES": str(g)}
                self._add(_Slot(f"gpu{g}.{k}", "gpu", env, self), loop)
        self._admission = asyncio.Semaphore(len(self._slots) + s.max_queued)
        self._progress_task = asyncio.create_task(self._deliver_progress())
        self.started = True
        log.info("render_pool_started", cpu_workers=s.cpu_workers, gpus=list(self.gpus))
        return self

    def _add(self, slot: _Slot, loop: asyncio.AbstractEventLoop) -> None:
        self._slots.append(slot)
        self._gates[slot.device].give(slot)
        loop.add_reader(slot.reader.fileno(), self._on_pipe, slot)

    async def close(self) -> None:
        """Stop the workers (running jobs are killed) and the progress delivery."""
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            loop.remove_reader(slot.reader.fileno())
            ex, slot.executor = slot.executor, None
            if ex is not None:
                await asyncio.to_thread(ex.shutdown, wait=True, cancel_futures=True)
            slot.reader.close()
            slot.writer.close()
        self._slots.clear()
        if self._progress_task is not None:
            self._progress_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._progress_task
        self.started = False

    async def __aenter__(self) -> RenderPool:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ running

    def device_for(self, job: Job) -> Device:
        """Where ``job`` runs here; NoGPUError for a GPU-only job without a GPU."""
        if job.device == "gpu" and not self.gpus:
            if not job.cpu_fallback:
                raise NoGPUError(
                    f"job {job.job_id} ({job.kind}) needs a GPU and this host has none "
                    "(no nvidia-smi, or it lists no GPU); it cannot fall back to the CPU"
                )
            return "cpu"
        return job.device

    @property
    def waiting(self) -> int:
        return sum(g.waiting for g in self._gates.values())

    def _count_waiting(self) -> None:
        JOBS_WAITING.set(self.waiting)

    async def run(self, job: Job) -> bytes:
        """Run ``job`` in a worker; wait for room first when the queue is full."""
        if not self.started or self._admission is None:
            raise RuntimeError("RenderPool.run() before start()")
        device = self.device_for(job)
        async with self._admission:
            self._report(job, "queued")
            async with self._gates[device].hold(job.priority) as slot:
                try:
                    out = await self._execute(slot, job)
                except BaseException as e:
                    cancelled = isinstance(e, asyncio.CancelledError)
                    outcome = "cancelled" if cancelled else type(e).__name__
                    JOBS.labels(job.kind, outcome).inc()
                    self._report(job, "failed", slot.name, message=f"{outcome}: {e}"[:500])
                    raise
        JOBS.labels(job.kind, "done").inc()
        self._report(job, "done", slot.name, fraction=1.0)
        return out

    async def _execute(self, slot: _Slot, job: Job) -> bytes:
        device = "cuda" if slot.device == "gpu" else "cpu"
        cf = await slot.submit(job, device)
        self._report(job, "running", slot.name)
        started = time.monotonic()
        try:
            result: tuple[int, bytes, str] = await asyncio.wait_for(
                asyncio.wrap_future(cf), job.timeout_s
            )
        except TimeoutError:
            log.error("job_timeout", job_id=job.job_id, kind=job.kind, timeout_s=job.timeout_s)
            await slot.reset("timeout")
            raise JobTimeout(
                f"job {job.job_id} ({job.kind}) ran past its {job.timeout_s:g}s timeout; "
                "its worker was killed"
            ) from None
        except BrokenProcessPool:
            log.error("worker_crashed", job_id=job.job_id, kind=job.kind, slot=slot.name)
            await slot.reset("crash")
            raise WorkerCrashed(
                f"the worker running job {job.job_id} ({job.kind}) died after "
                f"{time.monotonic() - started:.1f}s; the worker was replaced"
            ) from None
        except asyncio.CancelledError:
            dead = slot.kill()  # a running call cannot be cancelled: kill it
            if dead is not None:
                await asyncio.shield(asyncio.to_thread(dead.shutdown, wait=True))
            raise
        status, out, error = result
        if status == 2:
            raise Permanent(f"job {job.job_id} ({job.kind}) failed permanently: {error}")
        if status:
            raise JobFailed(f"job {job.job_id} ({job.kind}) failed: {error}")
        return out

    # ------------------------------------------------------------------ progress

    def _report(self, job: Job, state: _JobState, device: str = "", **detail: Any) -> None:
        """Emit a state of ``job`` (``detail``: ``fraction``, ``message``)."""
        self._emit(
            JobProgress(job_id=job.job_id, kind=job.kind, state=state, device=device, **detail)
        )

    def _emit(self, p: JobProgress) -> None:
        if self.on_progress is None:
            return
        try:
            self._progress_q.put_nowait(p)
        except asyncio.QueueFull:
            self.progress_dropped += 1  # progress is advisory: never block a job on it

    def _on_pipe(self, slot: _Slot) -> None:
        decoder = msgspec.msgpack.Decoder(JobProgress)
        try:
            while slot.reader.poll():
                self._emit(decoder.decode(slot.reader.recv_bytes()))
        except (EOFError, OSError, msgspec.DecodeError) as e:
            log.warning("progress_pipe_error", slot=slot.name, error=str(e))

    async def _deliver_progress(self) -> None:
        while True:
            p = await self._progress_q.get()
            if self.on_progress is None:
                continue
            try:
                await self.on_progress(p)
            except Exception as e:
                log.warning("progress_delivery_failed", job_id=p.job_id, error=str(e))


class LoopLagMonitor:
    """Samples how late the event loop runs a timer (exported as a metric)."""

    def __init__(self, interval_s: float = 0.01, keep: int = 100_000) -> None:
        self.interval_s = interval_s
        self.samples_s: deque[float] = deque(maxlen=keep)

    async def run(self) -> None:
        while True:
            # perf_counter, not loop.time(): uvloop's clock has millisecond resolution.
            start = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            lag = max(0.0, time.perf_counter() - start - self.interval_s)
            self.samples_s.append(lag)
            LOOP_LAG.observe(lag)
            LOOP_LAG_LAST.set(lag)

    def percentile_s(self, q: float) -> float:
        if not self.samples_s:
            return 0.0
        ordered = sorted(self.samples_s)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
