"""No-op task throughput and submit→start latency: the task API vs the seed-003 worker node.

    .venv/bin/python benchmarks/task_throughput.py [--seconds 10] [--conns 16]
        [--rates 8,200] [--drain-s 10] [--systems ...] [--json FILE]

Issue 16. Systems, each started fresh for every phase (new processes; a new key prefix on one
embedded redis-server without AOF, or REDIS_URL):

- ``seed003``: ``benchmarks/seed003_worker.py``, the seed's FastAPI worker rebuilt from its
  code listing, served by uvicorn (one process, uvloop + httptools, access log off), as
  written: its loop takes one task per 0.1 s.
- ``seed003-no-idle-sleep``: the same, sleeping only when its queue is empty (its best case).
- ``v1-tasks``: ``POST /v1/tasks`` on ``streamproc ingest`` (one process) and one
  ``streamproc consume tasks`` runner process, the no-op type ``bench.noop`` (concurrency 4,
  as the seed's ``ThreadPoolExecutor(max_workers=4)``); the application is ``app`` below.
- ``task-submit``: the same processes, ``POST /task/submit`` with the seed's body (the compat
  routes, ``streamproc.ingest.compat``).

Phases, each system in turn (interleaved, so a change in the machine's load hits all):

1. **saturation**: ``--conns`` keep-alive connections submit closed-loop for ``--seconds``;
   figures: submissions accepted per second, and tasks *finished* per second inside that
   window (the processing rate while fed faster than it can run).
2. **paced**, for each rate of ``--rates``: open-loop submissions at that rate for
   ``--seconds``, then up to ``--drain-s`` for the rest to run; submit→start p50/p99/max
   (HdrHistogram): from the client's clock before it sends the POST to the task's
   ``started_at`` (the seed: its dict's microsecond stamp; streamproc: the task hash's
   millisecond stamp, so its figures are up to 1 ms early, clamped at 0). A system that did
   not start every task by the end of the drain is marked overloaded.

Redis: commands processed (INFO, those run inside Lua scripts included) and connections
opened per accepted task, streamproc side only.

CPU: user + system seconds of the system's own processes (and Redis's, from INFO) from the
start of a phase to the end of its drain, per accepted submission. Compare as ratios within
one run: the machine is shared. The load generator runs in this process and shares the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from streamproc.app import App
from streamproc.codec import Registry
from streamproc.tasks import TASK_EVENTS, LoadLimits, TaskContext, TaskType, task_concerns

if TYPE_CHECKING:
    pass

ROOT = Path(__file__).resolve().parent.parent
NOOP = "bench.noop"


async def noop(payload: dict[str, Any], ctx: TaskContext) -> None:
    """The benchmark's task: nothing (the seed's ``execute_task`` is a no-op too)."""


TASK_TYPES = {NOOP: TaskType(name=NOOP, run=noop, concurrency=4, max_retries=0)}


#: The application of the streamproc side: ``--app benchmarks.task_throughput:app``.
def _no_shedding() -> LoadLimits:
    """Ceilings of 100 % (never shed): the benchmark saturates the cores on purpose, and the
    seed has no load shedding."""
    return LoadLimits(max_cpu_percent=100, max_memory_percent=100)


app = App(
    registry=Registry(list(TASK_EVENTS)),
    concerns=task_concerns(TASK_TYPES, limits=_no_shedding()),
    task_types=TASK_TYPES,
)

SEED_BODY = {"payload": {"function": NOOP, "args": [], "kwargs": {}}, "priority": "normal"}


def _parse_ts(raw: str | None) -> float | None:
    """Epoch seconds of an ISO stamp; naive ones (the seed's ``utcnow()``) are UTC."""
    if not raw:
        return None
    dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class Sent:
    task_id: str
    sent_at: float


@dataclass
class PhaseResult:
    system: str
    phase: str
    seconds: float
    submitted: int = 0
    errors: int = 0
    started: int = 0
    finished_in_window: int = 0
    finished: int = 0
    latency: dict[str, float] = field(default_factory=dict)
    cpu_s: float = 0.0
    #: CPU seconds per process of the system (uvicorn; ingest, runner, redis).
    cpu_parts: dict[str, float] = field(default_factory=dict)
    #: Redis commands and new connections over the phase (streamproc only), from INFO.
    redis_counts: dict[str, int] = field(default_factory=dict)
    overloaded: bool = False

    @property
    def submit_per_s(self) -> float:
        return self.submitted / self.seconds

    @property
    def done_per_s(self) -> float:
        return self.finished_in_window / self.seconds

    @property
    def cpu_ms_per_task(self) -> float:
        """CPU per accepted submission (a no-op's run costs little beside its submission; a
        system that leaves most tasks queued is not charged for running them)."""
        return 1000 * self.cpu_s / self.submitted if self.submitted else float("nan")


class System:
    """One side of the comparison: start, submit, read back what each task did, stop."""

    name = ""
    submit_path = ""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.base = ""
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        self.procs: list[asyncio.subprocess.Process] = []
        self.roles: list[str] = []

    def body(self, n: int) -> bytes:
        raise NotImplementedError

    def task_id(self, answer: dict[str, Any]) -> str:
        return str(answer["task_id"])

    async def start(self, session: Any) -> None:
        raise NotImplementedError

    async def times(self, session: Any, ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        """task id → (started_at, finished_at) epoch seconds, for the tasks that ran."""
        raise NotImplementedError

    async def idle(self, session: Any) -> bool:
        raise NotImplementedError

    async def redis_counts(self) -> dict[str, int]:
        return {}

    async def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each of the system's processes, by role."""
        from streamproc.bench._proc import cpu_s

        return {name: cpu_s(p.pid) for name, p in zip(self.roles, self.procs, strict=True)}

    async def stop(self) -> None:
        for p in self.procs:
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 15)
            except TimeoutError:
                p.kill()
                await p.wait()
        self.procs.clear()
        self.roles.clear()


async def _wait_http(session: Any, url: str, proc: asyncio.subprocess.Process) -> None:
    import aiohttp

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"{url}: the server exited ({proc.returncode})")
        with contextlib.suppress(aiohttp.ClientConnectionError):
            async with session.get(url) as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within 30 s")


class Seed003(System):
    def __init__(self, env: dict[str, str], variant: str) -> None:
        super().__init__(env)
        self.variant = variant
        self.name = "seed003" if variant == "as-written" else f"seed003-{variant}"

    def body(self, n: int) -> bytes:
        import orjson

        return orjson.dumps(SEED_BODY)

    async def start(self, session: Any) -> None:
        from streamproc.embedded import free_port

        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "uvicorn", "benchmarks.seed003_worker:app"),
            *("--host", "127.0.0.1", "--port", str(port), "--no-access-log"),
            *("--log-level", "warning", "--loop", "uvloop", "--http", "httptools"),
            env={**self.env, "SEED003_VARIANT": self.variant},
            cwd=ROOT,
        )
        self.procs.append(proc)
        self.roles.append("uvicorn")
        self.base = f"http://127.0.0.1:{port}"
        await _wait_http(session, self.base + "/metrics", proc)

    async def times(self, session: Any, ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        sem = asyncio.Semaphore(16)

        async def one(task_id: str) -> None:
            async with sem, session.get(f"{self.base}/task/{task_id}") as r:
                view = await r.json()
            started, done = _parse_ts(view["started_at"]), _parse_ts(view["completed_at"])
            if started is not None:
                out[task_id] = (started, done if done is not None else float("inf"))

        await asyncio.gather(*(one(t) for t in ids))
        return out

    async def idle(self, session: Any) -> bool:
        async with session.get(self.base + "/metrics") as r:
            m = await r.json()
        return int(m["tasks_queued"]) == 0


class Streamproc(System):
    def __init__(self, env: dict[str, str], client: Any, *, compat: bool) -> None:
        super().__init__(env)
        self.client, self.compat = client, compat
        self.name = "task-submit" if compat else "v1-tasks"
        self.keys: Any = None

    def body(self, n: int) -> bytes:
        import orjson

        if self.compat:
            return orjson.dumps(SEED_BODY)
        return orjson.dumps({"type": NOOP, "payload": {}, "priority": "normal"})

    def task_id(self, answer: dict[str, Any]) -> str:
        return str(answer["task_id"] if self.compat else answer["id"])

    async def start(self, session: Any) -> None:
        from streamproc import Keys
        from streamproc.embedded import free_port
        from streamproc.ingest import AgentStore

        self.keys = Keys(f"tb{uuid.uuid4().hex[:8]}")
        _, token = await AgentStore(self.client, self.keys).add("bench", operator=True)
        self.headers["Authorization"] = f"Bearer {token}"
        port = free_port()
        env = {**self.env, "STREAMPROC_PREFIX": self.keys.prefix}
        cli = (sys.executable, "-m", "streamproc", "--app", "benchmarks.task_throughput:app")
        ingest = await asyncio.create_subprocess_exec(
            *cli, "ingest", "--port", str(port), env=env, cwd=ROOT
        )
        self.procs.append(ingest)
        self.roles.append("ingest")
        runner = await asyncio.create_subprocess_exec(
            *cli, "consume", "tasks", env={**env, "STREAMPROC_CONSUMER": "bench-runner"}, cwd=ROOT
        )
        self.procs.append(runner)
        self.roles.append("runner")
        self.base = f"http://127.0.0.1:{port}"
        await _wait_http(session, self.base + "/healthz", ingest)
        # The runner is up when its group exists on every priority stream.
        from streamproc.groups import group_info

        deadline = time.monotonic() + 30
        while True:
            streams = [self.keys.stream(t.topic) for t in TASK_EVENTS]
            infos = [await group_info(self.client, s, "tasks") for s in streams]
            if all(i is not None and i.consumers for i in infos):
                break
            if time.monotonic() > deadline or runner.returncode is not None:
                raise RuntimeError("the task runner did not start")
            await asyncio.sleep(0.1)

    async def times(self, session: Any, ids: Sequence[str]) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for i in range(0, len(ids), 1000):
            chunk = ids[i : i + 1000]
            async with self.client.pipeline(transaction=False) as pipe:
                for t in chunk:
                    pipe.hmget(self.keys.task(t), "started_at", "finished_at")
                rows = await pipe.execute()
            for t, (s, f) in zip(chunk, rows, strict=True):
                started = _parse_ts(s.decode() if s else None)
                done = _parse_ts(f.decode() if f else None)
                if started is not None:
                    out[t] = (started, done if done is not None else float("inf"))
        return out

    async def idle(self, session: Any) -> bool:
        from streamproc.groups import group_info

        for t in TASK_EVENTS:
            info = await group_info(self.client, self.keys.stream(t.topic), "tasks")
            if info is None or (info.lag or 0) or info.pending:
                return False
        return True

    async def redis_counts(self) -> dict[str, int]:
        info: dict[str, Any] = await self.client.info("stats")
        return {
            "commands": int(info["total_commands_processed"]),
            "connections": int(info["total_connections_received"]),
        }

    async def cpu_s(self) -> dict[str, float]:
        from streamproc.bench._proc import redis_cpu_s

        return {**await super().cpu_s(), "redis": await redis_cpu_s(self.client)}

    async def stop(self) -> None:
        await super().stop()
        if self.keys is not None:
            async for k in self.client.scan_iter(match=f"{self.keys.prefix}:*", count=1000):
                await self.client.delete(k)


async def _post(session: Any, sys_: System, n: int, sent: list[Sent], res: PhaseResult) -> None:
    t0 = time.time()
    try:
        async with session.post(
            sys_.base + sys_.submit_path, data=sys_.body(n), headers=sys_.headers
        ) as r:
            answer = await r.json(content_type=None)
            ok = r.status in (200, 202)
    except Exception:
        ok, answer = False, None
    if not ok:
        res.errors += 1
        if res.errors == 1:
            print(f"  {sys_.name}: first error: {answer}", file=sys.stderr)
        return
    res.submitted += 1
    sent.append(Sent(sys_.task_id(answer), t0))


async def run_phase(
    sys_: System, phase: str, args: argparse.Namespace, rate: float | None
) -> PhaseResult:
    import aiohttp

    from streamproc.bench._hist import new_histogram, record_s, summary

    res = PhaseResult(sys_.name, phase, args.seconds)
    sent: list[Sent] = []
    connector = aiohttp.TCPConnector(limit=max(args.conns, 64))
    async with aiohttp.ClientSession(connector=connector) as session:
        await sys_.start(session)
        try:
            cpu0 = await sys_.cpu_s()
            counts0 = await sys_.redis_counts()
            t_start = time.time()
            stop_at = t_start + args.seconds
            if rate is None:

                async def closed_loop() -> None:
                    n = 0
                    while time.time() < stop_at:
                        await _post(session, sys_, n, sent, res)
                        n += 1

                await asyncio.gather(*(closed_loop() for _ in range(args.conns)))
            else:
                pending: set[asyncio.Task[None]] = set()
                n, interval = 0, 1.0 / rate
                while (due := t_start + n * interval) < stop_at:
                    await asyncio.sleep(max(0.0, due - time.time()))
                    t = asyncio.create_task(_post(session, sys_, n, sent, res))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                    n += 1
                if pending:
                    await asyncio.gather(*pending)
            t_end = time.time()
            res.seconds = t_end - t_start
            drain_until = time.monotonic() + args.drain_s
            while not await sys_.idle(session) and time.monotonic() < drain_until:  # noqa: ASYNC110 - another process's queue: nothing to wait on but polling
                await asyncio.sleep(0.2)
            cpu1 = await sys_.cpu_s()  # before reading the tasks back
            res.cpu_parts = {k: cpu1[k] - cpu0.get(k, 0.0) for k in cpu1}
            res.cpu_s = sum(res.cpu_parts.values())
            counts1 = await sys_.redis_counts()
            res.redis_counts = {k: v - counts0[k] for k, v in counts1.items()}
            times = await sys_.times(session, [s.task_id for s in sent])
        finally:
            await sys_.stop()
    hist = new_histogram()
    for s in sent:
        got = times.get(s.task_id)
        if got is None:
            continue
        res.started += 1
        record_s(hist, max(0.0, got[0] - s.sent_at))
        if got[1] != float("inf"):
            res.finished += 1
            if got[1] <= t_end:
                res.finished_in_window += 1
    res.latency = summary(hist)
    res.overloaded = res.started < res.submitted
    return res


def _parts(r: PhaseResult) -> str:
    n = r.submitted or 1
    out = " ".join(f"{k} {1000 * v / n:.2f}" for k, v in r.cpu_parts.items())
    if r.redis_counts:  # the benchmark's own INFO calls are a handful per phase
        c = r.redis_counts
        out += (
            f"; Redis per task: {c['commands'] / n:.1f} commands (those inside scripts "
            f"included), {c['connections'] / n:.2f} new connections"
        )
    return out


def _print(r: PhaseResult) -> None:
    lat = r.latency
    print(
        f"  {r.system:<24} submitted {r.submit_per_s:>8,.0f}/s  finished {r.done_per_s:>8,.1f}/s"
        f"  submit→start p50 {lat.get('p50_ms', 0):>9.1f} ms  p99 {lat.get('p99_ms', 0):>9.1f} ms"
        f"  max {lat.get('max_ms', 0):>9.1f} ms  CPU {r.cpu_ms_per_task:>6.2f} ms/task"
        f" ({_parts(r)})  started {r.started}/{r.submitted}"
        + (f"  errors {r.errors}" if r.errors else "")
        + ("  OVERLOADED" if r.overloaded else ""),
        flush=True,
    )


async def main(args: argparse.Namespace) -> int:
    from streamproc import RedisSettings, connect
    from streamproc.embedded import EmbeddedRedis

    tmp = tempfile.TemporaryDirectory(prefix="task-bench-")
    server: EmbeddedRedis | None = None
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        server = EmbeddedRedis(Path(tmp.name), appendonly=False).start()
        redis_url = server.url
    client = connect(RedisSettings(url=redis_url))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_LOG_LEVEL": "warning",
        "PYTHONPATH": str(ROOT),
    }
    systems: list[System] = []
    for name in args.systems:
        if name == "seed003":
            systems.append(Seed003(env, "as-written"))
        elif name == "seed003-no-idle-sleep":
            systems.append(Seed003(env, "no-idle-sleep"))
        elif name == "v1-tasks":
            systems.append(Streamproc(env, client, compat=False))
        elif name == "task-submit":
            systems.append(Streamproc(env, client, compat=True))
    for s in systems:
        s.submit_path = "/v1/tasks" if s.name == "v1-tasks" else "/task/submit"
    print(
        f"task throughput: {os.cpu_count()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{args.seconds:g} s per phase, systems: {', '.join(s.name for s in systems)}",
        flush=True,
    )
    results: list[PhaseResult] = []
    phases: list[tuple[str, float | None]] = [(f"saturation ({args.conns} conns)", None)]
    phases += [(f"paced {r:g}/s", r) for r in args.rates]
    try:
        for phase, rate in phases:
            print(phase, flush=True)
            for s in systems:
                r = await run_phase(s, phase, args, rate)
                _print(r)
                results.append(r)
    finally:
        await client.aclose()
        if server is not None:
            server.stop()
        tmp.cleanup()
    print("ratios (streamproc side / seed003 side, same phase):")
    for phase, _ in phases:
        by = {r.system: r for r in results if r.phase == phase}
        for ours in ("v1-tasks", "task-submit"):
            for base in ("seed003", "seed003-no-idle-sleep"):
                a, b = by.get(ours), by.get(base)
                if a is None or b is None:
                    continue
                p50 = a.latency.get("p50_ms", 0) / (b.latency.get("p50_ms", 0) or float("nan"))
                p99 = a.latency.get("p99_ms", 0) / (b.latency.get("p99_ms", 0) or float("nan"))
                print(
                    f"  {phase:<22} {ours} / {base}: finished/s x{a.done_per_s / b.done_per_s:.2f}"
                    f"  submitted/s x{a.submit_per_s / b.submit_per_s:.2f}"
                    f"  p50 x{p50:.3f}  p99 x{p99:.3f}"
                    f"  CPU/task x{a.cpu_ms_per_task / b.cpu_ms_per_task:.2f}"
                )
    if args.json:
        rows = [
            {**r.__dict__, "submit_per_s": r.submit_per_s, "done_per_s": r.done_per_s}
            for r in results
        ]
        await asyncio.to_thread(Path(args.json).write_text, json.dumps(rows, indent=1))
    return 0


def _rates(raw: str) -> list[float]:
    return [float(x) for x in raw.split(",") if x.strip()]


def _systems(raw: str) -> list[str]:
    known = ("seed003", "seed003-no-idle-sleep", "v1-tasks", "task-submit")
    names = [x.strip() for x in raw.split(",") if x.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown system(s) {bad}; known: {', '.join(known)}")
    return names


if __name__ == "__main__":
    import uvloop

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="per phase")
    p.add_argument("--conns", type=int, default=16, help="closed-loop connections (saturation)")
    p.add_argument("--rates", type=_rates, default=[8.0, 200.0], help="paced rates, tasks/s")
    p.add_argument("--drain-s", type=float, default=10.0, help="wait for the rest to run")
    p.add_argument(
        "--systems",
        type=_systems,
        default=["seed003", "seed003-no-idle-sleep", "v1-tasks", "task-submit"],
    )
    p.add_argument("--json", help="write the figures to this file")
    sys.exit(uvloop.run(main(p.parse_args())))
