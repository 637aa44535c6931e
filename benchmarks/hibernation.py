"""Hibernation: evaluating 10,000 cluster schedules per tick (issue 13; target: within 1 s).

    .venv/bin/python benchmarks/hibernation.py [--clusters 10000] [--ticks 20] [--json FILE]

Writes ``--clusters`` schedules (five whole-hour zones, with and without DST, four week
patterns), and for every cluster that should be asleep at the first tick a complete sleep
record, so that no tick changes anything: no AWS call is made (the AWS client here refuses
every call, and the run fails if one is tried). Then it publishes ``--ticks`` hibernation
ticks one minute apart (minutes 1..N of one hour: no slot or pre-warm boundary is crossed) and
drives the real ``hibernation`` concern with ``Consumer.process_once``, timing each:

- ``tick_ms``: publish excluded; read, decode, handle (one pipeline of reads, the decision for
  every cluster, savings of the sleeping ones) and settle with its effects;
- the first tick decodes the schedules (cold), the others reuse them (the version is unchanged);
- ``decide_ms``: the pure decision alone, for the same schedules.

Uses REDIS_URL when set, otherwise an embedded redis-server in a temp folder; uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec
import uvloop

from schemas import REGISTRY
from schemas.ticks import HibernationTick
from spot._schedule import Slots, apply_rules, new_schedule, wants_sleep
from spot.aws import Aws, AwsSettings
from spot.hibernation_concern import CONCERN, Runtime, decide, use
from spot.hibernation_store import AsgSizes, HibernationKeys, SleepRecord
from streamproc import (
    Codec,
    ConsumerSettings,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.consumer import Consumer
from streamproc.embedded import EmbeddedRedis
from streamproc.schedule import tick_id

ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo", "Australia/Sydney")
PATTERNS: tuple[tuple[list[str], list[str]], ...] = (
    (["mon-fri 20-08", "sat-sun 0-24"], []),
    (["daily 19-07"], []),
    (["daily 0-24"], ["mon-fri 9-18"]),
    (["sat,sun 0-24"], []),
)


class NoAws(Aws):
    """Refuses every call: the benchmark must not change anything."""

    calls = 0

    async def call(self, *args: Any, **kw: Any) -> Any:
        NoAws.calls += 1
        raise RuntimeError("the benchmark made an AWS call")


async def bench(url: str, args: argparse.Namespace) -> dict[str, Any]:
    keys = Keys(f"bench{uuid.uuid4().hex[:8]}")
    client = connect(RedisSettings(url=url, key_prefix=keys.prefix))
    codec: Codec[Any] = Codec(REGISTRY)
    producer = Producer(client, codec, keys, ProducerSettings())
    hk = HibernationKeys(keys)
    use(Runtime(NoAws(AwsSettings())))
    first = datetime(2026, 12, 2, 21, 1, tzinfo=UTC)  # a Wednesday, minute 1 of the hour
    now = datetime.now(UTC)
    schedules = {}
    for i in range(args.clusters):
        sleep, awake = PATTERNS[i % len(PATTERNS)]
        s = new_schedule(
            cluster=f"cluster-{i:05d}",
            account=f"{100000000000 + i % 50}",
            region="eu-central-1",
            tz=ZONES[(i // len(PATTERNS)) % len(ZONES)],
            week=apply_rules(sleep, awake),
            now=now,
        )
        schedules[s.cluster] = s
    slots = Slots(first)
    records = {}
    sizes = {"ng-a": AsgSizes(min=1, max=6, desired=3, instance_type="m5.large")}
    for c, s in schedules.items():
        if wants_sleep(s, slots):
            records[c] = SleepRecord(
                account=s.account,
                region=s.region,
                asgs=sizes,
                complete=True,
                since_ms=int((first - timedelta(hours=1)).timestamp() * 1000),
                tick="setup",
                instances=3,
                usd_per_hour=0.288,
            )
    async with client.pipeline(transaction=False) as p:
        for c, s in schedules.items():
            p.hset(hk.schedules, c, msgspec.json.encode(s))
        for c, r in records.items():
            p.hset(hk.asleep, c, msgspec.json.encode(r))
        p.incr(hk.version)
        await p.execute()
    assert not decide(schedules, records, first), "setup: the first tick would change state"

    decide_ms = []
    for k in range(args.ticks):
        t0 = time.perf_counter()
        changes = decide(schedules, records, first + timedelta(minutes=k))
        decide_ms.append((time.perf_counter() - t0) * 1000)
        assert not changes

    consumer = Consumer(
        CONCERN,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="bench", block_ms=100),
    )
    await consumer.ensure_groups()
    tick_ms = []
    for k in range(args.ticks):
        at = first + timedelta(minutes=k)
        await producer.publish(
            HibernationTick(id=tick_id("hibernation", at), schedule="hibernation", scheduled_for=at)
        )
        t0 = time.perf_counter()
        taken = await consumer.process_once(block_ms=100)
        tick_ms.append((time.perf_counter() - t0) * 1000)
        assert taken == 1
    assert NoAws.calls == 0
    audit_len = await client.xlen(hk.audit)
    day: Any = await client.hgetall(hk.daily(first.strftime("%Y-%m-%d")))
    last: Any = await client.get(hk.last_tick)
    assert int(last) == int((first + timedelta(minutes=args.ticks - 1)).timestamp() * 1000)
    used: Any = await client.memory_usage(hk.schedules)
    used_rec: Any = await client.memory_usage(hk.asleep)
    async for key in client.scan_iter(match=f"{keys.prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()
    use(None)
    warm = tick_ms[1:]
    return {
        "clusters": args.clusters,
        "asleep": len(records),
        "ticks": args.ticks,
        "tick_ms_cold": round(tick_ms[0], 1),
        "tick_ms_warm_p50": round(statistics.median(warm), 1),
        "tick_ms_warm_max": round(max(warm), 1),
        "decide_ms_p50": round(statistics.median(decide_ms), 1),
        "decide_ms_max": round(max(decide_ms), 1),
        "aws_calls": NoAws.calls,
        "audit_entries": audit_len,
        "savings_usd_recorded": round(float(day.get(b"savings_usd", 0)), 4),
        "instance_hours_recorded": round(float(day.get(b"hibernated_instance_hours", 0)), 4),
        "redis_bytes_schedules": used,
        "redis_bytes_sleep_records": used_rec,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clusters", type=int, default=10_000)
    ap.add_argument("--ticks", type=int, default=20)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    if not 2 <= args.ticks <= 29:
        ap.error("--ticks: 2..29 (one hour's minutes before any pre-warm boundary)")
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
