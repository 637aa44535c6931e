"""Scaling out on a local Redis Cluster (3 masters + 3 replicas): consumer processes x partitions.

One topic with P partitions (``Keys(partitions=...)``), pre-filled with ``--events`` spot
interruptions over 1,000 cluster ids (so the keys spread over the partitions). Then C consumer
processes of one group drain it, timed from a common start signal until the group has read
and settled everything (lag and pending 0 on every partition). Two kinds of consumer:

* ``bare``: the hand-written redis-py loop a careful user would write: per partition
  ``XREADGROUP COUNT 100`` (not blocking) then ``XACK`` of what it read, round robin. No
  decoding, dedup, retries or effects: the reference for how far the cluster itself scales.
* ``streamproc``: ``Consumer`` of a no-op concern (concurrency 10): decode, dedup, settle
  script, renewals; ``--ordered`` adds a run with ``Concern(ordered=True)``. Each consumer
  reads only the partitions it owns (partition ownership, ``ConsumerSettings.own_partitions``).
  The C consumers are members of the group before the start signal (``Keys.owners``), as in
  a deployment already running when the load comes, so their first ownership step takes a
  balanced share; ``--cold`` leaves that out (the first consumer then takes every partition
  and hands the surplus over in its next ownership steps, a second apart: a good part of a
  drain here).

On 2 cores the absolute figures say little (the six redis-servers, the C consumers and this
process share them), so the table gives, per run, events/s, streamproc / bare, and each kind's
scaling against its own C=1 run with the same P: the question is whether adding processes and
partitions helps streamproc as much as it helps the bare loop. It also gives the masters'
CPU per event (``INFO cpu``, summed over the three masters) and memory per event after the
pre-fill (``used_memory`` delta over the masters: the stream entry plus the producer's dedup
marker) and the pre-fill's own rate and Redis CPU per event (one ``Producer.publish_many`` of
500 at a time, in this process), the inputs of docs/scaling.md.

Usage: .venv/bin/python benchmarks/cluster_scaling.py [--events 20000]
       [--processes 1,2,4] [--partitions 1,3,6] [--ordered] [--cold] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import resource
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import uvloop
from redis.asyncio.cluster import RedisCluster

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
    RedisSettings,
    connect,
)
from streamproc.logs import configure_logging  # noqa: E402
from tests.cluster_support import LocalCluster  # noqa: E402

TOPIC = "cluster"
GROUP = "bench"
CLUSTER_IDS = 1000


async def noop(event: SpotInterruption, ctx: Context) -> None:
    return None


def _keys(prefix: str, partitions: int) -> Keys:
    return Keys(prefix, partitions={TOPIC: partitions})


def _child(
    kind: str, url: str, prefix: str, partitions: int, name: str, ordered: bool, sync: Any
) -> None:
    sync[3].put(uvloop.run(_run_child(kind, url, prefix, partitions, name, ordered, sync)))


def _cpu_self_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _run_child(
    kind: str, url: str, prefix: str, partitions: int, name: str, ordered: bool, sync: Any
) -> float:
    ready, go, stop, _ = sync
    configure_logging("warning")
    keys = _keys(prefix, partitions)
    client = connect(RedisSettings(url=url, key_prefix=prefix, max_connections=64))
    try:
        await client.ping()
        ready.release()
        await asyncio.to_thread(go.wait)
        cpu_s = _cpu_self_s()
        if kind == "bare":
            await _bare(client, keys, name, stop)
        else:
            await _streamproc(client, keys, name, ordered, stop)
        return _cpu_self_s() - cpu_s  # from the start signal to the stop (idle tail included)
    finally:
        await client.aclose()


async def _bare(client: Any, keys: Keys, name: str, stop: Any) -> None:
    streams = [keys.stream(p) for p in keys.partitions_of(TOPIC)]
    while not stop.is_set():
        read = 0
        for s in streams:
            reply = await client.xreadgroup(GROUP, name, {s: ">"}, count=100)
            for _, entries in reply or ():
                if entries:
                    read += len(entries)
                    await client.xack(s, GROUP, *(i for i, _ in entries))
        if not read:
            await asyncio.sleep(0.01)


async def _streamproc(client: Any, keys: Keys, name: str, ordered: bool, stop: Any) -> None:
    codec = Codec(REGISTRY)
    concern = Concern(
        group=GROUP,
        topics=(TOPIC,),
        handlers={SpotInterruption: noop},
        concurrency=10,
        ordered=ordered,
    )
    consumer = Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(consumer=name, block_ms=100),
    )
    task = asyncio.create_task(consumer.run())
    await asyncio.to_thread(stop.wait)
    consumer.stop()
    await task


async def _masters_info(cluster: LocalCluster, section: str) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for port in cluster.ports:
        c = connect(RedisSettings(url=f"redis://127.0.0.1:{port}"))
        try:
            if (await c.info("replication"))["role"] == "master":
                out[port] = await c.info(section)
        finally:
            await c.aclose()
    return out


async def _cpu_s(cluster: LocalCluster) -> float:
    info = await _masters_info(cluster, "cpu")
    return sum(float(i["used_cpu_sys"]) + float(i["used_cpu_user"]) for i in info.values())


async def _memory(cluster: LocalCluster) -> int:
    info = await _masters_info(cluster, "memory")
    return sum(int(i["used_memory"]) for i in info.values())


async def _fill(client: Any, keys: Keys, events: int) -> None:
    producer = Producer(client, Codec(REGISTRY), keys)
    rng = random.Random(7)
    for first in range(0, events, 500):
        await producer.publish_many(
            [
                SpotInterruption(
                    cluster_id=f"c{rng.randrange(CLUSTER_IDS)}",
                    instance_id=f"i-{n}",
                    instance_type="m5.large",
                    availability_zone="eu-west-1a",
                )
                for n in range(first, min(first + 500, events))
            ]
        )
    for p in keys.partitions_of(TOPIC):
        await client.xgroup_create(keys.stream(p), GROUP, id="0", mkstream=True)


async def _left(client: Any, keys: Keys) -> int:
    """Entries the group has not read, plus those read and not settled, over the partitions."""
    left = 0
    for p in keys.partitions_of(TOPIC):
        for g in await client.xinfo_groups(keys.stream(p)):
            if g["name"] in (GROUP, GROUP.encode()):
                left += int(g["lag"] or 0) + int(g["pending"])
    return left


async def _members(client: Any, keys: Keys, processes: int) -> None:
    """The consumers ``c0``.. as live members of the group (for the default min_idle_ms)."""
    sec, us = await client.time()
    until_ms = int(sec) * 1000 + int(us) // 1000 + 30_000
    await client.zadd(keys.owners(GROUP), {f"c{n}": until_ms for n in range(processes)})


def _machine_busy() -> tuple[float, float]:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [float(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def _run(
    cluster: LocalCluster,
    kind: str,
    partitions: int,
    processes: int,
    events: int,
    ordered: bool,
    cold: bool = False,
) -> dict[str, Any]:
    prefix = f"b{uuid.uuid4().hex[:8]}"
    keys = _keys(prefix, partitions)
    client = connect(RedisSettings(url=cluster.url, key_prefix=prefix))
    try:
        memory_before, cpu_before = await _memory(cluster), await _cpu_s(cluster)
        filling = time.perf_counter()
        await _fill(client, keys, events)
        publish_s = time.perf_counter() - filling
        publish_cpu = await _cpu_s(cluster) - cpu_before
        memory_per_event = (await _memory(cluster) - memory_before) / events
        ctx = mp.get_context("spawn")
        ready, go, stop, cpu_q = ctx.Semaphore(0), ctx.Event(), ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=_child,
                args=(
                    kind,
                    cluster.url,
                    prefix,
                    partitions,
                    f"c{n}",
                    ordered,
                    (ready, go, stop, cpu_q),
                ),
            )
            for n in range(processes)
        ]
        for p in procs:
            p.start()
        for _ in procs:
            await asyncio.to_thread(ready.acquire)
        if kind == "streamproc" and not cold:
            await _members(client, keys, processes)
        cpu_before = await _cpu_s(cluster)
        busy_before = _machine_busy()
        started = time.perf_counter()
        go.set()
        while True:  # polled: the drain is only visible in Redis' group figures
            if not await _left(client, keys):
                break
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - started
        cpu = await _cpu_s(cluster) - cpu_before
        busy_after = _machine_busy()
        stop.set()
        consumers_cpu = 0.0
        for _ in procs:  # each child's CPU from the start signal to the stop
            consumers_cpu += await asyncio.to_thread(cpu_q.get, True, 60)
        for p in procs:
            await asyncio.to_thread(p.join, 30)
            if p.exitcode is None:
                p.kill()
        # what remains of the run: its keys (streams, dedup markers), one slot at a time
        for node in cast(RedisCluster, client).get_primaries():
            async for k in client.scan_iter(match=f"{prefix}:*", count=1000, target_nodes=node):
                await client.delete(k)
        return {
            "kind": kind + (" ordered" if ordered else ""),
            "partitions": partitions,
            "processes": processes,
            "events_per_s": events / elapsed,
            "redis_cpu_us_per_event": cpu / events * 1e6,
            "consumers_cpu_us_per_event": consumers_cpu / events * 1e6,
            "machine_busy": (busy_after[0] - busy_before[0]) / (busy_after[1] - busy_before[1]),
            "redis_bytes_per_event_filled": memory_per_event,
            "publish_events_per_s": events / publish_s,
            "publish_redis_cpu_us_per_event": publish_cpu / events * 1e6,
        }
    finally:
        await client.aclose()


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="sp-cluster-bench-") as tmp:
        cluster = LocalCluster(Path(tmp)).start()
        try:
            rows = []
            for partitions in args.partitions:
                for processes in args.processes:
                    for kind in ("bare", "streamproc"):
                        rows.append(
                            await _run(
                                cluster, kind, partitions, processes, args.events, False, args.cold
                            )
                        )
                        _print_row(rows, rows[-1])
            if args.ordered:
                for processes in args.processes[:1]:
                    partitions = args.partitions[-1]
                    rows.append(
                        await _run(
                            cluster,
                            "streamproc",
                            partitions,
                            processes,
                            args.events,
                            True,
                            args.cold,
                        )
                    )
                    _print_row(rows, rows[-1])
        finally:
            cluster.stop()
    return rows


def _print_row(rows: list[dict[str, Any]], row: dict[str, Any]) -> None:
    """One line per run: figures, ratio to the bare loop of the same P and C, scaling vs C=1."""
    same = [r for r in rows if r["partitions"] == row["partitions"]]
    bare = [r for r in same if r["kind"] == "bare" and r["processes"] == row["processes"]]
    first = [r for r in same if r["kind"] == row["kind"]]
    vs_bare = f"{row['events_per_s'] / bare[0]['events_per_s']:.2f}" if bare else "-"
    scaling = row["events_per_s"] / first[0]["events_per_s"]
    print(
        f"P={row['partitions']} C={row['processes']} {row['kind']:<20} "
        f"{row['events_per_s']:>9,.0f} ev/s  vs bare {vs_bare:>5}  "
        f"scaling vs C={first[0]['processes']} {scaling:.2f}x  "
        f"Redis CPU {row['redis_cpu_us_per_event']:.1f} us/ev  "
        f"consumers CPU {row['consumers_cpu_us_per_event']:.1f} us/ev  "
        f"machine busy {row['machine_busy']:.0%}  "
        f"memory {row['redis_bytes_per_event_filled']:.0f} B/ev  "
        f"(fill: {row['publish_events_per_s']:,.0f} ev/s, "
        f"Redis CPU {row['publish_redis_cpu_us_per_event']:.1f} us/ev)",
        flush=True,
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--processes", type=_ints, default=[1, 2, 4])
    parser.add_argument("--partitions", type=_ints, default=[1, 3, 6])
    parser.add_argument("--ordered", action="store_true", help="also ordered=True at P=max, C=1")
    parser.add_argument("--cold", action="store_true", help="consumers not members before go")
    parser.add_argument("--json", help="write the rows as JSON here")
    args = parser.parse_args()
    rows = uvloop.run(main(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
