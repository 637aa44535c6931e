"""Runtime schedules: 100,000 entity schedules fired by one ticker leader (issue 14).

    .venv/bin/python benchmarks/runtime_schedules.py [--schedules 100000] [--every 5]
        [--seconds 30] [--json FILE]

Target (issue 14): 100,000 schedules at 5-minute intervals (~333 fires/s) with fire lateness
p99 < 1 s and O(due) work per step. The accelerated run puts the same 100,000 schedules at
``--every`` seconds (5 s: 20,000 fires/s, 60x the target rate) for ``--seconds``.

Steps: an embedded redis-server (no AOF) in a temp folder (or REDIS_URL); ``Scheduler.add``
for every schedule (pipelined), the Redis memory before and after (bytes per schedule); then
the real ``Ticker.run()`` leader in this process for the run. Figures: ticks fired per
second, lateness (publish time minus scheduled time) p50/p99/max of every tick, the ticker's
CPU (this process's CPU time over the run's wall time) and Redis's (INFO used_cpu_*). A
consumer is not part of it: the tick stream is trimmed every second instead (XTRIM MAXLEN
~ 10,000) so memory stays flat.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import uvloop

from streamproc import Codec, Keys, Producer, RedisSettings, connect
from streamproc.codec import Registry
from streamproc.embedded import EmbeddedRedis
from streamproc.schedule import Tick
from streamproc.scheduler import _ADD, _ENCODER, _Planned, build_def
from streamproc.ticker import Ticker, TickerSettings


class PollTick(Tick, frozen=True, kw_only=True, tag="tick.bench_poll"):
    topic: ClassVar[str] = "bench-ticks"


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def redis_cpu(client: Any) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = Keys("bench")
    client = connect(RedisSettings(url=url, key_prefix="bench"))
    codec: Codec[Any] = Codec(Registry([Tick, PollTick]))
    await client.flushdb()
    base = int((await client.info("memory"))["used_memory"])
    started = time.perf_counter()
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    await client.script_load(_ADD.source)
    for lo in range(0, args.schedules, 2_000):
        async with client.pipeline(transaction=False) as p:
            for i in range(lo, min(lo + 2_000, args.schedules)):
                name = f"worker.w{i:06}"
                d = build_def(name, event=PollTick, every_spec=args.every, cron_spec=None,
                              tz="UTC", key=f"w{i:06}", missed="latest", grace_s=30.0,
                              catch_up_max=10, spread=True)  # fmt: skip
                nxt = _Planned(d).trigger.next_after(now)
                _ADD.queue(p, [keys.ticker_defs(), keys.ticker_due()],
                           [name, _ENCODER.encode(d), int(nxt.timestamp() * 1000)])  # fmt: skip
            await p.execute()
    add_s = time.perf_counter() - started
    used = int((await client.info("memory"))["used_memory"])
    per_schedule = (used - base) / args.schedules

    ticker = Ticker(
        (),
        client=client,
        producer=Producer(client, codec, keys),
        keys=keys,
        settings=TickerSettings(node="bench", lease_ttl_ms=10_000),
    )
    ticker.stats.lateness_ms = deque(maxlen=None)
    stream = keys.stream(PollTick.topic)

    async def trim() -> None:
        while True:
            await asyncio.sleep(1)
            await client.xtrim(stream, maxlen=10_000, approximate=True)

    trimmer = asyncio.create_task(trim())
    run = asyncio.create_task(ticker.run())
    # Warm-up: the lease, and the times that passed while the schedules were being added
    # (fired late, at once) are left out of the figures.
    await asyncio.sleep(1.0)
    warm_until = time.monotonic() + 60
    while time.monotonic() < warm_until and await client.zcount(  # noqa: ASYNC110
        keys.ticker_due(), "-inf", int(time.time() * 1000) - 200
    ):
        await asyncio.sleep(0.2)
    await asyncio.sleep(1.0)
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    fired0, cpu0, rcpu0 = ticker.stats.fired, time.process_time(), await redis_cpu(client)
    ticker.stats.lateness_ms.clear()
    t0 = time.perf_counter()
    await asyncio.sleep(args.seconds)
    wall = time.perf_counter() - t0
    fired = ticker.stats.fired - fired0
    cpu = time.process_time() - cpu0
    rcpu = await redis_cpu(client) - rcpu0
    late = list(ticker.stats.lateness_ms)
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    ticker.stop()
    await run
    trimmer.cancel()
    remaining = await client.zcount(keys.ticker_due(), "-inf", int(time.time() * 1000) - 1000)
    await client.aclose()
    return {
        "schedules": args.schedules,
        "every_s": args.every,
        "seconds": round(wall, 1),
        "add_s": round(add_s, 2),
        "redis_bytes_per_schedule": round(per_schedule),
        "fired": fired,
        "fires_per_s": round(fired / wall),
        "expected_per_s": round(args.schedules / args.every),
        "lateness_ms_p50": round(pct(late, 0.50), 2),
        "lateness_ms_p99": round(pct(late, 0.99), 2),
        "lateness_ms_max": round(max(late, default=float("nan")), 2),
        "ticker_cpu_pct": round(100 * cpu / wall, 1),
        "redis_cpu_pct": round(100 * rcpu / wall, 1),
        "overdue_at_end": int(remaining),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--schedules", type=int, default=100_000)
    ap.add_argument("--every", type=float, default=5.0, help="interval of every schedule (s)")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--profile", help="write a cProfile of the measured run to this file")
    args = ap.parse_args()
    server = None
    url = os.environ.get("REDIS_URL")
    tmp = tempfile.TemporaryDirectory()
    if not url:
        server = EmbeddedRedis(Path(tmp.name), appendonly=False).start()
        url = server.url
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            out = runner.run(bench(url, args))
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    for k, v in out.items():
        print(f"{k:<28} {v}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
