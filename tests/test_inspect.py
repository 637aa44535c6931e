"""``streamproc inspect``: what is waiting, how old it is, what failed — and the SLO exit code."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import redis.asyncio as aioredis

from schemas.cluster import SpotInterruption
from schemas.ticks import DiscoveryTick
from streamproc import Keys, Producer
from streamproc.inspect import (
    Report,
    Thresholds,
    TickerStatus,
    breaches,
    collect,
    render_table,
    schedule_statuses,
)
from streamproc.schedule import Schedule, cron, every

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


async def test_a_group_breaches_when_its_backlog_is_over_max_lag(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    await _scene(client, keys, producer)
    report = await collect(client, keys, memory=False)
    assert breaches(report, Thresholds(max_lag=3, max_pending_age_s=1e9)) == []
    [problem] = breaches(report, Thresholds(max_lag=2, max_pending_age_s=1e9))
    assert "cluster-events on cluster: backlog 3 > max_lag 2" in problem
    assert "SLO BREACHED" in render_table(report, [problem])


async def test_a_group_breaches_when_its_oldest_pending_entry_is_too_old(
    client: aioredis.Redis, keys: Keys
) -> None:
    stream = keys.stream("old")
    await client.xadd(stream, {"type": "t"}, id="1000-0")  # stamped 1970: very old
    await client.xgroup_create(stream, "g", id="0")
    await client.xreadgroup("g", "c1", {stream: ">"})
    report = await collect(client, keys)
    [problem] = breaches(report, Thresholds(max_lag=100, max_pending_age_s=60))
    assert "g on old: oldest pending" in problem


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
    assert "2026-11-23T10:00:00Z (2m ago)" in lines["discovery"]
    assert "2026-11-23T10:05:00Z (in 3m)" in lines["discovery"]
    assert "every 300s" in lines["discovery"]
    assert "2026-11-30T09:00:00Z (in 7d)" in lines["weekly"]
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
    assert re.search(r"Z \(6[01]s ago\)", table)
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
    assert re.search(r"every 300s +\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \(2m ago\)", line), line
    assert re.search(r"Z \(in (\d+s|[1-5]m)\)$", line.rstrip()), line
    assert "weekly-report" in done.stdout  # never fired: listed with its next time
    doc = json.loads(cli(repo_root, redis_url, keys, "inspect", "--json").stdout)
    names = {s["name"]: s for s in doc["schedules"]}
    assert names["discovery"]["last_ms"] == last_ms
    assert names["weekly-report"]["next"].endswith("Z")
