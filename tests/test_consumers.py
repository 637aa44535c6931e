"""Consumer processes with liveness: their heartbeat records, ``streamproc consumers``, and
``check``/``inspect`` failing when a group has work waiting and no live consumer."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from schemas import SpotInterruption
from streamproc import Keys, Producer, presence
from streamproc.consumer import Consumer
from streamproc.dashboard.consumers import CONSUMERS_PANEL
from streamproc.inspect import breaches, collect
from tests.helpers import MakeConsumer, cli_in_process, spot
from tests.test_dashboard import login, serving_panels

GROUP = "cluster-events"


async def _handled(consumer: Consumer, producer: Producer, n: int) -> None:
    for i in range(n):
        await producer.publish(spot(i))
    while await consumer.process_once():
        pass


async def _silence(client: aioredis.Redis, keys: Keys, minutes: int) -> None:
    """Make every record look as if it last beat ``minutes`` ago (no waiting for it)."""
    secs, _ = await client.time()
    fields: list[bytes] = await client.zrange(keys.consumers_seen(), 0, -1)  # type: ignore[assignment]
    at = (int(secs) - minutes * 60) * 1000
    await client.zadd(keys.consumers_seen(), dict.fromkeys(fields, at))


def _env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}


async def _cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], env: Any, *args: str
) -> Any:
    # ``main`` runs its own event loop: in a thread, as tests/test_health.py does.
    return await asyncio.to_thread(cli_in_process, monkeypatch, capsys, env, *args)


async def test_a_running_consumer_is_online_with_its_groups_and_counts(
    client: aioredis.Redis, keys: Keys, producer: Producer, make_consumer: MakeConsumer
) -> None:
    """One process, two groups: one record each, shown as one online process."""
    fail = {"n": 0}

    async def ok(event: Any, ctx: Any) -> None:
        if event.instance_id == "i-0" and not fail["n"]:
            fail["n"] += 1
            raise RuntimeError("once")

    first = make_consumer({SpotInterruption: ok}, name="w1", group="g1")
    second = make_consumer({SpotInterruption: ok}, name="w2", group="g2")
    for c in (first, second):
        await c.ensure_groups()
    await _handled(first, producer, 3)
    await first.report_presence()
    await second.report_presence()

    now_ms, procs = await presence.processes(client, keys)
    assert len(procs) == 1
    p = procs[0]
    assert p.online
    assert (p.host, p.pid) == (socket.gethostname(), os.getpid())
    assert [(m.group, m.name, m.online) for m in p.groups] == [
        ("g1", "w1", True),
        ("g2", "w2", True),
    ]
    assert (p.groups[0].processed, p.groups[0].failed) == (2, 1)  # c0 failed once: a retry
    assert (p.processed, p.failed, p.in_flight) == (2, 1, 0)
    assert p.version == presence.version() != ""
    assert now_ms - p.last_seen_ms < 60_000


async def test_a_stopped_consumer_is_offline_at_once_and_a_silent_one_later(
    client: aioredis.Redis, keys: Keys, make_consumer: MakeConsumer
) -> None:
    consumer = make_consumer({}, name="w1", group="g1", min_idle_ms=3000)
    started = asyncio.Event()
    task = asyncio.create_task(consumer.run(started=started))
    await started.wait()
    _, procs = await presence.processes(client, keys)
    assert [p.online for p in procs] == [True]  # written at start, before the first beat
    consumer.stop()
    await task
    _, procs = await presence.processes(client, keys)
    assert [p.online for p in procs] == [False]  # it said it stopped
    assert procs[0].groups[0].name == "w1"

    await consumer.report_presence()  # alive again, then silent for 10 minutes
    assert [p.online for p in (await presence.processes(client, keys))[1]] == [True]
    await _silence(client, keys, 10)
    assert [p.online for p in (await presence.processes(client, keys))[1]] == [False]
    await _silence(client, keys, 61)  # after an hour a record is dropped on the next beat
    await make_consumer({}, name="w9", group="g9").report_presence()
    _, procs = await presence.processes(client, keys)
    assert [m.name for p in procs for m in p.groups] == ["w9"]
    assert await client.hlen(keys.consumers()) == 1
    assert 0 < await client.pttl(keys.consumers()) <= presence.KEEP_MS


async def test_consumers_command_lists_online_first_and_offline_with_all(
    client: aioredis.Redis,
    keys: Keys,
    make_consumer: MakeConsumer,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(redis_url, keys)
    empty = await _cli(monkeypatch, capsys, env, "consumers")
    assert empty.returncode == 0, empty.stderr
    assert "no consumer processes" in empty.stdout

    gone = make_consumer({}, name="old", group="g1")
    await gone.report_presence()
    await _silence(client, keys, 3)
    live = make_consumer({}, name="new", group="g2")
    presence._ids.clear()  # another process id, as another process would have
    await live.report_presence()

    shown = await _cli(monkeypatch, capsys, env, "consumers")
    assert shown.returncode == 0, shown.stderr
    assert "1 online, 0 offline" in shown.stdout
    assert "g2 as new" in shown.stdout
    assert "as old" not in shown.stdout
    assert "(1 offline, shown with --all)" in shown.stdout

    every = await _cli(monkeypatch, capsys, env, "consumers", "--all")
    lines = every.stdout.splitlines()
    lines = lines[lines.index("1 online, 1 offline") :]  # after any log line of the session
    assert lines[3].startswith("online")
    assert "g2 as new" in lines[3]
    assert lines[4].startswith("offline, last seen 3 min ago")
    assert "g1 as old" in lines[4]

    out = (await _cli(monkeypatch, capsys, env, "consumers", "--all", "--json")).stdout
    doc = json.loads(out[out.index("{\n") :])  # after any log line of the session
    assert [(p["online"], p["groups"][0]["name"]) for p in doc["processes"]] == [
        (True, "new"),
        (False, "old"),
    ]


async def test_inspect_counts_live_consumers_and_fails_when_work_has_none(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    make_consumer: MakeConsumer,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    consumer = make_consumer({}, name="w1", group=GROUP)
    await consumer.ensure_groups()
    await _handled(consumer, producer, 1)  # Redis now remembers the name w1
    await consumer.report_presence(stopped=True)
    await producer.publish(spot(7))  # lag 1, nobody to read it

    report = await collect(client, keys, memory=False)
    (g,) = report.topics[0].groups
    assert (g.consumers, g.names, g.lag) == (0, 1, 1)
    assert breaches(report) == [
        f"{GROUP} has work waiting and no live consumer: backlog on cluster (1)"
    ]
    env = _env(redis_url, keys)
    failed = await _cli(monkeypatch, capsys, env, "inspect", "--no-memory", "--max-lag", "1000")
    assert failed.returncode == 1, failed.stdout
    assert f"{GROUP} has work waiting and no live consumer" in failed.stdout

    await consumer.report_presence()
    report = await collect(client, keys, memory=False)
    assert report.topics[0].groups[0].consumers == 1
    assert breaches(report) == []
    passed = await _cli(
        monkeypatch,
        capsys,
        env,
        "inspect",
        "--no-memory",
        "--max-lag",
        "1000",
        "--max-pending-age-s",
        "1e9",
    )
    assert passed.returncode == 0, passed.stdout


async def test_check_fails_when_a_group_has_lag_and_no_live_consumer(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    make_consumer: MakeConsumer,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(redis_url, keys)
    await client.xgroup_create(keys.stream("cluster"), GROUP, id="0", mkstream=True)
    assert (await _cli(monkeypatch, capsys, env, "check", GROUP)).returncode == 0  # no work
    await producer.publish(spot(1))
    failed = await _cli(monkeypatch, capsys, env, "check", GROUP)
    assert failed.returncode == 1
    assert f"{GROUP} has work waiting and no live consumer: backlog on cluster (1)" in failed.stderr

    await make_consumer({}, name="w1", group=GROUP).report_presence()
    passed = await _cli(monkeypatch, capsys, env, "check", GROUP)
    assert passed.returncode == 0, passed.stderr


async def test_check_without_arguments_checks_every_declared_group(
    keys: Keys,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = _env(redis_url, keys)
    bare = await _cli(monkeypatch, capsys, env, "check")
    every = await _cli(monkeypatch, capsys, env, "check", "--all")
    assert bare.returncode == every.returncode == 1
    assert "ok: 0 group(s)" not in bare.stdout
    assert f"group {GROUP} does not exist on" in bare.stderr
    assert bare.stderr == every.stderr
    # a role's container health check: Redis only, whatever other roles' groups look like
    redis_only = await _cli(monkeypatch, capsys, env, "check", "--redis-only")
    assert redis_only.returncode == 0, redis_only.stderr
    assert "ok: Redis" in redis_only.stdout
    mixed = await _cli(monkeypatch, capsys, env, "check", "--redis-only", GROUP)
    assert mixed.returncode == 2
    assert "takes no groups" in mixed.stderr


async def test_the_dashboards_consumers_panel_lists_them_online_first_then_offline(
    client: aioredis.Redis, keys: Keys, producer: Producer, make_consumer: MakeConsumer
) -> None:
    """Over HTTP, as tests/test_dashboard.py reads the application's panels."""
    await make_consumer({}, name="old", group="g1").report_presence(stopped=True)
    presence._ids.clear()  # another process
    await make_consumer({}, name="new", group="g2").report_presence()
    async with (
        serving_panels(client, keys, producer, [CONSUMERS_PANEL]) as srv,
        aiohttp.ClientSession(base_url=srv.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as b,
    ):
        await login(b, await srv.token("admin", (), operator=True))
        async with b.get("/dashboard/api/snapshot") as r:
            assert r.status == 200
            snap = await r.json()
    (panel,) = snap["panels"]
    assert (panel["name"], panel["title"], panel["error"]) == ("consumers", "Consumers", None)
    assert panel["columns"][:4] == ["status", "host", "pid", "groups"]
    assert panel["total"] == 2
    assert panel["note"].startswith("1 online, 1 offline")
    online, offline = panel["rows"]
    assert (online[0], online[3]) == ("online", "g2 as new")
    assert offline[0].startswith("offline, last seen ")
    assert offline[3] == "g1 as old"
