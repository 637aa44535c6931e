"""Ingest throughput and latency: one ingest process, a load generator in this process.

    .venv/bin/python benchmarks/ingest_bench.py [--seconds 10] [--single-conns 64]
        [--batch-conns 16] [--batch 100] [--rate-limit]

Starts ``streamproc ingest`` (one process, rate limit off unless ``--rate-limit``) on a free
127.0.0.1 port and drives it over loopback with keep-alive aiohttp connections, closed loop
(each connection sends its next request when the answer came):

1. single events: one JSON object per request;
2. batches: ``--batch`` events per JSON array.

Prints requests/s, events/s and p50/p99/max latency (ms) per scenario. Uses REDIS_URL when set,
otherwise an embedded redis-server (no AOF) in a temp folder; uvloop in both processes. The
load generator shares the machine's cores with the server and Redis: on a small machine it
is part of what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import orjson
import uvloop
from hdrh.histogram import HdrHistogram

from streamproc import Keys, RedisSettings, connect
from streamproc.embedded import EmbeddedRedis, free_port
from streamproc.ingest import AgentStore

ROOT = Path(__file__).resolve().parent.parent


def event(n: int) -> dict[str, Any]:
    return {
        "type": "cluster.spot_interruption",
        "cluster_id": f"bench-{n % 50}",
        "instance_id": f"i-{n:012x}",
        "instance_type": "m5.large",
        "availability_zone": "eu-west-1a",
    }


async def scenario(
    url: str, token: str, *, seconds: float, conns: int, batch: int
) -> dict[str, float]:
    hist = HdrHistogram(1, 60_000_000, 3)  # microseconds
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    body = orjson.dumps(event(1) if batch == 1 else [event(i) for i in range(batch)])
    done = errors = 0
    stop_at = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=conns)

    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal done, errors
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 202:
                        errors += 1
                        continue
                hist.record_value(max(1, int((time.perf_counter() - t0) * 1e6)))
                done += 1

        # warm-up, then the measured run
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - started
    return {
        "requests_per_s": done / elapsed,
        "events_per_s": done * batch / elapsed,
        "p50_ms": hist.get_value_at_percentile(50) / 1000,
        "p99_ms": hist.get_value_at_percentile(99) / 1000,
        "max_ms": hist.get_max_value() / 1000,
        "errors": errors,
    }


async def main(args: argparse.Namespace) -> None:
    tmp = tempfile.TemporaryDirectory(prefix="ingest-bench-")
    server: EmbeddedRedis | None = None
    redis_url = os.environ.get("REDIS_URL", "")
    if not redis_url:
        server = EmbeddedRedis(Path(tmp.name), appendonly=False).start()
        redis_url = server.url
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(RedisSettings(url=redis_url, key_prefix=keys.prefix))
    _, token = await AgentStore(client, keys).add("bench", types=["*"])
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_LEVEL": "warning",
        # --rate-limit: the per-agent bucket runs on every request but never refuses
        "STREAMPROC_INGEST_RATE_EVENTS_PER_S": "1e9" if args.rate_limit else "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", "ingest", "--port", str(port), env=env, cwd=ROOT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as s:
            while True:
                try:
                    async with s.get(base + "/healthz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        url = base + "/v1/events"
        await scenario(url, token, seconds=1, conns=8, batch=1)  # warm-up
        print(
            f"ingest benchmark: one ingest process (pid {proc.pid}), {os.cpu_count()} cores, "
            f"rate limiter {'on' if args.rate_limit else 'off'}"
        )
        for name, conns, batch in (
            ("single events", args.single_conns, 1),
            (f"batches of {args.batch}", args.batch_conns, args.batch),
        ):
            res = await scenario(url, token, seconds=args.seconds, conns=conns, batch=batch)
            print(
                f"{name:<18} conns={conns:<3} {res['requests_per_s']:>9,.0f} req/s "
                f"{res['events_per_s']:>10,.0f} events/s  p50 {res['p50_ms']:.2f} ms  "
                f"p99 {res['p99_ms']:.2f} ms  max {res['max_ms']:.1f} ms  "
                f"errors {res['errors']:.0f}"
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
        async for k in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
            await client.delete(k)
        await client.aclose()
        if server is not None:
            server.stop()
        tmp.cleanup()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--single-conns", type=int, default=64)
    p.add_argument("--batch-conns", type=int, default=16)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument(
        "--rate-limit",
        action="store_true",
        help="keep the per-agent rate limiter on (rate 1e9/s: it costs, never refuses)",
    )
    uvloop.run(main(p.parse_args()))
