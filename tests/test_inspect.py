"""``streamproc inspect``: what is waiting, how old it is, what failed — and the SLO exit code."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from schemas.cluster import SpotInterruption
from schemas.ticks import DiscoveryTick
from streamproc import ConfigError, Keys, Producer
from streamproc.concern import Concern, Limits
from streamproc.inspect import (
    Report,
    TickerStatus,
    breaches,
    collect,
    health,
    limits_of,
    render_table,
    schedule_statuses,
)
from streamproc.schedule import Schedule, cron, every
from tests.helpers import MakeConsumer

GROUP = "cluster-events"


def spot(n: int) -> SpotInterruption:
    return SpotInterruption(
        cluster_id=f"c{n}",
        instance_id=f"i-{n}",
        instance_type="m5.large",
        availability_zone="us-east-1a",
        key=f"c{n}",
    )


async def _scene(client: aioredis.Redis, keys: Keys, producer: Producer) -> None:
    """3 events on 'cluster'; the group got 1 of them (pending), 1 dead letter, 1 retry due."""
    for n in range(3):
        await producer.publish(spot(n))
    await client.xgroup_create(keys.stream("cluster"), GROUP, id="0")
    await client.xreadgroup(GROUP, "c1", {keys.stream("cluster"): ">"}, count=1)
    await client.xadd(keys.dlq("cluster", GROUP), {"type": "x", "dlq_reason": "permanent"})
    await client.zadd(keys.delayed("cluster", GROUP), {"member": 1})


def cli(
    repo_root: Path, redis_url: str, keys: Keys, *args: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_report_counts_length_lag_pending_retries_and_dead_letters(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    await _scene(client, keys, producer)
    report = await collect(client, keys)
    [topic] = report.topics
    assert (topic.topic, topic.stream, topic.length) == ("cluster", keys.stream("cluster"), 3)
    assert topic.first_age_s is not None
    assert topic.first_age_s >= 0
    assert topic.memory_bytes is not None
    assert topic.memory_bytes > 0
    [g] = topic.groups
    assert (g.group, g.consumers, g.pending, g.lag, g.backlog) == (GROUP, 1, 1, 2, 3)
    assert (g.retries_waiting, g.dlq) == (1, 1)
    assert g.oldest_pending_age_s is not None
    assert g.oldest_pending_age_s >= 0
    assert report.ticker is None


async def test_a_group_breaches_when_its_backlog_is_over_max_backlog(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    await _scene(client, keys, producer)
    report = await collect(client, keys, memory=False, limits=limits_of(max_backlog=3))
    assert breaches(report) == []
    report = await collect(client, keys, memory=False, limits=limits_of(max_backlog=2))
    [problem] = breaches(report)
    assert "cluster-events on cluster: backlog 3 > max_backlog 2" in problem
    assert [h.state for h in health(report)] == ["backlog"]
    assert "SLO BREACHED" in render_table(report, [problem])


async def test_an_old_entry_just_delivered_is_busy_and_one_nobody_renewed_is_stuck(
    client: aioredis.Redis, keys: Keys
) -> None:
    """Age (from the entry id) is not idle time (since delivery or renewal): only idle counts."""
    stream = keys.stream("old")
    [entry_id] = [await client.xadd(stream, {"type": "t"}, id="1000-0")]  # stamped 1970
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "c1", {stream: ">"})  # delivered now: idle ~0
    report = await collect(client, keys, limits=limits_of(stuck_after_s=60))
    [g] = report.topics[0].groups
    assert g.oldest_pending_age_s is not None
    assert g.oldest_pending_age_s > 60
    assert (g.stuck_pending, g.longest_idle_s) == (0, None)
    [h] = health(report)
    assert h.state == "busy", h
    assert breaches(report) == []
    assert "BUSY (not stuck)" in render_table(report)

    # nobody touched it for 2 minutes (XCLAIM's IDLE sets the idle time, as a dead owner would)
    await client.xclaim(stream, "g", "c1", 0, [entry_id], idle=120_000)
    report = await collect(client, keys, limits=limits_of(stuck_after_s=60))
    [g] = report.topics[0].groups
    assert g.stuck_pending == 1
    assert g.longest_idle_s is not None
    assert g.longest_idle_s >= 120
    [h] = health(report)
    assert h.state == "stuck"
    [problem] = breaches(report)
    assert "g on old: 1 pending entry idle" in problem
    assert "> stuck_after_s 60" in problem


async def test_ticker_keys_are_shown_tolerantly(client: aioredis.Redis, keys: Keys) -> None:
    await client.set(keys.ticker("lease"), "replica-a:7", px=10_000)
    await client.hset(keys.ticker("last"), mapping={"discovery": "2026-11-23T10:00:00Z"})
    await client.hset(keys.ticker("next"), mapping={"discovery": "2026-11-23T10:05:00Z"})
    report = await collect(client, keys)
    assert report.ticker is not None
    assert report.ticker.leader == "replica-a:7"
    assert report.ticker.leader_ttl_ms is not None
    assert 0 < report.ticker.leader_ttl_ms <= 10_000
    assert report.ticker.schedules == {
        "discovery": {"last": "2026-11-23T10:00:00Z", "next": "2026-11-23T10:05:00Z"}
    }
    assert "ticker leader: replica-a:7" in render_table(report)


async def test_nothing_under_the_prefix_is_an_empty_report(
    client: aioredis.Redis, keys: Keys
) -> None:
    report = await collect(client, keys)
    assert (report.topics, report.ticker) == ([], None)
    assert "no consumer groups" in render_table(report)


async def test_cli_json_and_exit_code_follow_the_thresholds(
    client: aioredis.Redis, keys: Keys, producer: Producer, redis_url: str, repo_root: Path
) -> None:
    await _scene(client, keys, producer)
    within = cli(repo_root, redis_url, keys, "inspect", "--json", "--max-pending-age-s", "1e9")
    assert within.returncode == 0, within.stderr
    doc = json.loads(within.stdout)
    assert doc["breaches"] == []
    assert doc["topics"][0]["groups"][0]["backlog"] == 3
    assert doc["topics"][0]["groups"][0]["limits"] == {"stuck_after_s": 1e9, "max_backlog": 100}
    assert [(h["group"], h["state"]) for h in doc["health"]] == [(GROUP, "ok")]

    over = cli(repo_root, redis_url, keys, "inspect", "--max-lag", "1")
    assert over.returncode == 1, over.stderr
    assert "SLO BREACHED" in over.stdout
    assert "cluster-events" in over.stdout


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


DISCOVERY = Schedule(name="discovery", trigger=every("5m"), event=DiscoveryTick)
WEEKLY = Schedule(name="weekly", trigger=cron("Mon 09:00"), event=DiscoveryTick)


def test_schedule_times_are_iso_8601_utc_and_next_comes_from_the_trigger() -> None:
    """The ticker stores epoch ms; next is the trigger's next time after now (server clock)."""
    now = _ms("2026-11-23T10:02:00")  # a Monday
    ticker = TickerStatus(
        leader=None,
        leader_ttl_ms=None,
        schedules={"discovery": {"last": str(now - 120_000)}},
        keys=[],
    )
    discovery, weekly = schedule_statuses(ticker, [WEEKLY, DISCOVERY], now)
    assert (discovery.name, discovery.trigger) == ("discovery", "every 300s")
    assert (discovery.last, discovery.next) == ("2026-11-23T10:00:00Z", "2026-11-23T10:05:00Z")
    assert (discovery.last_ms, discovery.next_ms) == (now - 120_000, now + 180_000)
    assert (weekly.name, weekly.last, weekly.last_ms) == ("weekly", None, None)
    assert weekly.next == "2026-11-30T09:00:00Z"


def test_the_table_shows_times_as_iso_8601_with_their_distance_from_now() -> None:
    now = _ms("2026-11-23T10:02:00")
    ticker = TickerStatus(
        leader="node-a/7",
        leader_ttl_ms=900,
        schedules={"discovery": {"last": str(now - 120_000)}, "gone": {"last": "yesterday"}},
        keys=[],
    )
    report = Report(
        prefix="p",
        server_time_ms=now,
        topics=[],
        ticker=ticker,
        schedules=schedule_statuses(ticker, [DISCOVERY, WEEKLY], now),
    )
    table = render_table(report)
    lines = {line.split()[0]: line for line in table.splitlines() if line}
    assert "SCHEDULE" in lines
    assert "2026-11-23T10:00:00Z (2 min ago)" in lines["discovery"]
    assert "2026-11-23T10:05:00Z (in 3 min)" in lines["discovery"]
    assert "every 5 min" in lines["discovery"]
    assert "2026-11-30T09:00:00Z (in 7 d)" in lines["weekly"]
    assert "yesterday" in lines["gone"]  # not a time: shown as stored
    assert str(now - 120_000) not in table  # no raw epoch ms


async def test_collect_reads_the_tickers_last_times_and_the_applications_schedules(
    client: aioredis.Redis, keys: Keys
) -> None:
    now = (await collect(client, keys)).server_time_ms
    await client.hset(keys.ticker_last(), "discovery", str(now - 60_000))
    report = await collect(client, keys, schedules=[DISCOVERY, WEEKLY])
    discovery, weekly = report.schedules
    assert discovery.last_ms == now - 60_000
    assert discovery.next_ms is not None
    assert 0 < discovery.next_ms - report.server_time_ms <= 300_000
    assert discovery.next_ms % 300_000 == 0
    assert (weekly.last, weekly.next is not None) == (None, True)
    table = render_table(report)
    assert re.search(r"Z \(6[01] s ago\)", table)
    assert "(in " in table


async def test_schedules_show_before_the_ticker_ever_ran(
    client: aioredis.Redis, keys: Keys
) -> None:
    report = await collect(client, keys, schedules=[DISCOVERY])
    assert report.ticker is None
    [discovery] = report.schedules
    assert (discovery.last, discovery.next is not None) == (None, True)
    table = render_table(report)
    assert "ticker: nothing in Redis yet" in table
    assert "discovery" in table


async def test_cli_shows_last_as_iso_8601_and_next_from_the_applications_schedules(
    client: aioredis.Redis, keys: Keys, redis_url: str, repo_root: Path
) -> None:
    """The default application's table: discovery every 5 min, last fired 2 min ago."""
    last_ms = (await collect(client, keys)).server_time_ms - 120_000
    await client.hset(keys.ticker_last(), "discovery", str(last_ms))
    done = cli(repo_root, redis_url, keys, "inspect")
    assert done.returncode == 0, done.stderr
    assert str(last_ms) not in done.stdout
    [line] = [x for x in done.stdout.splitlines() if x.startswith("discovery ")]
    assert re.search(r"every 5 min +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(2 min ago\)", line), line
    assert re.search(r"Z \(in (\d+ s|[1-5] min)\)$", line.rstrip()), line
    assert "weekly-report" in done.stdout  # never fired: listed with its next time
    doc = json.loads(cli(repo_root, redis_url, keys, "inspect", "--json").stdout)
    names = {s["name"]: s for s in doc["schedules"]}
    assert names["discovery"]["last_ms"] == last_ms
    assert names["weekly-report"]["next"].endswith("Z")


async def _until_older_than(client: aioredis.Redis, keys: Keys, age_s: float) -> None:
    """Wait (bounded by the test's timeout) until the group's oldest pending entry is older."""
    while True:
        [g] = (await collect(client, keys, memory=False)).topics[0].groups
        if g.oldest_pending_age_s is not None and g.oldest_pending_age_s > age_s:
            return
        await asyncio.sleep(0.2)


async def test_a_handler_running_past_the_limit_while_renewed_is_busy_and_inspect_exits_0(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    make_consumer: MakeConsumer,
    redis_url: str,
    repo_root: Path,
) -> None:
    """A real consumer renews the entry it holds (every min_idle_ms / 3) while its handler
    runs: the entry's age passes stuck_after_s, its idle time does not."""
    started, release = asyncio.Event(), asyncio.Event()

    async def handle(event: SpotInterruption, ctx: Any) -> None:
        started.set()
        await release.wait()

    limits = Limits(stuck_after_s=2.0)
    consumer = make_consumer(
        {SpotInterruption: handle}, concern={"limits": limits}, min_idle_ms=600, block_ms=100
    )
    await consumer.ensure_groups()
    runner = asyncio.create_task(consumer.run())
    try:
        await producer.publish(spot(1))
        await started.wait()
        await _until_older_than(client, keys, 2.5)
        report = await collect(client, keys, memory=False, limits=limits_of([consumer.concern]))
        [g] = report.topics[0].groups
        assert (g.pending, g.stuck_pending, g.limits) == (1, 0, limits)
        [h] = health(report)
        assert h.state == "busy", h
        assert breaches(report) == []

        done = await asyncio.to_thread(
            cli, repo_root, redis_url, keys, "inspect", "--no-memory", "--stuck-after-s", "2"
        )
        assert done.returncode == 0, done.stdout + done.stderr
        assert "BUSY (not stuck)" in done.stdout
        assert "SLO BREACHED" not in done.stdout
    finally:
        release.set()
        consumer.stop()
        await runner


async def test_a_pending_entry_of_a_dead_consumer_past_the_limit_is_stuck_and_inspect_exits_1(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    make_consumer: MakeConsumer,
    redis_url: str,
    repo_root: Path,
) -> None:
    """The group has a live consumer, but an entry a dead one took is renewed by nobody."""

    async def handle(event: SpotInterruption, ctx: Any) -> None:
        return None

    consumer = make_consumer({SpotInterruption: handle}, block_ms=100)  # min_idle 30 s
    await consumer.ensure_groups()
    await producer.publish(spot(1))
    stream = keys.stream("cluster")
    read: Any = await client.xreadgroup("g", "dead", {stream: ">"}, count=1)
    [[_, [(entry_id, _)]]] = read
    started = asyncio.Event()
    runner = asyncio.create_task(consumer.run(started=started))
    try:
        await started.wait()
        # the dead owner last touched it 5 s ago (over stuck_after_s, under min_idle: not
        # reclaimed yet)
        await client.xclaim(stream, "g", "dead", 0, [entry_id], idle=5_000)
        report = await collect(client, keys, memory=False, limits=limits_of(stuck_after_s=2))
        [g] = report.topics[0].groups
        assert g.consumers >= 1  # not unattended: stuck for the idle entry
        assert g.stuck_pending == 1
        [h] = health(report)
        assert h.state == "stuck", h
        [problem] = breaches(report)
        assert "g on cluster: 1 pending entry idle" in problem

        done = await asyncio.to_thread(
            cli, repo_root, redis_url, keys, "inspect", "--no-memory", "--stuck-after-s", "2"
        )
        assert done.returncode == 1, done.stdout + done.stderr
        assert "SLO BREACHED" in done.stdout
        assert "not renewed" in done.stdout
        [row] = [x for x in done.stdout.splitlines() if x.startswith("g ")]
        assert row.rstrip().endswith("stuck")
    finally:
        consumer.stop()
        await runner


def test_a_stuck_limit_under_the_renewal_period_is_refused() -> None:
    """min_idle_ms 90 s renews every 30 s: a 20 s stuck limit would call busy groups stuck."""
    with pytest.raises(ConfigError, match="renewal period"):
        Concern(
            group="g",
            topics=("cluster",),
            handlers={},
            settings={"min_idle_ms": 90_000},
            limits=Limits(stuck_after_s=20),
        )
    Concern(group="g", topics=("cluster",), handlers={}, limits=Limits(stuck_after_s=20))
    with pytest.raises(ConfigError, match="stuck_after_s must be > 0"):
        Limits(stuck_after_s=0)


async def test_a_topic_with_entries_and_no_group_is_named(
    client: aioredis.Redis, keys: Keys
) -> None:
    await client.xadd(keys.stream("notify"), {"type": "notify.x"})
    table = render_table(await collect(client, keys))
    assert "no group reads notify: what is written there is never handled" in table
    [row] = [x for x in table.splitlines() if x.startswith("notify ")]
    assert row.split()[:3] == ["notify", "1", "0"]


async def test_inspect_shows_the_producers_dedup_state_per_topic(
    client: aioredis.Redis, keys: Keys, producer: Producer, redis_url: str, repo_root: Path
) -> None:
    """Issue 20: records, shards, memory and producers per topic; none per group."""
    await producer.publish_many([spot(i) for i in range(50)])
    report = await collect(client, keys)
    [topic] = report.topics
    assert topic.dedup is not None
    assert (topic.dedup.records, topic.dedup.producers) == (50, 1)
    assert topic.dedup.shards == producer.settings.dedup_shards
    assert topic.dedup.memory_bytes > 0
    shown = cli(repo_root, redis_url, keys, "inspect")
    assert shown.returncode == 0, shown.stderr
    table = shown.stdout[shown.stdout.index("DEDUP") :].splitlines()
    assert table[1].split()[0] == "cluster"
    assert ["50", str(producer.settings.dedup_shards)] == table[1].split()[-5:-3]
    assert "consumer groups keep no dedup state per event" in shown.stdout
