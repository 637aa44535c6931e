"""``streamproc inspect``: what is waiting, how old it is, what failed — and the SLO exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import redis.asyncio as aioredis

from schemas.cluster import SpotInterruption
from streamproc import Keys, Producer
from streamproc.inspect import Thresholds, breaches, collect, render_table

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
