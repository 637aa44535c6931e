"""Dedup cost: Redis memory, Redis CPU and drain rate with dedup on vs off, two code trees side
by side in one run (issue 20).

    .venv/bin/python benchmarks/dedup_cost.py --before 6f40aae [--events 100000] [--rounds 1]
        [--batch 500] [--window-ms 86400000] [--pin] [--json out.json]
    .venv/bin/python benchmarks/dedup_cost.py --before 6f40aae --soak 600 --rate 2000 \\
        [--window-ms 60000] [--sample-s 10]

Trees. "after" is this working tree (``--after PATH`` for another). ``--before REV`` is a git
revision checked out for the run with ``git worktree add --detach /tmp/sp-before REV`` (and
removed at the end unless ``--keep-worktree``; an existing /tmp/sp-before at that commit is
reused and left alone); ``--before PATH`` (an existing folder) takes that folder as the tree
as it is. Without ``--before`` only "after" is measured. Each variant runs in a child Python
process of this script with ``PYTHONPATH=<tree>`` (the child says which ``streamproc`` it
imported; the run stops if it is not the tree's), against a fresh redis-server of its own
(``EmbeddedRedis``: 127.0.0.1, no AOF, no RDB, ``maxmemory`` unset), so the variants share
nothing but the machine. The child uses only API both trees have: ``Producer(client, codec,
keys, ProducerSettings(dedup_window_ms=...))``, ``Consumer(Concern, client=, codec=, keys=,
producer=, settings=ConsumerSettings(dedup_window_ms=...))``, ``ctx.effect``. 0 = dedup off.

Bulk mode (per tree x dedup off/on; one topic, one group, one consumer; ``BenchEvent``):

1. warm-up: 500 events published and drained (scripts loaded, group and consumer
   registered); then a snapshot: INFO memory/cpu, DBSIZE, ``MEMORY USAGE <stream> SAMPLES 0``;
2. publish N events with ``Producer.publish_many``, ``--batch`` per call (timed: publish ev/s);
3. a new consumer (concurrency 10, XREADGROUP COUNT 100) drains them; its handler queues one
   effect, ``HINCRBY <state:effects> n 1``; timed from its start until XINFO GROUPS says
   entries-read = all, lag 0, pending 0 (polled every 5 ms): drain ev/s; then it stops;
4. a second snapshot. Per event: total bytes = Δused_memory - Δmem_clients_normal (client
   buffers are not state); dedup state bytes = total - Δ(stream's MEMORY USAGE); keys =
   ΔDBSIZE; Redis CPU = Δ(used_cpu_sys + used_cpu_user) over 2-3 (and split publish/drain).
   The effect's count must equal the events handled, or the run fails.

Then the key families (parts with digits replaced by <n> or <id>) with their count and mean
MEMORY USAGE over a sample. With ``--rounds R`` each variant runs R times and each figure is
the median; a ratio (dedup on / off, same tree) is the median of its per-round ratios.
Targets (issue 20): dedup state <= 60 B/event (one group), judged on total bytes/event dedup
on minus dedup off (whatever dedup adds, stream fields included: "dedup state" alone also
carries what the stream's MEMORY USAGE misses or overcounts, -15..+15 B/event with dedup off
here), Redis CPU on/off <= 1.3, drain on/off >= 0.9.

Soak mode (``--soak SECONDS``, dedup on, per tree): one consumer runs (safe trimming every
5 s, so the stream stays short) while one publisher task publishes ``--rate`` events/s in
small batches paced by the clock (every 20 ms, what is due by then). Every ``--sample-s``:
used_memory, the stream's MEMORY USAGE, DBSIZE, lag + pending. Marks live ``--window-ms``, so
from about one window after the start memory should be flat: the verdict fits a line to
used_memory - stream - client buffers over the samples that are in the last half of the soak
and at least a window (plus one sample) in; flat = slope <= 2 bytes per published event
(per-event marks that never expired would grow by ~370 B/event; a falling slope is Redis'
active expiry catching up after the window filled, as seen in short soaks). After the soak
the publisher stops, the consumer drains, and every event's effect must have been applied once.

``--pin``: redis-server runs on the last CPU this process may use and the child (producer and
consumer) on the others, so that neither takes the other's core nor migrates (as in production,
where Redis has cores of its own): on the shared 2-vCPU VM the per-round on/off ratio's
standard deviation was 0.07 pinned (17 rounds) against 0.12 unpinned (8 rounds), 2026-12-02.

Exit status: 0 when every variant accounted for every event; the targets are reported, not
enforced (the machine is shared and noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
WORKTREE = Path("/tmp/sp-before")
PREFIX = "dd"
GROUP = "g"
WARMUP = 500
#: XREADGROUP COUNT of the consumer.
READ_BATCH = 100
#: Soak publisher tick (seconds) and the consumer's safe trimming interval there (ms).
TICK_S = 0.02
SOAK_TRIM_MS = 5_000
#: Soak verdict: flat when the fitted slope is at most this many bytes per published event.
FLAT_B_PER_EVENT = 2.0
#: A drain that makes no progress this long fails the run (instead of hanging).
STALL_S = 60.0
TARGET_STATE_B, TARGET_CPU_RATIO, TARGET_DRAIN_RATIO = 60.0, 1.3, 0.9

_DIGIT = re.compile(r"\d")


def _shape(key: str) -> str:
    """A key's family: each ``:``-separated part with a digit in it becomes ``<n>`` (digits
    only) or ``<id>`` (event ids, entry ids, producer ids, buckets)."""
    return ":".join(
        ("<n>" if part.isdigit() else "<id>") if _DIGIT.search(part) else part
        for part in key.split(":")
    )


# ---------------------------------------------------------------- child (PYTHONPATH=<tree>)


async def _redis_figures(r: aioredis.Redis, stream: str) -> dict[str, float]:
    mem = await r.info("memory")
    cpu = await r.info("cpu")
    stream_b = await r.memory_usage(stream, samples=0) if await r.exists(stream) else 0
    return {
        "used_memory": float(mem["used_memory"]),
        "clients": float(mem.get("mem_clients_normal", 0)),
        "stream": float(stream_b or 0),
        "keys": float(await r.dbsize()),
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
    }


async def _group(r: aioredis.Redis, stream: str) -> dict[str, Any]:
    for g in await r.xinfo_groups(stream):
        if g["name"] in (GROUP, GROUP.encode()):
            return dict(g)
    return {}


async def _drained(r: aioredis.Redis, stream: str, total: int, run: asyncio.Task[Any]) -> None:
    """Until the group has read ``total`` entries, with lag 0 and nothing pending (fails after
    ``STALL_S`` without progress)."""
    last, since = None, time.monotonic()
    while True:
        g = await _group(r, stream)
        read = g.get("entries-read") or 0
        if read >= total and g.get("pending") == 0 and not g.get("lag"):
            return
        if run.done():
            run.result()
            raise SystemExit("the consumer stopped before the group drained")
        now = (read, g.get("pending"), g.get("lag"))
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            raise SystemExit(f"no progress for {STALL_S} s draining {total} entries: {g}")
        await asyncio.sleep(0.005)


async def _key_families(r: aioredis.Redis, sample: int = 100) -> list[dict[str, Any]]:
    """Every key's shape (ids as <id>) with its count and the mean MEMORY USAGE of a sample."""
    fams: dict[str, list[bytes]] = {}
    counts: dict[str, int] = {}
    async for k in r.scan_iter(count=1000):
        shape = _shape(k.decode(errors="replace"))
        counts[shape] = counts.get(shape, 0) + 1
        if len(fams.setdefault(shape, [])) < sample:
            fams[shape].append(k)
    out = []
    for shape, ks in fams.items():
        sizes = [await r.memory_usage(k, samples=0) or 0 for k in ks]
        out.append({"family": shape, "keys": counts[shape], "mean_bytes": statistics.mean(sizes)})
    return sorted(out, key=lambda f: -f["keys"] * f["mean_bytes"])


class _Child:
    """What a variant builds from its tree's ``streamproc``."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import streamproc
        from streamproc import (
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
        from streamproc.bench.events import REGISTRY, BenchEvent

        self.spec, self.Event = spec, BenchEvent
        self.module = str(Path(streamproc.__file__).resolve())
        self.keys = Keys(PREFIX)
        self.codec = Codec(REGISTRY)
        self.stream = self.keys.stream(BenchEvent.topic)
        self.effects = self.keys.state("effects")
        self.client = connect(RedisSettings(url=spec["url"], key_prefix=PREFIX))
        self.raw = aioredis.Redis.from_url(spec["url"])
        window = int(spec["window_ms"]) if spec["dedup"] else 0
        self.producer = Producer(
            self.client,
            self.codec,
            self.keys,
            ProducerSettings(dedup_window_ms=window, high_watermark=10**9),
        )
        effects = self.effects

        async def handle(event: Any, ctx: Context) -> None:
            ctx.effect("HINCRBY", effects, "n", 1)

        def consumer(name: str) -> Any:
            return Consumer(
                Concern(
                    group=GROUP,
                    topics=(BenchEvent.topic,),
                    handlers={BenchEvent: handle},
                    concurrency=10,
                ),
                client=self.client,
                codec=self.codec,
                keys=self.keys,
                producer=self.producer,
                settings=ConsumerSettings(
                    consumer=name,
                    batch=READ_BATCH,
                    block_ms=200,
                    max_in_flight=1000,
                    dedup_window_ms=window,
                    trim_interval_ms=SOAK_TRIM_MS if spec["mode"] == "soak" else 0,
                    stats_interval_ms=0,
                ),
            )

        self.consumer = consumer

    def events(self, n: int, start: int) -> list[Any]:
        return [self.Event(seq=start + i) for i in range(n)]

    async def create_group(self) -> None:
        try:
            from streamproc.groups import ensure_declared_groups
        except ImportError:  # a tree without it: what it did, by hand
            await self.raw.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        else:
            await ensure_declared_groups(self.client, self.keys, {self.Event.topic: [GROUP]})

    async def publish(self, evs: list[Any], batch: int) -> None:
        for i in range(0, len(evs), batch):
            await self.producer.publish_many(evs[i : i + batch])

    async def drain(self, name: str, total: int) -> float:
        """Run a consumer until the group drained ``total`` entries; its wall time."""
        c = self.consumer(name)
        t0 = time.monotonic()
        run = asyncio.create_task(c.run())
        await _drained(self.raw, self.stream, total, run)
        took = time.monotonic() - t0
        c.stop()
        await run
        return took

    async def applied(self) -> int:
        return int(await self.raw.hget(self.effects, "n") or 0)

    async def close(self) -> None:
        await self.client.aclose()
        await self.raw.aclose()


async def child_bulk(spec: dict[str, Any]) -> dict[str, Any]:
    ch = _Child(spec)
    n, batch = int(spec["events"]), int(spec["batch"])
    await ch.create_group()
    await ch.publish(ch.events(WARMUP, 0), batch)
    await ch.drain("warmup", WARMUP)
    done = WARMUP
    prefill = int(spec.get("prefill") or 0)
    if prefill:  # a generation full of records, then the measure in the next one
        await ch.publish(ch.events(prefill, done), batch)
        await ch.drain("prefill", done + prefill)
        done += prefill
        window = int(spec["window_ms"])
        t = await ch.raw.time()
        gen = (t[0] * 1000 + t[1] // 1000) // window
        while True:
            t = await ch.raw.time()
            if (t[0] * 1000 + t[1] // 1000) // window > gen:
                break
            await asyncio.sleep(0.05)
    evs = ch.events(n, done)
    before = await _redis_figures(ch.raw, ch.stream)
    t0 = time.monotonic()
    await ch.publish(evs, batch)
    publish_s = time.monotonic() - t0
    mid = await _redis_figures(ch.raw, ch.stream)
    drain_s = await ch.drain("c1", done + n)
    await asyncio.sleep(0.2)  # the consumer's connections idle, its buffers released
    after = await _redis_figures(ch.raw, ch.stream)
    applied = await ch.applied()
    families = await _key_families(ch.raw)
    await ch.close()
    if applied != done + n:
        raise SystemExit(f"effects applied {applied} times for {done + n} events")
    total_b = (after["used_memory"] - before["used_memory"]) - (
        after["clients"] - before["clients"]
    )
    return {
        "streamproc": ch.module,
        "events": n,
        "applied": applied - done,
        "total_b": total_b / n,
        "stream_b": (after["stream"] - before["stream"]) / n,
        "state_b": (total_b - (after["stream"] - before["stream"])) / n,
        "keys": (after["keys"] - before["keys"]) / n,
        "cpu_us": (after["cpu_s"] - before["cpu_s"]) / n * 1e6,
        "cpu_publish_us": (mid["cpu_s"] - before["cpu_s"]) / n * 1e6,
        "cpu_drain_us": (after["cpu_s"] - mid["cpu_s"]) / n * 1e6,
        "publish_per_s": n / publish_s,
        "drain_per_s": n / drain_s,
        "families": families,
    }


async def child_soak(spec: dict[str, Any]) -> dict[str, Any]:
    ch = _Child(spec)
    rate, soak_s, sample_s = float(spec["rate"]), float(spec["soak_s"]), float(spec["sample_s"])
    await ch.create_group()
    await ch.publish(ch.events(WARMUP, 0), 100)
    await ch.drain("warmup", WARMUP)
    c = ch.consumer("c1")
    run = asyncio.create_task(c.run())
    sent = WARMUP
    t0 = time.monotonic()
    stop = asyncio.Event()

    async def publisher() -> None:
        nonlocal sent
        while not stop.is_set():
            due = WARMUP + int(rate * (time.monotonic() - t0)) - sent
            if due > 0:
                await ch.producer.publish_many(ch.events(due, sent))
                sent += due
            await asyncio.sleep(TICK_S)

    pub = asyncio.create_task(publisher())
    samples: list[dict[str, float]] = []
    k = 0
    while True:
        f = await _redis_figures(ch.raw, ch.stream)
        g = await _group(ch.raw, ch.stream)
        t = time.monotonic() - t0
        f.update(t=t, published=sent - WARMUP, backlog=(g.get("lag") or 0) + g.get("pending", 0))
        samples.append(f)
        print(
            f"  t={t:6.1f}s published {sent - WARMUP:>9,} used_memory {f['used_memory']:>13,.0f}"
            f" stream {f['stream']:>11,.0f} keys {f['keys']:>9,.0f} backlog {f['backlog']:>7,.0f}",
            file=sys.stderr,
            flush=True,
        )
        if t >= soak_s or run.done() or pub.done():
            break
        k += 1
        await asyncio.sleep(max(0.0, t0 + k * sample_s - time.monotonic()))
    stop.set()
    await pub
    await _drained(ch.raw, ch.stream, sent, run)
    c.stop()
    await run
    applied = await ch.applied()
    families = await _key_families(ch.raw)
    await ch.close()
    if applied != sent:
        raise SystemExit(f"effects applied {applied} times for {sent} events")
    return {
        "streamproc": ch.module,
        "published": sent - WARMUP,
        "samples": samples,
        "families": families,
    }


def child_main(spec: dict[str, Any]) -> None:
    import uvloop

    if spec.get("skew_ms") is not None:  # a tree with the constant (after issue 20) only
        import streamproc.producer as producer_module

        if hasattr(producer_module, "MINTED_SKEW_MS"):
            producer_module.MINTED_SKEW_MS = int(spec["skew_ms"])

    fn = child_soak if spec["mode"] == "soak" else child_bulk
    print(json.dumps(uvloop.run(fn(spec))), flush=True)


# ---------------------------------------------------------------- parent


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout
    redis = out.split()[2] if len(out.split()) > 2 else "?"
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, nproc {os.cpu_count()}, "
        f"{model}, Python {platform.python_version()}, redis-server {redis}"
    )


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout.strip()


def before_tree(rev: str, keep: bool) -> tuple[Path, str, bool]:
    """The tree for ``--before``: (folder, label, whether this run created a worktree)."""
    if Path(rev).is_dir():
        return Path(rev).resolve(), f"before ({rev})", False
    sha = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    label = f"before ({sha[:7]})"
    if WORKTREE.exists():
        have = git("rev-parse", "HEAD", cwd=WORKTREE)
        if have != sha:
            raise SystemExit(f"{WORKTREE} exists at {have[:7]}, not {sha[:7]}: remove it first")
        return WORKTREE, label, False
    git("worktree", "add", "--detach", str(WORKTREE), sha)
    return WORKTREE, label, not keep


#: ``--pin``: (redis-server's CPUs, the child's); None when unpinned.
PIN: tuple[set[int], set[int]] | None = None


def pin_cpus() -> tuple[set[int], set[int]]:
    """redis-server on the last CPU this process may use, the child on the others (two at least)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs two CPUs, this process may use {cpus}")
    return {cpus[-1]}, set(cpus[:-1])


def run_child(tree: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """One variant: a fresh redis-server, a child with ``PYTHONPATH=<tree>``, its result."""
    from streamproc.embedded import EmbeddedRedis

    with tempfile.TemporaryDirectory(prefix="dedup-cost-") as tmp:
        server = EmbeddedRedis(Path(tmp), appendonly=False).start()
        child_cpus: set[int] | None = None
        if PIN is not None and server.proc is not None:
            os.sched_setaffinity(server.proc.pid, PIN[0])
            child_cpus = PIN[1]
        try:
            env = {
                **os.environ,
                "PYTHONPATH": str(tree),
                "STREAMPROC_LOG_LEVEL": os.environ.get("STREAMPROC_LOG_LEVEL", "warning"),
            }
            p = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps({**spec, "url": server.url})],
                cwd=tmp,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                check=False,
                preexec_fn=None if child_cpus is None else partial(_pin_self, child_cpus),
            )
        finally:
            server.stop()
    if p.returncode:
        raise SystemExit(f"variant {spec} failed ({p.returncode})")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    if not Path(result["streamproc"]).is_relative_to(tree):
        raise SystemExit(f"the child imported {result['streamproc']}, not {tree}'s streamproc")
    return result


def median_of(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def families_text(fams: list[dict[str, Any]], top: int = 6) -> str:
    return "; ".join(f"{f['family']} x{f['keys']:,} ~{f['mean_bytes']:.0f} B" for f in fams[:top])


def _pin_self(cpus: set[int]) -> None:
    os.sched_setaffinity(0, cpus)


def bulk(a: argparse.Namespace, trees: list[tuple[str, Path]]) -> dict[str, Any]:
    runs: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for r in range(a.rounds):
        order = [(t, d) for t in trees for d in (False, True)]
        for (label, tree), dedup in order if r % 2 == 0 else order[::-1]:
            spec = {
                "mode": "bulk",
                "events": a.events,
                "batch": a.batch,
                "window_ms": a.window_ms,
                "dedup": dedup,
                "skew_ms": a.skew_ms,
                "prefill": a.prefill,
            }
            t0 = time.monotonic()
            res = run_child(tree, spec)
            runs.setdefault((label, dedup), []).append(res)
            print(
                f"  round {r + 1} {label} dedup {'on' if dedup else 'off'}: "
                f"{time.monotonic() - t0:.0f} s; {families_text(res['families'])}",
                flush=True,
            )
    print()
    print(
        "| tree | dedup | dedup state B/event | total B/event | stream B/event | keys/event "
        "| Redis CPU µs/event (publish + drain) | publish ev/s | drain ev/s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    figures: dict[str, Any] = {}
    for label, _ in trees:
        for dedup in (False, True):
            rs = runs[(label, dedup)]
            m = {
                k: median_of(rs, k)
                for k in (
                    "state_b",
                    "total_b",
                    "stream_b",
                    "keys",
                    "cpu_us",
                    "cpu_publish_us",
                    "cpu_drain_us",
                    "publish_per_s",
                    "drain_per_s",
                )
            }
            figures[f"{label} dedup {'on' if dedup else 'off'}"] = {**m, "runs": rs}
            print(
                f"| {label} | {'on' if dedup else 'off'} | {m['state_b']:.1f} | "
                f"{m['total_b']:.1f} | {m['stream_b']:.1f} | {m['keys']:.3f} | "
                f"{m['cpu_us']:.2f} ({m['cpu_publish_us']:.2f} + {m['cpu_drain_us']:.2f}) | "
                f"{m['publish_per_s']:,.0f} | {m['drain_per_s']:,.0f} |"
            )
    print()
    print(
        "| tree | dedup state B/event, on | total B/event, on - off (target ≤ 60) "
        "| Redis CPU on/off (target ≤ 1.3) | drain on/off (target ≥ 0.9) |"
    )
    print("|---|---:|---:|---:|---:|")
    ratios: dict[str, Any] = {}
    for label, _ in trees:
        off, on = runs[(label, False)], runs[(label, True)]
        state = median_of(on, "state_b")
        net = median_of(on, "total_b") - median_of(off, "total_b")
        cpu = statistics.median(b["cpu_us"] / a_["cpu_us"] for a_, b in zip(off, on, strict=True))
        drain = statistics.median(
            b["drain_per_s"] / a_["drain_per_s"] for a_, b in zip(off, on, strict=True)
        )
        ratios[label] = {"state_b": state, "net_b": net, "cpu_ratio": cpu, "drain_ratio": drain}

        def ok(good: bool) -> str:
            return "met" if good else "**not met**"

        print(
            f"| {label} | {state:.1f} | {net:.1f} {ok(net <= TARGET_STATE_B)} | "
            f"{cpu:.2f} {ok(cpu <= TARGET_CPU_RATIO)} | {drain:.2f} "
            f"{ok(drain >= TARGET_DRAIN_RATIO)} |"
        )
    return {"variants": figures, "ratios": ratios}


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x."""
    mx = statistics.mean(x for x, _ in points)
    my = statistics.mean(y for _, y in points)
    den = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


def soak(a: argparse.Namespace, trees: list[tuple[str, Path]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label, tree in trees:
        print(
            f"soak {label}: {a.soak:.0f} s at {a.rate:,.0f} events/s, dedup window "
            f"{a.window_ms:,} ms, a sample every {a.sample_s:.0f} s",
            flush=True,
        )
        spec = {
            "mode": "soak",
            "rate": a.rate,
            "soak_s": a.soak,
            "sample_s": a.sample_s,
            "window_ms": a.window_ms,
            "dedup": True,
        }
        res = run_child(tree, spec)
        samples = res["samples"]
        print(
            "| t s | published | used_memory B | stream B | other B (used - stream - clients) "
            "| keys (DBSIZE) | lag + pending |"
        )
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for s in samples:
            s["other"] = s["used_memory"] - s["stream"] - s["clients"]
            print(
                f"| {s['t']:.0f} | {s['published']:,.0f} | {s['used_memory']:,.0f} | "
                f"{s['stream']:,.0f} | {s['other']:,.0f} | {s['keys']:,.0f} | "
                f"{s['backlog']:,.0f} |"
            )
        full_at = a.window_ms / 1000 + a.sample_s
        tail = [s for s in samples if s["t"] >= max(full_at, a.soak / 2)]
        achieved = res["published"] / samples[-1]["t"] if samples[-1]["t"] else 0.0
        verdict: dict[str, Any] = {"achieved_rate": achieved, "window_full_at_s": full_at}
        if len(tail) < 3:
            print(
                f"window full at ~{full_at:.0f} s: {len(tail)} samples after it in the last "
                "half; soak longer (or a shorter --window-ms) for a verdict"
            )
        else:
            other = slope([(s["t"], s["other"]) for s in tail])
            used = slope([(s["t"], s["used_memory"]) for s in tail])
            keys = slope([(s["t"], s["keys"]) for s in tail])
            flat = other <= FLAT_B_PER_EVENT * achieved
            verdict.update(
                slope_other_b_per_s=other,
                slope_used_b_per_s=used,
                slope_keys_per_s=keys,
                flat=flat,
            )
            print(
                f"last half, window full ({len(tail)} samples from t={tail[0]['t']:.0f} s): "
                f"slope of used - stream - clients {other:+,.0f} B/s "
                f"({other / achieved if achieved else 0:+.2f} B/event), used_memory "
                f"{used:+,.0f} B/s, keys {keys:+,.1f}/s → "
                f"{'flat' if flat else '**growing**'} (flat: growth ≤ {FLAT_B_PER_EVENT} "
                "B/event; a fall is the expiry catching up)"
            )
        print(f"published {res['published']:,} ({achieved:,.0f}/s); every effect applied once")
        print(f"key families at the end: {families_text(res['families'])}")
        print()
        out[label] = {**res, **verdict}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", help="git revision (a worktree in /tmp/sp-before) or a folder")
    p.add_argument("--after", type=Path, default=ROOT, help="the tree to compare (default: here)")
    p.add_argument("--keep-worktree", action="store_true")
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=500, help="events per publish_many call")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument(
        "--window-ms", type=int, help="dedup window (default: 86400000; 60000 with --soak)"
    )
    p.add_argument(
        "--skew-ms",
        type=int,
        help="the clock skew the producer allows for minted ids (MINTED_SKEW_MS, 60000): 0 "
        "with a short --window-ms stands for a long window's steady state, where ids minted "
        "in the current generation skip the previous one's lookup",
    )
    p.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="bulk: publish and drain this many events first, wait for the next generation "
        "(--window-ms), then measure: the steady state of a window that has turned over",
    )
    p.add_argument("--soak", type=float, default=0.0, help="soak SECONDS instead of bulk")
    p.add_argument("--rate", type=float, default=2000.0, help="soak events/s")
    p.add_argument("--sample-s", type=float, default=10.0)
    p.add_argument(
        "--pin",
        action="store_true",
        help="run redis-server on one CPU and the child (producer, consumer) on the others: "
        "neither takes the other's core, nor moves (less noise in Redis' CPU time)",
    )
    p.add_argument("--json", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child_main(json.loads(a.child))
        return
    if a.pin:
        global PIN
        PIN = pin_cpus()
    sys.path.insert(0, str(ROOT))  # the parent's own imports (EmbeddedRedis) come from here
    if a.window_ms is None:
        a.window_ms = 60_000 if a.soak else 86_400_000
    trees: list[tuple[str, Path]] = []
    created = False
    if a.before:
        path, label, created = before_tree(a.before, a.keep_worktree)
        trees.append((label, path))
    trees.append(("after", a.after.resolve()))
    print(f"# dedup cost — {machine()}")
    if PIN is not None:
        print(f"# pinned: redis-server on CPU {sorted(PIN[0])}, the child on {sorted(PIN[1])}")
    for label, tree in trees:
        try:
            head = git("log", "-1", "--format=%h %s", cwd=tree)[:70]
            dirty = " + uncommitted changes" if git("status", "--porcelain", cwd=tree) else ""
        except subprocess.CalledProcessError:
            head, dirty = "?", ""
        print(f"# {label}: {tree} — {head}{dirty}")
    t0 = time.monotonic()
    try:
        if a.soak:
            result = {"soak": soak(a, trees)}
        else:
            print(
                f"# {a.events:,} events per variant, publish_many batches of {a.batch}, "
                f"1 topic, 1 group, 1 consumer, dedup window {a.window_ms:,} ms, "
                f"{a.rounds} round(s)"
            )
            result = bulk(a, trees)
    finally:
        if created:
            git("worktree", "remove", "--force", str(WORKTREE))
    print(f"\n# took {time.monotonic() - t0:.0f} s")
    if a.json:
        a.json.write_text(
            json.dumps({"machine": machine(), "args": vars(a), **result}, default=str, indent=1)
        )


if __name__ == "__main__":
    main()
