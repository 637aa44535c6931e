"""Runs one scenario: consumer processes, an optional ingest process, the load generator.

Each run gets a fresh key prefix (deleted afterwards). Sinks start first and report ``ready``;
the load generator then sends its schedule; when it is done the runner waits for the group to
drain (lag + pending = 0), stops the sinks and merges their histograms. CPU (from /proc) and
RSS of every child and Redis' used_memory are sampled throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis

from streamproc.bench import _hist, _proc
from streamproc.bench.events import APP_SPEC, GROUP, BenchEvent
from streamproc.bench.loadgen import LoadSpec
from streamproc.bench.sink import SinkSpec
from streamproc.errors import StreamprocError
from streamproc.groups import group_info
from streamproc.keys import Keys

__all__ = ("BenchError", "Run", "run_once")


class BenchError(StreamprocError):
    """A scenario could not run (a child failed, the group did not drain)."""


@dataclass(kw_only=True)
class Run:
    """One load run's parameters (a scenario, or one step of a ramp / scaling scenario)."""

    redis_url: str
    work_dir: Path
    via: str = "producer"
    rate_per_s: float = 1000.0
    duration_s: float = 1.0
    warmup_s: float = 0.0
    events: int = 0
    event_bytes: int = 256
    batch: int = 100
    consumers: int = 1
    concurrency: int = 10
    dedup_window_ms: int = 86_400_000
    trim_interval_ms: int = 30_000
    drain_timeout_s: float = 60.0
    render_every: int = 0
    render_ms: float = 20.0
    render_workers: int = 1
    sample_every_s: float = 0.5
    redis_pid: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _child_env() -> dict[str, str]:
    return {**os.environ, "STREAMPROC_LOG_LEVEL": "warning", "STREAMPROC_LOG_JSON": "1"}


async def _spawn(module: str, spec: msgspec.Struct) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        msgspec.json.encode(spec).decode(),
        stdout=asyncio.subprocess.PIPE,
        env=_child_env(),
    )


async def _stop(proc: asyncio.subprocess.Process, timeout_s: float = 30.0) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _start_ingest(
    r: Run, client: aioredis.Redis, keys: Keys
) -> tuple[asyncio.subprocess.Process, str, str]:
    import aiohttp

    from streamproc.embedded import free_port
    from streamproc.ingest import AgentStore

    _, token = await AgentStore(client, keys).add("bench", types=[BenchEvent.type_name()])
    port = free_port()
    env = {
        **_child_env(),
        "REDIS_URL": r.redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_INGEST_RATE_EVENTS_PER_S": "0",
        "STREAMPROC_DEDUP_WINDOW_MS": str(r.dedup_window_ms),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamproc",
        "--app",
        APP_SPEC,
        "ingest",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    async with aiohttp.ClientSession() as s:
        while True:
            if proc.returncode is not None or time.monotonic() > deadline:
                await _stop(proc)
                raise BenchError(f"ingest did not come up on {base}")
            with contextlib.suppress(aiohttp.ClientError):
                async with s.get(base + "/healthz") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.1)
    return proc, base + "/v1/events", token


async def _backlog(client: aioredis.Redis, stream: str) -> int:
    g = await group_info(client, stream, GROUP)
    return 0 if g is None else (g.lag or 0) + g.pending


async def _cleanup(client: aioredis.Redis, prefix: str) -> None:
    async for k in client.scan_iter(match=f"{prefix}:*", count=10_000):
        await client.unlink(k)


async def run_once(r: Run, client: aioredis.Redis) -> dict[str, Any]:
    """Run the load once; return latency summaries, throughput, accounting and resources."""
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    stream = keys.stream(BenchEvent.topic)
    tag = keys.prefix
    await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    procs: dict[str, asyncio.subprocess.Process] = {}
    sink_results: list[Path] = []
    try:
        ingest_url = token = ""
        if r.via == "http":
            procs["ingest"], ingest_url, token = await _start_ingest(r, client, keys)
        for n in range(r.consumers):
            path = r.work_dir / f"{tag}-sink{n}.json"
            sink_results.append(path)
            procs[f"consumer{n}"] = await _spawn(
                "streamproc.bench.sink",
                SinkSpec(
                    redis_url=r.redis_url,
                    prefix=keys.prefix,
                    result_path=str(path),
                    consumer=f"c{n}",
                    batch=r.batch,
                    concurrency=r.concurrency,
                    dedup_window_ms=r.dedup_window_ms,
                    trim_interval_ms=r.trim_interval_ms,
                    render_every=r.render_every,
                    render_ms=r.render_ms,
                    render_workers=r.render_workers,
                ),
            )
        for name, p in procs.items():
            if name.startswith("consumer"):
                assert p.stdout is not None
                line = await asyncio.wait_for(p.stdout.readline(), 60)
                if line.strip() != b"ready":
                    raise BenchError(f"{name} did not start (exit {p.returncode})")
        load_path = r.work_dir / f"{tag}-load.json"
        pids = {name: p.pid for name, p in procs.items()}
        if r.redis_pid:
            pids["redis"] = r.redis_pid
        cpu0 = {name: _proc.cpu_s(pid) for name, pid in pids.items()}
        redis_cpu0 = await _proc.redis_cpu_s(client)
        mem0 = await _proc.redis_memory(client)
        t0 = time.monotonic()
        load = await _spawn(
            "streamproc.bench.loadgen",
            LoadSpec(
                redis_url=r.redis_url,
                prefix=keys.prefix,
                result_path=str(load_path),
                via="http" if r.via == "http" else "producer",
                rate_per_s=r.rate_per_s,
                duration_s=r.duration_s,
                warmup_s=r.warmup_s,
                events=r.events,
                event_bytes=r.event_bytes,
                batch=r.batch,
                dedup_window_ms=r.dedup_window_ms,
                ingest_url=ingest_url,
                token=token,
            ),
        )
        procs["loadgen"] = load
        pids["loadgen"] = load.pid
        cpu0["loadgen"] = 0.0
        samples: list[dict[str, float]] = []
        peak_rss: dict[str, int] = {}
        load_cpu = 0.0

        async def sample() -> None:
            nonlocal load_cpu
            row: dict[str, float] = {"t_s": time.monotonic() - t0}
            for name, pid in pids.items():
                rss = _proc.rss_bytes(pid)
                if rss:
                    row[f"rss_{name}"] = rss
                    peak_rss[name] = max(peak_rss.get(name, 0), rss)
            load_cpu = max(load_cpu, _proc.cpu_s(load.pid))
            row["redis_used_memory"] = await _proc.redis_memory(client)
            samples.append(row)

        while load.returncode is None:
            await sample()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(r.sample_every_s):  # not wait_for: see _aio
                    await load.wait()
        if load.returncode:
            raise BenchError(f"load generator failed (exit {load.returncode})")
        deadline = time.monotonic() + r.drain_timeout_s
        drained = False
        while time.monotonic() < deadline:
            dead = [n for n, p in procs.items() if n != "loadgen" and p.returncode is not None]
            if dead:
                raise BenchError(f"{', '.join(dead)} exited during the run")
            if await _backlog(client, stream) == 0:
                drained = True
                break
            await sample()
            await asyncio.sleep(0.05)
        wall_s = time.monotonic() - t0
        cpu = {name: _proc.cpu_s(pid) - cpu0[name] for name, pid in pids.items()}
        cpu["loadgen"] = load_cpu
        cpu["redis (INFO)"] = await _proc.redis_cpu_s(client) - redis_cpu0
        mem1 = await _proc.redis_memory(client)
        for name in list(procs):
            await _stop(procs[name])
        for name, p in procs.items():
            if name.startswith("consumer") and p.returncode not in (0, None):
                raise BenchError(f"{name} failed (exit {p.returncode})")
        load_res: dict[str, Any] = orjson.loads(load_path.read_bytes())
        sinks: list[dict[str, Any]] = [orjson.loads(p.read_bytes()) for p in sink_results]
    finally:
        for p in procs.values():
            await _stop(p, 10)
        await _cleanup(client, keys.prefix)
        for path in r.work_dir.glob(f"{tag}-*.json"):
            path.unlink()
    start = _hist.merge([s["start"] for s in sinks])
    from_send = _hist.merge([s.get("start_from_send", "") for s in sinks])
    ack = _hist.merge([s["ack"] for s in sinks])
    acked = sum(s["acked"] for s in sinks)
    handled = sum(s["handled"] for s in sinks)
    last_ack = max((s["last_ack_s"] for s in sinks), default=0.0)
    span_s = max(1e-9, last_ack - load_res["first_intended_s"])
    return {
        "offered": load_res["offered"],
        "sent": load_res["sent"],
        "send_errors": load_res["errors"],
        "handled": handled,
        "acked": acked,
        "lost": load_res["offered"] - acked,
        "drained": drained,
        "throughput_per_s": acked / span_s if acked else 0.0,
        "publish_per_s": load_res["sent"]
        / max(1e-9, load_res["end_s"] - load_res["first_intended_s"]),
        "latency_start": _hist.summary(start),
        "latency_start_from_send": _hist.summary(from_send),
        "latency_ack": _hist.summary(ack),
        "send_lag": _hist.summary(_hist.merge([load_res["send_lag"]])),
        "publish_latency": _hist.summary(_hist.merge([load_res["publish"]])),
        "curve_start": _hist.curve(start),
        "loop_lag_p99_ms": max((s["loop_lag_p99_ms"] for s in sinks), default=0.0),
        "loop_lag_max_ms": max((s["loop_lag_max_ms"] for s in sinks), default=0.0),
        "renders": sum(s["renders"] for s in sinks),
        "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
        "wall_s": round(wall_s, 3),
        "peak_rss_bytes": peak_rss,
        "redis_used_memory": {"before": mem0, "after": mem1},
        "samples": samples,
        "consumer_stats": [s["stats"] for s in sinks],
    }
