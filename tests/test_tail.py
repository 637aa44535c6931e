"""``streamproc tail``: follows a topic live without joining a group."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from schemas.cluster import OOMKilled, SpotInterruption
from streamproc import Codec, Keys, Producer
from streamproc.tail import follow, format_json, format_pretty, start_id
from tests.helpers import cli_in_process


def spot(n: int) -> SpotInterruption:
    return SpotInterruption(
        cluster_id=f"c{n}", instance_id=f"i-{n}", instance_type="m5.large", availability_zone="a"
    )


def oom() -> OOMKilled:
    return OOMKilled(
        cluster_id="c9", namespace="ns", pod="p", container="app", memory_limit_bytes=1 << 28
    )


async def test_follow_decodes_filters_by_type_and_shows_undecodable_entries(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    await producer.publish(spot(1))
    await producer.publish(oom())
    await client.xadd(keys.stream("cluster"), {"type": "cluster.spot_interruption", "data": "{"})
    got = []
    async for entry in follow(
        client, keys, codec, "cluster", start="0", types=["cluster.spot_interruption"]
    ):
        got.append(entry)
        if len(got) == 2:
            break
    assert [e.error for e in got] == ["", "bad_json"]
    assert got[0].data["instance_id"] == "i-1"
    assert json.loads(format_json(got[0]))["type"] == "cluster.spot_interruption"
    pretty = format_pretty(got[0])
    assert "cluster.spot_interruption" in pretty
    assert 'instance_id="i-1"' in pretty
    assert "UNDECODABLE (bad_json)" in format_pretty(got[1])


async def test_dollar_is_resolved_once_so_nothing_between_reads_is_missed(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    assert await start_id(client, keys.stream("cluster"), "$") == "0-0"  # no stream yet
    first = await producer.publish(spot(1))
    after = await start_id(client, keys.stream("cluster"), "$")
    assert after == first
    await producer.publish(spot(2))  # published before the first read: still seen
    stream = follow(client, keys, codec, "cluster", start=after)
    entry = await anext(stream)
    await stream.aclose()
    assert entry.data["instance_id"] == "i-2"


async def test_cli_tail_prints_json_lines_when_piped_and_does_not_ack(
    client: aioredis.Redis, keys: Keys, producer: Producer, redis_url: str, repo_root: Path
) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamproc",
        "tail",
        "cluster",
        "--type",
        "cluster.spot_interruption",
        "--count",
        "2",
        cwd=repo_root,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert proc.stderr is not None
    # It says where it starts once it is following: events after that line are seen.
    while b"following" not in (line := await proc.stderr.readline()):
        assert line, "tail exited before following"
    await producer.publish(spot(1))
    await producer.publish(oom())
    await producer.publish(spot(2))
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    lines = [json.loads(x) for x in out.decode().splitlines()]
    assert [x["data"]["instance_id"] for x in lines] == ["i-1", "i-2"]
    assert await client.xinfo_groups(keys.stream("cluster")) == []  # no group joined


def test_cli_tail_on_an_unknown_topic_names_the_known_ones_instead_of_waiting(
    redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A topic that no event type or group declares, not in the registry set and without a
    stream (a typo, say) is exit 2 naming the known topics: the app's and the registered."""
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    with redis.Redis.from_url(redis_url) as sync:
        sync.sadd(keys.topics(), "registered-only")
        r = cli_in_process(monkeypatch, capsys, env, "tail", "clustr")
        assert r.returncode == 2, r.stderr
        [line] = r.stderr.splitlines()
        assert line.startswith("streamproc: error: unknown topic 'clustr'; known: "), line
        known = line.split("known: ")[1].split(", ")
        assert {"cluster", "notify", "registered-only"} <= set(known)
        assert known == sorted(known)
        # A stream that exists is followed even when nothing declares its topic.
        sync.xadd(keys.stream("adhoc"), {"type": "x.y", "id": "e-1", "data": "{}"})
        r = cli_in_process(monkeypatch, capsys, env, "tail", "adhoc", "--from", "0", "--count", "1")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.splitlines()[-1])["id"] == "e-1"  # (session logs before)
