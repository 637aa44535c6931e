"""Throughput: the engine's producer and consumer against bare redis-py loops, in one run.

Every phase runs in child processes of its own against the same Redis (an embedded one unless
REDIS_URL is set), on its own stream, with the same batch size (100) and msgspec decoding, and
every phase handles the same number of events:

- bare XADD        pipelined XADD of pre-built events, 100 per pipeline
- publish_many     Producer.publish_many, 100 per call (dedup on: a GET + XADD + SET PX per
                   event in one script call; dedup off: XADD only)
- bare drain       XREADGROUP COUNT 100 → msgspec decode → one XACK per batch; 1 and 2
                   processes (same group, distinct consumer names)
- engine drain     Consumer.run with a no-op handler, dedup off and on (retries idle); 1 and
                   2 processes
- end to end       one producer process and one consumer process at once

A drain phase starts on a full stream: a template stream (its group at ``0``) is filled once
per run and COPYed to the phase's stream before the children start, untimed. Each child
connects and builds what it needs, says ``ready`` and waits for ``go``; the phase is timed
from ``go`` to the last XACK (or publish) of any of its children, and ends when the group has
read every event and has nothing pending. Measured per phase:

- events/s: events / (last ack - go), on the machine's monotonic clock;
- consumer CPU per event: the children's own ``getrusage`` (user + sys) from ``go`` to their
  last ack, summed over the phase's children, per event;
- Redis CPU per event: INFO ``used_cpu_sys`` + ``used_cpu_user`` delta from ``go`` to the end
  of the phase, per event.

Phases are interleaved within a round, so noise hits them alike; each figure is the median
over rounds, and each ratio the median of its per-round ratios (the two phases of a ratio
ran minutes apart at most).

Usage: .venv/bin/python benchmarks/throughput.py [--events 100000] [--rounds 3] [--quick]
       [--json out.json] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import json
import linecache
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import redis.asyncio as aioredis

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
from streamproc.consumer import Outcome, Settled  # noqa: E402
from streamproc.groups import group_info  # noqa: E402
from streamproc.logs import configure_logging  # noqa: E402

BATCH = 100
GROUP = "g"
TOPIC = "cluster"
#: XREADGROUP BLOCK of the drains: only waited out once the stream is empty (at stop).
BLOCK_MS = 200
#: Key prefix of this run's template stream (COPYed for each drain phase).
TEMPLATE = f"benchtemplate{os.getpid()}"


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


def cpu_s() -> float:
    """This process's CPU time so far (user + sys)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---------------------------------------------------------------- roles (run in a child)


class Control:
    """A child's side of the protocol: ``ready`` → wait for ``go`` → work → (``stop``) →
    one JSON line with what it did, timed from ``go`` to its last ack or publish."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.events = 0
        self.t_go = self.t_last = 0.0
        self.cpu_go = self.cpu_last = 0.0
        self._stdin: asyncio.StreamReader | None = None
        self._stop_task: asyncio.Task[None] | None = None

    async def ready(self) -> None:
        loop = asyncio.get_running_loop()
        self._stdin = reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        print("ready", flush=True)
        await reader.readline()  # go
        self.t_go = self.t_last = time.monotonic()
        self.cpu_go = self.cpu_last = cpu_s()
        self._stop_task = loop.create_task(self._wait_stop())

    async def _wait_stop(self) -> None:
        assert self._stdin is not None
        await self._stdin.readline()  # "stop", or EOF when the parent is gone
        self.stop.set()

    def mark(self, n: int) -> None:
        """``n`` more events are done (acked or published)."""
        self.events += n
        self.t_last = time.monotonic()
        self.cpu_last = cpu_s()

    def result(self, **extra: Any) -> dict[str, Any]:
        return {
            "events": self.events,
            "t_go": self.t_go,
            "t_last": self.t_last,
            "cpu_s": self.cpu_last - self.cpu_go,
            **extra,
        }


async def role_bare_xadd(a: argparse.Namespace, ctl: Control) -> dict[str, Any]:
    client = connect(RedisSettings(url=a.url))
    codec = Codec(REGISTRY)
    stream = Keys(a.prefix).stream(TOPIC)
    fields = [codec.encode(e) for e in events(a.events, "b")]
    await client.ping()
    await ctl.ready()
    for i in range(0, a.events, BATCH):
        async with client.pipeline(transaction=False) as pipe:
            for f in fields[i : i + BATCH]:
                pipe.xadd(stream, f)  # type: ignore[arg-type]
            ctl.mark(len(await pipe.execute()))
    await client.aclose()
    return ctl.result()


async def role_publish(a: argparse.Namespace, ctl: Control, *, dedup: bool) -> dict[str, Any]:
    client = connect(RedisSettings(url=a.url))
    producer = Producer(
        client,
        Codec(REGISTRY),
        Keys(a.prefix),
        ProducerSettings(dedup_window_ms=600_000 if dedup else 0, high_watermark=10**9),
    )
    evs = events(a.events, f"p{a.name}")
    await client.ping()
    await ctl.ready()
    for i in range(0, a.events, BATCH):
        ctl.mark(len(await producer.publish_many(evs[i : i + BATCH])))
    await client.aclose()
    return ctl.result()


async def role_bare_drain(a: argparse.Namespace, ctl: Control) -> dict[str, Any]:
    """The bare loop: XREADGROUP COUNT 100, msgspec decode, one XACK per batch."""
    client = connect(RedisSettings(url=a.url))
    stream = Keys(a.prefix).stream(TOPIC)
    decoders = {t.type_name().encode(): msgspec.json.Decoder(t) for t in REGISTRY.by_name.values()}
    await client.ping()
    await ctl.ready()
    while not ctl.stop.is_set():
        reply: Any = await client.xreadgroup(
            GROUP, a.name, {stream: ">"}, count=BATCH, block=BLOCK_MS
        )
        if not reply:
            continue
        ids = []
        for entry_id, f in reply[0][1]:
            decoders[f[b"type"]].decode(f[b"data"])
            ids.append(entry_id)
        ctl.mark(int(await client.xack(stream, GROUP, *ids)))
    await client.aclose()
    return ctl.result()


async def noop(event: SpotInterruption, ctx: Context) -> None:
    return None


def engine_consumer(
    client: aioredis.Redis,
    prefix: str,
    name: str,
    *,
    dedup: bool,
    after_settle: Callable[[Sequence[Outcome]], None] | None = None,
) -> Consumer:
    keys = Keys(prefix)
    codec = Codec(REGISTRY)
    return Consumer(
        Concern(group=GROUP, topics=(TOPIC,), handlers={SpotInterruption: noop}, concurrency=10),
        client=client,
        codec=codec,
        keys=keys,
        producer=Producer(client, codec, keys),
        settings=ConsumerSettings(
            consumer=name,
            batch=BATCH,
            block_ms=BLOCK_MS,
            max_in_flight=1000,
            dedup_window_ms=600_000 if dedup else 0,
            trim_interval_ms=0,
        ),
        after_settle=after_settle,
    )


async def role_engine_drain(a: argparse.Namespace, ctl: Control, *, dedup: bool) -> dict[str, Any]:
    client = connect(RedisSettings(url=a.url))

    def settled(outcomes: Sequence[Outcome]) -> None:
        ctl.mark(sum(o.status is Settled.ACKED for o in outcomes))

    consumer = engine_consumer(client, a.prefix, a.name, dedup=dedup, after_settle=settled)
    await client.ping()
    await ctl.ready()
    run = asyncio.create_task(consumer.run())
    await ctl.stop.wait()
    consumer.stop()
    await run
    await client.aclose()
    return ctl.result(stats=consumer.stats.as_dict())


Role = Callable[[argparse.Namespace, Control], Awaitable[dict[str, Any]]]
ROLES: dict[str, Role] = {
    "bare-xadd": role_bare_xadd,
    "publish-dedup": lambda a, c: role_publish(a, c, dedup=True),
    "publish-nodedup": lambda a, c: role_publish(a, c, dedup=False),
    "bare-drain": role_bare_drain,
    "engine-drain-dedup": lambda a, c: role_engine_drain(a, c, dedup=True),
    "engine-drain-nodedup": lambda a, c: role_engine_drain(a, c, dedup=False),
}


async def child_main(a: argparse.Namespace) -> None:
    result = await ROLES[a.role](a, Control())
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------- orchestration


@dataclasses.dataclass(frozen=True)
class Phase:
    """One measured phase: its children's roles; ``drain`` when some of them must be told to
    stop once the group has read and acked every event."""

    name: str
    roles: tuple[str, ...]
    drain: bool = True
    prefilled: bool = True


PHASES = (
    Phase("bare-xadd", ("bare-xadd",), drain=False, prefilled=False),
    Phase("publish-nodedup", ("publish-nodedup",), drain=False, prefilled=False),
    Phase("publish-dedup", ("publish-dedup",), drain=False, prefilled=False),
    Phase("bare-1", ("bare-drain",)),
    Phase("engine-off-1", ("engine-drain-nodedup",)),
    Phase("engine-on-1", ("engine-drain-dedup",)),
    Phase("bare-2", ("bare-drain", "bare-drain")),
    Phase("engine-off-2", ("engine-drain-nodedup", "engine-drain-nodedup")),
    Phase("engine-on-2", ("engine-drain-dedup", "engine-drain-dedup")),
    Phase("end-to-end", ("publish-dedup", "engine-drain-dedup"), prefilled=False),
)
SELF_ENDING = ("bare-xadd", "publish-dedup", "publish-nodedup")


@dataclasses.dataclass
class Figures:
    """One phase in one round."""

    events_per_s: float
    cpu_us: float  # the phase's child processes together, per event
    redis_cpu_us: float  # Redis, per event
    children: list[dict[str, Any]] = dataclasses.field(default_factory=list)


async def spawn(role: str, url: str, prefix: str, n: int, name: str) -> asyncio.subprocess.Process:
    p = await asyncio.create_subprocess_exec(
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
        "--name",
        name,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert p.stdout is not None
    line = await p.stdout.readline()
    if line.strip() != b"ready":
        await p.wait()
        raise SystemExit(f"{role} did not start ({p.returncode}): {line!r}")
    return p


async def say(p: asyncio.subprocess.Process, word: str) -> None:
    assert p.stdin is not None
    p.stdin.write(word.encode() + b"\n")
    await p.stdin.drain()


async def result_of(p: asyncio.subprocess.Process, role: str) -> dict[str, Any]:
    assert p.stdout is not None
    out = await p.stdout.read()
    if await p.wait():
        raise SystemExit(f"{role} failed ({p.returncode})")
    return dict(json.loads(out.strip().splitlines()[-1]))


async def redis_cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


async def drained(
    client: aioredis.Redis, stream: str, n: int, procs: list[asyncio.subprocess.Process]
) -> None:
    """Until the group has read ``n`` entries of ``stream`` and has none pending (polled
    every 10 ms); fails when a child exits first."""
    while True:
        g = await group_info(client, stream, GROUP)
        if g is not None and (g.entries_read or 0) >= n and g.pending == 0:
            return
        if any(p.returncode is not None for p in procs):
            raise SystemExit(f"a child of {stream} exited before the group drained")
        await asyncio.sleep(0.01)


async def run_phase(client: aioredis.Redis, url: str, phase: Phase, prefix: str, n: int) -> Figures:
    stream = Keys(prefix).stream(TOPIC)
    if phase.prefilled:
        await client.copy(Keys(TEMPLATE).stream(TOPIC), stream)
    elif phase.drain:
        await client.xgroup_create(stream, GROUP, id="0", mkstream=True)
    procs = [
        (role, await spawn(role, url, prefix, n, f"{role.split('-')[0]}-{i}"))
        for i, role in enumerate(phase.roles)
    ]
    results: list[dict[str, Any]] = [{} for _ in procs]
    cpu0 = await redis_cpu_s(client)
    t_go = time.monotonic()
    for _, p in procs:
        await say(p, "go")
    for i, (role, p) in enumerate(procs):
        if role in SELF_ENDING:
            results[i] = await result_of(p, role)
    if phase.drain:
        await drained(client, stream, n, [p for r, p in procs if r not in SELF_ENDING])
    redis_s = await redis_cpu_s(client) - cpu0
    for i, (role, p) in enumerate(procs):
        if role not in SELF_ENDING:
            await say(p, "stop")
            results[i] = await result_of(p, role)
    # Checked, not assumed: the phase's producers published, and its consumers acked, every
    # event exactly once.
    ending = [r in SELF_ENDING for r, _ in procs]
    for kind, counts in (
        ("published", [c["events"] for e, c in zip(ending, results, strict=True) if e]),
        ("acked", [c["events"] for e, c in zip(ending, results, strict=True) if not e]),
    ):
        if counts and sum(counts) != n:
            raise SystemExit(f"{phase.name}: {sum(counts)} events {kind}, expected {n}")
    t_end = max(c["t_last"] for c in results)
    return Figures(
        events_per_s=n / (t_end - t_go),
        cpu_us=sum(c["cpu_s"] for c in results) / n * 1e6,
        redis_cpu_us=redis_s / n * 1e6,
        children=results,
    )


async def fill_template(client: aioredis.Redis, n: int) -> None:
    """n events on the template stream, its group at ``0``: COPYed for each drain phase."""
    keys = Keys(TEMPLATE)
    await cleanup(client, keys.prefix)
    await client.xgroup_create(keys.stream(TOPIC), GROUP, id="0", mkstream=True)
    settings = ProducerSettings(dedup_window_ms=0, high_watermark=10**9)
    producer = Producer(client, Codec(REGISTRY), keys, settings)
    evs = events(n, "t")
    for i in range(0, n, 1000):
        await producer.publish_many(evs[i : i + 1000])


async def cleanup(client: aioredis.Redis, prefix: str) -> None:
    batch: list[Any] = []
    async for k in client.scan_iter(match=f"{prefix}:*", count=10_000):
        batch.append(k)
        if len(batch) >= 1000:
            await client.unlink(*batch)
            batch = []
    if batch:
        await client.unlink(*batch)


async def measure(url: str, n: int, rounds: int) -> dict[str, list[Figures]]:
    client = connect(RedisSettings(url=url))
    runs: dict[str, list[Figures]] = {p.name: [] for p in PHASES}
    try:
        await fill_template(client, n)
        for r in range(rounds):
            for phase in PHASES:
                prefix = f"bench{r}{phase.name.replace('-', '')}"
                await cleanup(client, prefix)
                runs[phase.name].append(await run_phase(client, url, phase, prefix, n))
                await cleanup(client, prefix)
                f = runs[phase.name][-1]
                print(
                    f"round {r + 1} {phase.name}: {f.events_per_s:,.0f}/s, "
                    f"{f.cpu_us:.2f} µs CPU, Redis {f.redis_cpu_us:.2f} µs per event",
                    file=sys.stderr,
                    flush=True,
                )
        await cleanup(client, TEMPLATE)
    finally:
        await client.aclose()
    return runs


async def bare_loops(url: str, n: int) -> dict[str, float]:
    """One round of the bare pipelined XADD and the bare drain loop (1 process), events/s:
    the baselines ``streamproc bench`` reports beside its scenarios."""
    client = connect(RedisSettings(url=url))
    phases = {p.name: p for p in PHASES}
    out: dict[str, float] = {}
    try:
        await fill_template(client, n)
        for name, key in (("bare-xadd", "xadd_per_s"), ("bare-1", "drain_per_s")):
            prefix = f"bench{os.getpid()}{name.replace('-', '')}"
            try:
                out[key] = (await run_phase(client, url, phases[name], prefix, n)).events_per_s
            finally:
                await cleanup(client, prefix)
    finally:
        await cleanup(client, TEMPLATE)
        await client.aclose()
    return out


# ---------------------------------------------------------------- report


def med(runs: dict[str, list[Figures]], phase: str, what: str = "events_per_s") -> float:
    return statistics.median(float(getattr(f, what)) for f in runs[phase])


def med_ratio(runs: dict[str, list[Figures]], num: str, den: str, what: str) -> float:
    """Median over rounds of the per-round ratio ``num / den`` of a figure."""
    return statistics.median(
        float(getattr(a, what)) / float(getattr(b, what))
        for a, b in zip(runs[num], runs[den], strict=True)
    )


def scaling_ratio(runs: dict[str, list[Figures]], engine: str, bare: str = "bare") -> float:
    """Median over rounds of (engine 2-vs-1) / (bare 2-vs-1)."""
    return statistics.median(
        (e2.events_per_s / e1.events_per_s) / (b2.events_per_s / b1.events_per_s)
        for e1, e2, b1, b2 in zip(
            runs[f"{engine}-1"],
            runs[f"{engine}-2"],
            runs[f"{bare}-1"],
            runs[f"{bare}-2"],
            strict=True,
        )
    )


def verdict(value: float, target: float, *, at_most: bool = False) -> str:
    ok = value <= target if at_most else value >= target
    return "pass" if ok else "**miss**"


def spread(runs: dict[str, list[Figures]], phase: str, what: str, fmt: str) -> str:
    vals = [getattr(f, what) for f in runs[phase]]
    if len(vals) == 1:
        return ""
    return f"{format(min(vals), fmt)}-{format(max(vals), fmt)}"


def report(runs: dict[str, list[Figures]], n: int, rounds: int) -> str:
    def row(label: str, phase: str, ratio: str = "", target: str = "", ok: str = "") -> str:
        return (
            f"| {label} | {med(runs, phase):,.0f} | {spread(runs, phase, 'events_per_s', ',.0f')} "
            f"| {ratio} | {target} | {ok} |"
        )

    def cpu_row(label: str, phase: str, what: str, ratio: str, target: str, ok: str) -> str:
        return (
            f"| {label} | {med(runs, phase, what):.2f} µs | {spread(runs, phase, what, '.2f')} "
            f"| {ratio} | {target} | {ok} |"
        )

    r_off = med_ratio(runs, "engine-off-1", "bare-1", "events_per_s")
    r_on_off = med_ratio(runs, "engine-on-1", "engine-off-1", "events_per_s")
    b21 = med_ratio(runs, "bare-2", "bare-1", "events_per_s")
    e21 = med_ratio(runs, "engine-off-2", "engine-off-1", "events_per_s")
    d21 = med_ratio(runs, "engine-on-2", "engine-on-1", "events_per_s")
    s_off = scaling_ratio(runs, "engine-off")
    s_on = scaling_ratio(runs, "engine-on")
    c_off = med_ratio(runs, "engine-off-1", "bare-1", "cpu_us")
    c_on = med_ratio(runs, "engine-on-1", "bare-1", "cpu_us")
    rc_off = med_ratio(runs, "engine-off-1", "bare-1", "redis_cpu_us")
    rc_on = med_ratio(runs, "engine-on-1", "bare-1", "redis_cpu_us")
    rc_on_off = med_ratio(runs, "engine-on-1", "engine-off-1", "redis_cpu_us")
    p_off = med_ratio(runs, "publish-nodedup", "bare-xadd", "events_per_s")
    p_on = med_ratio(runs, "publish-dedup", "bare-xadd", "events_per_s")
    lines = [
        f"| figure ({n:,} events, batch {BATCH}, median of {rounds}) | median | range "
        "| ratio | target | verdict |",
        "|---|---:|---:|---|---|---|",
        "| **Drain, events/s** | | | | | |",
        row("bare loop, 1 process", "bare-1", "1.00", "baseline"),
        row(
            "Consumer, dedup off, 1 process",
            "engine-off-1",
            f"{r_off:.2f} of bare",
            ">= 0.60 of bare",
            verdict(r_off, 0.60),
        ),
        row(
            "Consumer, dedup on, 1 process",
            "engine-on-1",
            f"{r_on_off:.2f} of dedup off",
            ">= 0.75 of dedup off",
            verdict(r_on_off, 0.75),
        ),
        row("bare loop, 2 processes", "bare-2", f"2-vs-1 {b21:.2f}", "baseline scaling"),
        row(
            "Consumer, dedup off, 2 processes",
            "engine-off-2",
            f"2-vs-1 {e21:.2f}; {s_off:.2f} of bare's",
            ">= 0.9 of bare's 2-vs-1",
            verdict(s_off, 0.9),
        ),
        row(
            "Consumer, dedup on, 2 processes",
            "engine-on-2",
            f"2-vs-1 {d21:.2f}; {s_on:.2f} of bare's",
            "(0.9 of bare's)",
            verdict(s_on, 0.9),
        ),
        "| **Consumer process CPU per event** (getrusage user+sys) | | | | | |",
        cpu_row("bare loop", "bare-1", "cpu_us", "1.00", "baseline", ""),
        cpu_row("Consumer, dedup off", "engine-off-1", "cpu_us", f"{c_off:.2f}x bare", "", ""),
        cpu_row("Consumer, dedup on", "engine-on-1", "cpu_us", f"{c_on:.2f}x bare", "", ""),
        "| **Redis CPU per event** (INFO used_cpu_sys+user) | | | | | |",
        cpu_row("bare loop", "bare-1", "redis_cpu_us", "1.00", "baseline", ""),
        cpu_row(
            "Consumer, dedup off",
            "engine-off-1",
            "redis_cpu_us",
            f"{rc_off:.2f}x bare",
            "<= 2x bare",
            verdict(rc_off, 2.0, at_most=True),
        ),
        cpu_row(
            "Consumer, dedup on",
            "engine-on-1",
            "redis_cpu_us",
            f"{rc_on:.2f}x bare; {rc_on_off:.2f}x dedup off",
            "<= 2x bare",
            verdict(rc_on, 2.0, at_most=True),
        ),
        "| **Publish, events/s** | | | | | |",
        row("bare pipelined XADD", "bare-xadd", "1.00", "baseline"),
        row(
            "Producer.publish_many, dedup off",
            "publish-nodedup",
            f"{p_off:.2f} of bare",
            ">= 0.70 of bare",
            verdict(p_off, 0.70),
        ),
        row("Producer.publish_many, dedup on", "publish-dedup", f"{p_on:.2f} of bare"),
        row("end to end: 1 producer + 1 consumer process at once, dedup on", "end-to-end"),
    ]
    return "\n".join(lines)


def machine() -> str:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        redis = subprocess.run(
            ["redis-server", "--version"], capture_output=True, text=True, check=False
        ).stdout.split()[2]
    except (OSError, IndexError):
        redis = "?"
    return (
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, nproc {os.cpu_count()}, "
        f"{model}, Python {platform.python_version()}, redis-server {redis}"
    )


# ---------------------------------------------------------------- profile


#: Where the profile's stage table splits the engine's CPU.
STAGES = (
    "Consumer._reader_loop",
    "Reader.read",
    "Reader._admit",
    "Consumer._worker",
    "Handlers.run",
    "Codec.decode",
    "Consumer._settler_loop",
    "Settler.settle",
    "Settler._send",
    "Settler._apply",
    "Consumer._upkeep_loop",
    "Consumer._retry_loop",
)


class CpuSampler:
    """A CPU-time sampling profiler: SIGPROF every ``interval_s`` of this process's CPU time
    (ITIMER_PROF; the kernel fires it on scheduler ticks, so in practice every 4 ms of CPU on
    a 250 Hz kernel) records the running Python stack; samples are weighted by the CPU
    time getrusage measured over the same span. Unlike cProfile it does not tax every
    call (which inflates small, frequent functions several fold), and unlike wall-clock
    samplers it does not count time spent preempted on a shared machine. Time in C code
    (hiredis, msgspec, the loop, syscalls) is charged to the Python frame that runs next,
    usually its caller."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.stacks: collections.Counter[tuple[tuple[str, str, int], ...]] = collections.Counter()

    def _sample(self, signum: int, frame: types.FrameType | None) -> None:
        stack = []
        while frame is not None:
            code = frame.f_code
            stack.append((code.co_filename, code.co_qualname, frame.f_lineno))
            frame = frame.f_back
        self.stacks[tuple(stack)] += 1

    def __enter__(self) -> CpuSampler:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, self.interval_s, self.interval_s)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, signal.SIG_DFL)

    def table(self, n: int, cpu_s: float, top: int = 15) -> str:
        """Own and inclusive CPU per event of the costliest functions, with their costliest
        line, as markdown; ``cpu_s`` is the CPU time the samples cover."""
        own: collections.Counter[tuple[str, str]] = collections.Counter()
        total: collections.Counter[tuple[str, str]] = collections.Counter()
        lines: collections.Counter[tuple[str, str, int]] = collections.Counter()
        for stack, count in self.stacks.items():
            file, func, line = stack[0]
            own[file, func] += count
            lines[file, func, line] += count
            for key in {(f, fn) for f, fn, _ in stack}:
                total[key] += count
        samples = sum(self.stacks.values())
        per_event_us = cpu_s / max(1, samples) / n * 1e6
        out = [
            f"{samples:,} samples over {cpu_s:.2f} s of CPU ({cpu_s / n * 1e6:.2f} µs per event)",
            "",
            "| own CPU per event | share | with callees | function | costliest line |",
            "|---:|---:|---:|---|---|",
        ]
        for (file, func), count in own.most_common(top):
            line = max(
                ((ln, c) for (f, fn, ln), c in lines.items() if (f, fn) == (file, func)),
                key=lambda lc: lc[1],
            )[0]
            where = Path(file).relative_to(ROOT) if file.startswith(str(ROOT)) else Path(file).name
            text = linecache.getline(file, line).strip().replace("|", "\\|")[:70]
            out.append(
                f"| {count * per_event_us:.2f} µs | {count / samples:.0%} "
                f"| {total[file, func] * per_event_us:.2f} µs | `{func}` ({where}) "
                f"| {line}: `{text}` |"
            )
        out += ["", "| stage (with callees) | CPU per event | share |", "|---|---:|---:|"]
        for (_, name), count in total.most_common():
            if name in STAGES:
                out.append(f"| `{name}` | {count * per_event_us:.2f} µs | {count / samples:.0%} |")
        return "\n".join(out)


async def profile_engine_drain(url: str, n: int) -> None:
    """One engine drain (dedup off) of ``n`` prefilled events in this process under the CPU
    sampler; prints the costliest functions per event."""
    client = connect(RedisSettings(url=url))
    prefix = "benchprofile"
    await cleanup(client, prefix)
    await fill_template(client, n)
    await client.copy(Keys(TEMPLATE).stream(TOPIC), Keys(prefix).stream(TOPIC))
    done = asyncio.Event()

    def settled(outcomes: Sequence[Outcome]) -> None:
        if consumer.stats.acked >= n:
            done.set()

    consumer = engine_consumer(client, prefix, "profile", dedup=False, after_settle=settled)
    cpu0 = cpu_s()
    with CpuSampler() as sampler:
        run = asyncio.create_task(consumer.run())
        await done.wait()
    cpu = cpu_s() - cpu0
    consumer.stop()
    await run
    await cleanup(client, prefix)
    await cleanup(client, TEMPLATE)
    await client.aclose()
    print(f"engine drain, dedup off, {n:,} events")
    print(sampler.table(n, cpu))


# ---------------------------------------------------------------- entry point


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--events", type=int, default=100_000, help="events per phase")
    ap.add_argument("--rounds", type=int, default=3, help="median of N rounds")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20,000 events, 1 round")
    ap.add_argument("--json", type=Path, help="write every round's figures here")
    ap.add_argument(
        "--profile", action="store_true", help="profile one engine drain (dedup off) instead"
    )
    ap.add_argument("--role", choices=sorted(ROLES), help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="c", help=argparse.SUPPRESS)
    a = ap.parse_args()
    configure_logging("warning")
    if a.role:
        run_async(child_main(a))
        return
    if a.quick:
        a.events, a.rounds = 20_000, 1
    url = os.environ.get("REDIS_URL")
    server = None
    if not url:
        from streamproc.embedded import EmbeddedRedis

        server = EmbeddedRedis(Path(tempfile.mkdtemp(prefix="sp-bench-")), appendonly=False)
        url = server.start().url
    try:
        if a.profile:
            run_async(profile_engine_drain(url, a.events))
            return
        runs = run_async(measure(url, a.events, a.rounds))
    finally:
        if server is not None:
            server.stop()
    print(f"# throughput — {machine()}")
    print(report(runs, a.events, a.rounds))
    if a.json:
        body = {
            "events": a.events,
            "rounds": a.rounds,
            "machine": machine(),
            "phases": {k: [dataclasses.asdict(f) for f in v] for k, v in runs.items()},
        }
        a.json.write_text(json.dumps(body, indent=2))


if __name__ == "__main__":
    main()
