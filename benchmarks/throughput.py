"""Throughput: the engine's producer and consumer against bare redis-py loops, in one run.

Every phase runs in its own process against the same Redis (an embedded one unless
REDIS_URL is set), on its own stream, with the same batch size (100) and msgspec decoding:

- bare XADD      pipelined XADD of pre-built events, 100 per pipeline
- publish_many   Producer.publish_many, 100 per call, one publish script call (dedup on: a
                 GET + XADD + SET PX per event in it; dedup off: XADD only)
- bare drain     XREADGROUP COUNT 100 → msgspec decode → one XACK per batch
- engine drain   Consumer.run with a no-op handler (dedup on / off, retries idle)
- end to end     one producer process and one consumer process at once

Usage: .venv/bin/python benchmarks/throughput.py [--events 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from schemas import REGISTRY, SpotInterruption  # noqa: E402
from streamproc import (  # noqa: E402
    Codec,
    Concern,
    Consumer,
    ConsumerSettings,
    Context,
    Keys,
    Producer,
    ProducerSettings,
    RedisSettings,
    connect,
)
from streamproc.cli import run_async  # noqa: E402

BATCH = 100


def events(n: int, tag: str) -> list[SpotInterruption]:
    return [
        SpotInterruption(
            cluster_id="bench",
            key="bench",
            instance_id=f"{tag}-{i}",
            instance_type="m5.large",
            availability_zone="eu-west-1a",
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------- roles (run in a child)


async def role_bare_xadd(url: str, prefix: str, n: int) -> float:
    client = connect(RedisSettings(url=url))
    codec = Codec(REGISTRY)
    stream = Keys(prefix).stream("cluster")
    fields = [codec.encode(e) for e in events(n, "b")]
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for f in fields[i : i + BATCH]:
                pipe.xadd(stream, f)  # type: ignore[arg-type]
            await pipe.execute()
    dt = time.perf_counter() - t0
    await client.aclose()
    return n / dt


async def role_publish(url: str, prefix: str, n: int, dedup: bool) -> float:
    client = connect(RedisSettings(url=url))
    keys = Keys(prefix)
    producer = Producer(
        client,
        Codec(REGISTRY),
        keys,
        ProducerSettings(dedup_window_ms=600_000 if dedup else 0, high_watermark=10**9),
    )
    evs = events(n, "p")
    t0 = time.perf_counter()
    for i in range(0, n, BATCH):
        await producer.publish_many(evs[i : i + BATCH])
    dt = time.perf_counter() - t0
    await client.aclose()
    return n / dt


async def role_bare_drain(url: str, prefix: str, n: int) -> float:
    client = connect(RedisSettings(url=url))
    stream = Keys(prefix).stream("cluster")
    decoders = {t.type_name().encode(): msgspec.json.Decoder(t) for t in REGISTRY.by_name.values()}
    done = 0
    t0 = time.perf_counter()
    while done < n:
        reply: Any = await client.xreadgroup("g", "bare", {stream: ">"}, count=BATCH, block=1000)
        if not reply:
            break
        ids = []
        for entry_id, f in reply[0][1]:
            decoders[f[b"type"]].decode(f[b"data"])
            ids.append(entry_id)
        await client.xack(stream, "g", *ids)
        done += len(ids)
    dt = time.perf_counter() - t0
    await client.aclose()
    return done / dt


async def noop(event: SpotInterruption, ctx: Context) -> None:
    return None


async def role_engine_drain(url: str, prefix: str, n: int, dedup: bool) -> float:
    client = connect(RedisSettings(url=url))
    keys = Keys(prefix)
    codec = Codec(REGISTRY)
    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: noop}, concurrency=10),
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer="engine",
            batch=BATCH,
            max_in_flight=1000,
            dedup_window_ms=600_000 if dedup else 0,
            trim_interval_ms=0,
        ),
    )
    done = asyncio.Event()

    async def watch() -> None:
        while consumer.stats.acked < n:  # noqa: ASYNC110 - sampling a counter, no event
            await asyncio.sleep(0.002)
        done.set()

    task = asyncio.create_task(consumer.run())
    watcher = asyncio.create_task(watch())
    t0 = time.perf_counter()
    await asyncio.wait_for(done.wait(), 600)
    dt = time.perf_counter() - t0
    consumer.stop()
    await asyncio.gather(task, watcher)
    await client.aclose()
    return n / dt


ROLES = {
    "bare-xadd": lambda a: role_bare_xadd(a.url, a.prefix, a.events),
    "publish-dedup": lambda a: role_publish(a.url, a.prefix, a.events, True),
    "publish-nodedup": lambda a: role_publish(a.url, a.prefix, a.events, False),
    "bare-drain": lambda a: role_bare_drain(a.url, a.prefix, a.events),
    "engine-drain-dedup": lambda a: role_engine_drain(a.url, a.prefix, a.events, True),
    "engine-drain-nodedup": lambda a: role_engine_drain(a.url, a.prefix, a.events, False),
}


# ---------------------------------------------------------------- orchestration


def child(role: str, url: str, prefix: str, n: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--role",
            role,
            "--url",
            url,
            "--prefix",
            prefix,
            "--events",
            str(n),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )


def run_role(role: str, url: str, prefix: str, n: int) -> float:
    p = child(role, url, prefix, n)
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"{role} failed ({p.returncode})")
    return float(out.strip().splitlines()[-1])


async def prefill(url: str, prefix: str, n: int) -> None:
    """n events on the stream, a group 'g' at 0, nothing else."""
    client = connect(RedisSettings(url=url))
    keys = Keys(prefix)
    await client.xgroup_create(keys.stream("cluster"), "g", id="0", mkstream=True)
    producer = Producer(client, Codec(REGISTRY), keys, ProducerSettings(dedup_window_ms=0))
    evs = events(n, prefix)
    for i in range(0, n, 1000):
        await producer.publish_many(evs[i : i + 1000])
    await client.aclose()


async def cleanup(url: str, prefix: str) -> None:
    client = connect(RedisSettings(url=url))
    async for k in client.scan_iter(match=f"{prefix}:*", count=10_000):
        await client.unlink(k)
    await client.aclose()


def measure(url: str, n: int, rounds: int) -> dict[str, float]:
    """Best of ``rounds`` for each phase (phases interleaved, so noise hits them alike)."""
    best: dict[str, float] = {}
    for r in range(rounds):
        for role in ("bare-xadd", "publish-nodedup", "publish-dedup"):
            prefix = f"bench{r}{role.replace('-', '')}"
            best[role] = max(best.get(role, 0.0), run_role(role, url, prefix, n))
            asyncio.run(cleanup(url, prefix))
        for role in ("bare-drain", "engine-drain-nodedup", "engine-drain-dedup"):
            prefix = f"bench{r}{role.replace('-', '')}"
            asyncio.run(prefill(url, prefix, n))
            best[role] = max(best.get(role, 0.0), run_role(role, url, prefix, n))
            asyncio.run(cleanup(url, prefix))
        # end to end: one producer process and one consumer process at once
        prefix = f"bench{r}e2e"
        asyncio.run(_create_group(url, prefix))
        t0 = time.perf_counter()
        cons = child("engine-drain-dedup", url, prefix, n)
        prod = child("publish-dedup", url, prefix, n)
        prod.communicate()
        cons.communicate()
        best["end-to-end"] = max(best.get("end-to-end", 0.0), n / (time.perf_counter() - t0))
        asyncio.run(cleanup(url, prefix))
    return best


async def _create_group(url: str, prefix: str) -> None:
    client = connect(RedisSettings(url=url))
    await client.xgroup_create(Keys(prefix).stream("cluster"), "g", id="0", mkstream=True)
    await client.aclose()


def report(best: dict[str, float], n: int) -> str:
    ratio = {
        "publish-nodedup": best["publish-nodedup"] / best["bare-xadd"],
        "publish-dedup": best["publish-dedup"] / best["bare-xadd"],
        "engine-drain-nodedup": best["engine-drain-nodedup"] / best["bare-drain"],
        "engine-drain-dedup": best["engine-drain-dedup"] / best["bare-drain"],
    }
    lines = [
        f"| phase ({n:,} events, batch {BATCH}) | events/s | ratio | target |",
        "|---|---:|---:|---|",
        f"| bare pipelined XADD | {best['bare-xadd']:,.0f} | 1.00 | baseline |",
        f"| Producer.publish_many, dedup off | {best['publish-nodedup']:,.0f} | "
        f"{ratio['publish-nodedup']:.2f} | >= 0.70 of bare XADD |",
        f"| Producer.publish_many, dedup on (Lua) | {best['publish-dedup']:,.0f} | "
        f"{ratio['publish-dedup']:.2f} | (default setting) |",
        f"| bare XREADGROUP/decode/XACK loop | {best['bare-drain']:,.0f} | 1.00 | baseline |",
        f"| Consumer, dedup off | {best['engine-drain-nodedup']:,.0f} | "
        f"{ratio['engine-drain-nodedup']:.2f} | >= 0.60 of bare loop |",
        f"| Consumer, dedup on (default) | {best['engine-drain-dedup']:,.0f} | "
        f"{ratio['engine-drain-dedup']:.2f} | >= 0.75 of dedup off: "
        f"{best['engine-drain-dedup'] / best['engine-drain-nodedup']:.2f} |",
        f"| end to end: 1 producer + 1 consumer process | {best['end-to-end']:,.0f} | | |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=2, help="best of N per phase")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="bench", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.role:
        print(run_async(ROLES[a.role](a)))
        return
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        from streamproc.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="sp-bench-")), appendonly=False)
        url = server.start().url
    try:
        best = measure(url, a.events, a.rounds)
    finally:
        if server is not None:
            server.stop()
    print(
        f"# throughput — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(report(best, a.events))
    if a.json:
        a.json.write_text(json.dumps({"events": a.events, "events_per_s": best}, indent=2))


if __name__ == "__main__":
    main()
