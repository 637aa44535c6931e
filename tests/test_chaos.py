"""Chaos: consumers SIGKILLed at random, Redis killed and restarted, Redis paused (SIGSTOP),
connections cut and stalled (a TCP proxy), Redis full at maxmemory. Nothing lost, nothing twice,
no consumer crashed.

Bounded in count and time. STREAMPROC_CHAOS_SCALE scales the event counts and the number of
disruptions (default 1: each scenario well under a minute on 2 cores); run longer locally with
e.g. STREAMPROC_CHAOS_SCALE=10. STREAMPROC_CHAOS_SEED picks other random moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
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
from streamproc.embedded import EmbeddedRedis
from streamproc.errors import PublishError
from tests.helpers import entries, spot
from tests.tcpproxy import TcpProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow, pytest.mark.serial]

SCALE = float(os.environ.get("STREAMPROC_CHAOS_SCALE", "1"))
SEED = int(os.environ.get("STREAMPROC_CHAOS_SEED", "7"))
ROOT = Path(__file__).resolve().parent.parent
#: The chaos consumers' min_idle_ms (tests/chaos_worker.py): pauses are made longer than it.
MIN_IDLE_MS = 1000


def start_worker(name: str, redis_url: str, keys: Keys) -> subprocess.Popen[bytes]:
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    return subprocess.Popen(
        [sys.executable, "-m", "tests.chaos_worker", name],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def test_consumers_killed_at_random_apply_every_effect_exactly_once(
    redis_url: str, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    total = int(20_000 * SCALE)
    await client.xgroup_create(keys.stream("cluster"), "chaos", id="0", mkstream=True)
    names = ["w0", "w1", "w2"]
    workers = {n: start_worker(n, redis_url, keys) for n in names}
    kills = 0
    rng = random.Random(7)
    started = time.monotonic()
    try:
        published = 0
        next_kill = time.monotonic() + 1.0
        deadline = time.monotonic() + 60 + 30 * SCALE
        while time.monotonic() < deadline:
            if published < total:
                batch = [spot(published + i) for i in range(min(500, total - published))]
                await producer.publish_many(batch)
                published += len(batch)
            if time.monotonic() >= next_kill and (published < total or kills < 5):
                victim = rng.choice(names)
                workers[victim].send_signal(signal.SIGKILL)
                workers[victim].wait()
                workers[victim] = start_worker(victim, redis_url, keys)
                kills += 1
                next_kill = time.monotonic() + rng.uniform(0.7, 1.3)
            done = await client.hlen(keys.state("effects"))
            if published == total and done == total and kills >= 5:
                summary: Any = await client.xpending(keys.stream("cluster"), "chaos")
                if summary["pending"] == 0:
                    break
            await asyncio.sleep(0.05 if published >= total else 0)
    finally:
        for p in workers.values():
            p.send_signal(signal.SIGTERM)
        for p in workers.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    elapsed = time.monotonic() - started
    counts = await client.hgetall(keys.state("effects"))
    twice = {k: v for k, v in counts.items() if v != b"1"}
    pending: Any = await client.xpending(keys.stream("cluster"), "chaos")
    dead = await client.xlen(keys.dlq("cluster", "chaos"))
    print(
        f"\nchaos: {total} events, 3 consumers, {kills} SIGKILLs, {elapsed:.1f}s "
        f"({total / elapsed:.0f} events/s through the kills); effects applied: {len(counts)}, "
        f"more than once: {len(twice)}, pending: {pending['pending']}, dead letters: {dead}"
    )
    assert kills >= 5
    assert len(counts) == total
    assert twice == {}
    assert pending["pending"] == 0
    assert dead == 0


@pytest.mark.parametrize("appendfsync", ["always", "everysec"])
async def test_redis_killed_and_restarted_with_aof(
    tmp_path: Path, keys: Keys, codec: Codec[Any], appendfsync: str
) -> None:
    """Publishing and consuming go on across a SIGKILLed Redis. With appendfsync always no
    publish that returned is lost; with everysec the loss window is measured and printed."""
    server = EmbeddedRedis(tmp_path / "redis", appendfsync=appendfsync).start()
    settings = RedisSettings(
        url=server.url, key_prefix=keys.prefix, socket_timeout_s=1, connect_timeout_s=0.5
    )
    client = connect(settings)
    producer = Producer(client, codec, keys, ProducerSettings(), retry_timeout_s=20)

    async def record(event: SpotInterruption, ctx: Context) -> None:
        ctx.effect("HINCRBY", ctx.keys.state("effects"), event.id, 1)

    consumer = Consumer(
        Concern(group="g", topics=("cluster",), handlers={SpotInterruption: record}),
        client=connect(settings),
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1", block_ms=200, min_idle_ms=1000),
    )
    running = asyncio.create_task(consumer.run())
    returned: list[str] = []
    ids: list[str] = []
    # 500 publishes each side of the kill prove what 1,500 did (with "always" what returned
    # before it is kept; both ride out the restart); one at a time, waiting on an fsync with
    # "always", they are most of the test's time. STREAMPROC_CHAOS_SCALE raises the count (to
    # 9,000 at most, as before).
    total = int(1000 * min(SCALE, 9))
    try:
        for i in range(total):
            event = spot(i)
            returned.append(await producer.publish(event))
            ids.append(event.id)
            if i == total // 2:
                server.stop(kill=True)
                server.start()  # same port and folder: the AOF is replayed
        for _ in range(600):
            if await client.hlen(keys.state("effects")) >= total:
                break
            await asyncio.sleep(0.05)
        present = {i.decode() for i, _ in await entries(client, keys.stream("cluster"))}
        lost = [r for r in returned if r not in present]
        counts = await client.hgetall(keys.state("effects"))
        print(
            f"\nappendfsync {appendfsync}: {len(returned)} publishes returned, "
            f"{len(lost)} lost by the crash; effects applied {len(counts)}, "
            f"twice {sum(v != b'1' for v in counts.values())}"
        )
        if appendfsync == "always":
            assert lost == []
            assert len(counts) == total
            assert all(v == b"1" for v in counts.values())
        else:
            # everysec: up to ~1 s of writes may go; what survived is applied exactly once
            assert all(v == b"1" for v in counts.values())
        assert consumer.ready
    finally:
        consumer.stop()
        await running
        await consumer.client.aclose()
        await client.aclose()
        server.stop()


# ---------------------------------------------------------------------- outages, one by one
#
# Each scenario below starts its own redis-server and three consumer processes (never
# restarted: one that exits has crashed), publishes events at a steady rate while a
# disruption runs at random moments, waits for the consumers to catch up and then checks:
# every event's effect applied exactly once, nothing pending in any group, no retry waiting,
# no dead letter, every consumer alive until stopped and stopped cleanly by SIGTERM.


class Fleet:
    """The chaos consumers: ``tests.chaos_worker`` processes, each with its own log file and
    handler-run file."""

    def __init__(self, folder: Path, redis_url: str, keys: Keys, env: dict[str, str]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix, **env}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, *names: str) -> None:
        for name in names:
            with open(self.folder / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "tests.chaos_worker", name],
                    cwd=ROOT,
                    env={**self.env, "CHAOS_RUNS_FILE": str(self.folder / f"{name}.runs")},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

    def exited(self) -> dict[str, int]:
        """Consumers no longer running, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self, timeout_s: float = 20.0) -> dict[str, int | None]:
        """SIGTERM each one still running; its exit code, or None if it had to be killed."""
        running = {n: p for n, p in self.procs.items() if p.poll() is None}
        for p in running.values():
            p.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout_s
        for name, p in running.items():
            try:
                codes[name] = p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
                codes[name] = None
        return codes

    def log_tail(self, name: str, lines: int = 25) -> str:
        text = (self.folder / f"{name}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def runs(self) -> Counter[str]:
        """Handler starts per ``<event id>/<attempt>``, across every consumer."""
        counted: Counter[str] = Counter()
        for f in self.folder.glob("*.runs"):
            counted.update(line.split()[0] for line in f.read_text().splitlines() if line)
        return counted


@dataclass
class Chaos:
    """What a disruption works with."""

    server: EmbeddedRedis
    client: aioredis.Redis
    rng: random.Random
    proxy: TcpProxy | None = None
    #: Publishes Redis refused with OOM (each retried until it went in); set on each.
    refused: int = 0
    oom: asyncio.Event = field(default_factory=asyncio.Event)
    #: What the disruption did, for the summary line.
    did: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    total: int
    effects: dict[bytes, bytes]
    pending: dict[str, int]
    delayed: int
    dead: int
    crashed: dict[str, int]
    stop_codes: dict[str, int | None]
    runs: Counter[str]
    elapsed_s: float
    logs: dict[str, str]

    def problems(self, *, each_handler_once: bool = True) -> list[str]:
        """Every broken promise, in words (empty: all held)."""
        out: list[str] = []
        if self.crashed:
            out.append(f"consumers exited before being stopped (crashed): {self.crashed}")
        unclean = {n: c for n, c in self.stop_codes.items() if c != 0}
        if unclean:
            out.append(f"consumers that did not stop cleanly on SIGTERM (code): {unclean}")
        if len(self.effects) != self.total:
            out.append(f"effects applied for {len(self.effects)} of {self.total} events")
        twice = {k: v for k, v in self.effects.items() if v != b"1"}
        if twice:
            out.append(f"effects applied more than once: {len(twice)} events, e.g. {_few(twice)}")
        if any(self.pending.values()):
            out.append(f"entries still pending: {self.pending}")
        if self.delayed:
            out.append(f"retries still waiting: {self.delayed}")
        if self.dead:
            out.append(f"dead letters: {self.dead}")
        stolen = {k: n for k, n in self.runs.items() if n > 1}
        if each_handler_once and stolen:
            out.append(
                f"handlers ran more than once for the same attempt (work taken from a consumer "
                f"still on it): {len(stolen)} events, e.g. {_few(stolen)}"
            )
        for name in sorted({*self.crashed, *unclean}):
            out.append(f"--- {name}'s log, last lines:\n{self.logs.get(name, '')}")
        return out


def _few(d: dict[Any, Any]) -> dict[Any, Any]:
    return dict(list(d.items())[:3])


async def _pending_everywhere(client: aioredis.Redis, keys: Keys) -> dict[str, int]:
    """Pending entries per stream and group, for every stream under the test's prefix."""
    out: dict[str, int] = {}
    async for key in client.scan_iter(match=f"{keys.prefix}:*", _type="stream"):
        for g in await client.xinfo_groups(key):
            name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
            out[f"{key.decode()} {name}"] = int(g["pending"])
    return out


async def _until_reading(client: aioredis.Redis, keys: Keys, fleet: Fleet) -> None:
    """Wait (30 s at most) until every consumer of the fleet has read from the group once,
    or one of them exited (then the outcome reports it)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not fleet.exited():
        consumers: Any = await client.xinfo_consumers(keys.stream("cluster"), "chaos")
        names = {
            c["name"].decode() if isinstance(c["name"], bytes) else c["name"] for c in consumers
        }
        if names >= set(fleet.procs):
            return
        await asyncio.sleep(0.05)


async def _publish(
    producer: Producer, events: Sequence[SpotInterruption], rate_per_s: float, chaos: Chaos
) -> None:
    """Publish in batches at a steady rate; a batch refused with OOM is sent again later
    (the refused script wrote nothing: its first write was refused)."""
    started = time.monotonic()
    for at in range(0, len(events), 50):
        batch = events[at : at + 50]
        while True:
            try:
                await producer.publish_many(batch)
                break
            except PublishError as e:
                if "OOM" not in str(e) and "maxmemory" not in str(e):  # inside a script: no code
                    raise
                chaos.refused += 1
                chaos.oom.set()
                await asyncio.sleep(0.1)
        ahead_s = started + (at + len(batch)) / rate_per_s - time.monotonic()
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)


async def run_chaos(
    tmp_path: Path,
    keys: Keys,
    codec: Codec[Any],
    disrupt: Callable[[Chaos], Awaitable[None]],
    *,
    total: int,
    publish_s: float,
    env: dict[str, str] | None = None,
    proxied: bool = False,
    catch_up_s: float = 30.0,
) -> tuple[Outcome, Chaos]:
    """Three consumers, ``total`` events published over ``publish_s`` while ``disrupt`` runs;
    then wait (up to ``catch_up_s``) for every effect and an empty PEL, stop, collect."""
    server = EmbeddedRedis(tmp_path / "redis", appendonly=False).start()
    proxy = TcpProxy("127.0.0.1", server.port).start() if proxied else None
    settings = RedisSettings(url=server.url, key_prefix=keys.prefix, socket_timeout_s=15)
    client = connect(settings)
    producer = Producer(client, codec, keys, ProducerSettings(), retry_timeout_s=30)
    chaos = Chaos(server, client, random.Random(SEED), proxy)
    fleet = Fleet(tmp_path / "consumers", proxy.url if proxy else server.url, keys, env or {})
    started = time.monotonic()
    try:
        await client.xgroup_create(keys.stream("cluster"), "chaos", id="0", mkstream=True)
        fleet.start("w0", "w1", "w2")
        await _until_reading(client, keys, fleet)  # disruptions hit running consumers
        events = [spot(i) for i in range(total)]
        await asyncio.gather(_publish(producer, events, total / publish_s, chaos), disrupt(chaos))
        deadline = time.monotonic() + catch_up_s
        while time.monotonic() < deadline and len(fleet.exited()) < len(fleet.procs):
            if await client.hlen(keys.state("effects")) >= total and not any(
                (await _pending_everywhere(client, keys)).values()
            ):
                break
            await asyncio.sleep(0.1)
        crashed = fleet.exited()
        stop_codes = fleet.stop()
        effects: Any = await client.hgetall(keys.state("effects"))
        outcome = Outcome(
            total=total,
            effects=effects,
            pending=await _pending_everywhere(client, keys),
            delayed=await client.zcard(keys.delayed("cluster", "chaos")),
            dead=await client.xlen(keys.dlq("cluster", "chaos")),
            crashed=crashed,
            stop_codes=stop_codes,
            runs=fleet.runs(),
            elapsed_s=time.monotonic() - started,
            logs={n: fleet.log_tail(n) for n in fleet.procs},
        )
    finally:
        fleet.stop()
        if proxy is not None:
            proxy.stop()
        await client.aclose()
        server.stop()
    print(
        f"\n{total} events, 3 consumers, {outcome.elapsed_s:.1f}s; {'; '.join(chaos.did)}; "
        f"effects applied {len(outcome.effects)}, more than once "
        f"{sum(v != b'1' for v in outcome.effects.values())}; handler runs > 1: "
        f"{sum(n > 1 for n in outcome.runs.values())}; pending {sum(outcome.pending.values())}; "
        f"dead letters {outcome.dead}; crashed {outcome.crashed}; SIGTERM exit {stop_codes}"
    )
    return outcome, chaos


@pytest.mark.timeout(int(150 * max(SCALE, 1)))
async def test_redis_paused_longer_than_min_idle_steals_nothing_and_loses_nothing(
    tmp_path: Path, keys: Keys, codec: Codec[Any]
) -> None:
    """SIGSTOP Redis for 1.5-2.5x the consumers' min_idle_ms, then SIGCONT, several times.
    Every in-flight entry then looks idle on Redis' clock, but no consumer died: a consumer
    that takes another's entries runs its handler a second time (issue 11, A6). The consumers'
    socket timeout (1 s) is shorter than the pauses: to them Redis is down, then back, while
    their settles and renewals wait to be sent again."""
    pauses = max(3, round(4 * SCALE))

    async def pause_redis(chaos: Chaos) -> None:
        assert chaos.server.proc is not None  # (os.kill(0, ...) would stop this process group)
        pid = chaos.server.proc.pid
        for _ in range(pauses):
            await asyncio.sleep(chaos.rng.uniform(1.0, 2.0))
            stopped_s = MIN_IDLE_MS / 1000 * chaos.rng.uniform(1.5, 2.5)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(stopped_s)
            finally:
                os.kill(pid, signal.SIGCONT)
            chaos.did.append(f"paused {stopped_s:.1f}s")

    outcome, _ = await run_chaos(
        tmp_path,
        keys,
        codec,
        pause_redis,
        total=int(3000 * SCALE),
        publish_s=12 * SCALE,
        env={
            "CHAOS_MIN_IDLE_MS": str(MIN_IDLE_MS),
            "CHAOS_HANDLER_MAX_MS": "50",
            "CHAOS_SOCKET_TIMEOUT_S": "1",
        },
    )
    problems = outcome.problems(each_handler_once=True)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(int(150 * max(SCALE, 1)))
async def test_connections_cut_stalled_and_refused_lose_nothing_and_apply_nothing_twice(
    tmp_path: Path, keys: Keys, codec: Codec[Any]
) -> None:
    """The consumers reach Redis through a TCP proxy that, at random moments, cuts every
    connection, stalls traffic (shorter than min_idle_ms, or longer than it and than the
    consumers' 2 s socket timeout), or takes Redis away (cut, refuse new connections) for
    1.2-2.5x min_idle_ms. A cut may make a consumer read an entry again, never run the same
    attempt twice: after an outage no consumer may take entries whose owner had no chance to
    renew them yet (issue 11, A6)."""
    actions = max(8, round(12 * SCALE))

    async def break_network(chaos: Chaos) -> None:
        proxy = chaos.proxy
        assert proxy is not None
        # every kind as often as the others, in a random order, at random moments
        kinds = ["cut", "short stall", "long stall", "down"] * -(-actions // 4)
        chaos.rng.shuffle(kinds)
        for kind in kinds[:actions]:
            await asyncio.sleep(chaos.rng.uniform(0.3, 1.0))
            if kind == "cut":
                chaos.did.append(f"cut {proxy.cut()}")
            elif kind.endswith("stall"):
                # short: under min_idle_ms; long: over it and over the 2 s socket timeout
                low, high = (0.2, 0.9) if kind == "short stall" else (2.2, 3.0)
                stall_s = chaos.rng.uniform(low, high)
                await asyncio.wrap_future(proxy.stall(stall_s))
                chaos.did.append(f"stalled {stall_s:.1f}s")
            else:
                down_s = chaos.rng.uniform(1.2, 2.5)
                proxy.refuse(True)
                proxy.cut()
                await asyncio.sleep(down_s)
                proxy.refuse(False)
                chaos.did.append(f"down {down_s:.1f}s")

    outcome, chaos = await run_chaos(
        tmp_path,
        keys,
        codec,
        break_network,
        total=int(4000 * SCALE),
        publish_s=15 * SCALE,
        env={
            "CHAOS_MIN_IDLE_MS": str(MIN_IDLE_MS),
            "CHAOS_HANDLER_MAX_MS": "200",  # entries in flight when the network breaks
            "CHAOS_CONCURRENCY": "16",
            "CHAOS_SOCKET_TIMEOUT_S": "2",
        },
        proxied=True,
    )
    assert len(chaos.did) == actions
    problems = outcome.problems(each_handler_once=True)
    assert not problems, "\n".join(problems)


@pytest.mark.timeout(int(150 * max(SCALE, 1)))
async def test_redis_full_at_maxmemory_is_an_outage_not_a_crash(
    tmp_path: Path, keys: Keys, codec: Codec[Any]
) -> None:
    """maxmemory is set just above what Redis uses (noeviction) until publishing answers OOM;
    held a few seconds, then raised again. Consumers must ride it out (issue 11, A5): today an
    OOM reply crashes them. When memory stays flat (the consumers trim as fast as events
    come, as in the later rounds of a long run), the limit goes down to what is used: full
    all the same."""
    rounds = max(2, round(2 * SCALE))

    async def used_memory(c: aioredis.Redis) -> int:
        return int((await c.info("memory"))["used_memory"])

    async def fill_redis(chaos: Chaos) -> None:
        c = chaos.client
        await c.config_set("maxmemory-policy", "noeviction")
        for _ in range(rounds):
            await asyncio.sleep(chaos.rng.uniform(1.0, 2.0))
            await c.config_set("maxmemory", await used_memory(c) + 256 * 1024)
            refused, full_at = chaos.refused, time.monotonic()
            chaos.oom.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(chaos.oom.wait(), 5)
            if not chaos.oom.is_set():  # flat: no room to grow into, so take the room away
                await c.config_set("maxmemory", max(1, await used_memory(c) - 64 * 1024))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(chaos.oom.wait(), 15)
            reached_s = time.monotonic() - full_at
            await asyncio.sleep(3.0)  # hold it full
            await c.config_set("maxmemory", 0)
            chaos.did.append(
                f"full after {reached_s:.1f}s, {chaos.refused - refused} publishes refused"
            )
            assert chaos.refused > refused, "publishing never answered OOM: Redis never filled"

    outcome, chaos = await run_chaos(
        tmp_path,
        keys,
        codec,
        fill_redis,
        total=int(3000 * SCALE),
        publish_s=15 * SCALE,
        env={"CHAOS_MIN_IDLE_MS": str(MIN_IDLE_MS), "CHAOS_HANDLER_MAX_MS": "10"},
    )
    assert chaos.refused > 0
    problems = outcome.problems(each_handler_once=True)
    assert not problems, "\n".join(problems)
