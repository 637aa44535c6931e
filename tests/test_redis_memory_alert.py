"""Redis memory against maxmemory (issue 17.5's alerting): the ingest's gauges on /metrics and
its ``redis_memory_high`` warning (once per episode, then a recovery), and ``check`` /
``inspect`` exiting 1 while used_memory is at or above the alert ratio (0.8).

These tests move ``maxmemory`` up and down, so they run on a redis-server of their own (the
session's is shared by the other tests of the worker); every test sets it back to 0 after.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from streamproc import Keys, RedisSettings, connect
from streamproc.config import load_config
from streamproc.embedded import EmbeddedRedis, free_port
from streamproc.errors import ConfigError
from streamproc.inspect import redis_memory
from streamproc.metrics import RECOVER_MARGIN, RedisMemoryMonitor

#: Bound of every wait below (a failure, never a measurement).
WAIT_S = 60.0


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server for this module only (policy noeviction, no maxmemory at start)."""
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis-memory"), appendonly=False)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def mem_client(own_redis: str, keys: Keys) -> AsyncIterator[aioredis.Redis]:
    c = connect(RedisSettings(url=own_redis, key_prefix=keys.prefix))
    try:
        yield c
    finally:
        await c.config_set("maxmemory", 0)  # whatever the test did
        await c.aclose()


async def used(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def set_ratio(client: aioredis.Redis, ratio: float) -> int:
    """Set maxmemory so that the memory used now is ``ratio`` of it; return maxmemory."""
    limit = int(await used(client) / ratio)
    await client.config_set("maxmemory", limit)
    return limit


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_monitor_warns_once_per_episode_and_logs_its_recovery(
    mem_client: aioredis.Redis,
) -> None:
    monitor = RedisMemoryMonitor(mem_client, alert_ratio=0.8, interval_s=60)
    with capture_logs() as logs:
        mem = await monitor.sample()
        assert mem is not None
        assert mem.maxmemory_bytes == 0  # maxmemory not set: no ratio, never high
        assert mem.ratio is None
        assert not mem.high
        assert not monitor.high
        limit = await set_ratio(mem_client, 0.1)
        mem = await monitor.sample()
        assert mem is not None
        assert mem.maxmemory_bytes == limit
        assert not mem.high
        assert logs == []

        await set_ratio(mem_client, 0.9)
        for _ in range(3):  # three samples of one episode
            mem = await monitor.sample()
            assert mem is not None
            assert mem.high
            assert monitor.high
        [high] = events(logs, "redis_memory_high")
        assert high["log_level"] == "warning"
        assert high["maxmemory_bytes"] == mem.maxmemory_bytes
        assert high["ratio"] >= 0.8
        assert high["alert_ratio"] == 0.8
        assert high["policy"] == "noeviction"

        # Below the alert ratio but within the margin: still the same episode.
        await set_ratio(mem_client, 0.8 - RECOVER_MARGIN / 2)
        mem = await monitor.sample()
        assert mem is not None
        assert not mem.high
        assert monitor.high
        assert events(logs, "redis_memory_recovered") == []

        await set_ratio(mem_client, 0.1)
        for _ in range(3):
            await monitor.sample()
        [recovered] = events(logs, "redis_memory_recovered")
        assert recovered["ratio"] < 0.8 - RECOVER_MARGIN
        assert not monitor.high

        await set_ratio(mem_client, 0.9)  # a second episode: a second warning
        await monitor.sample()
    assert len(events(logs, "redis_memory_high")) == 2
    assert monitor.samples == 10


def test_the_alert_ratio_is_a_setting_checked_at_start() -> None:
    cfg = load_config({"STREAMPROC_REDIS_MEMORY_ALERT": "0.65"})
    assert cfg.redis.memory_alert_ratio == 0.65
    assert cfg.redis.memory_sample_s == 5.0
    assert load_config({}).redis.memory_alert_ratio == 0.8
    for bad in ("1.5", "0", "nan", "lots"):
        with pytest.raises(ConfigError, match="STREAMPROC_REDIS_MEMORY_ALERT"):
            load_config({"STREAMPROC_REDIS_MEMORY_ALERT": bad})
    with pytest.raises(ConfigError, match="STREAMPROC_REDIS_MEMORY_SAMPLE_S"):
        load_config({"STREAMPROC_REDIS_MEMORY_SAMPLE_S": "-1"})


def _env(redis_url: str, keys: Keys, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_JSON": "1",
        **extra,
    }


async def _scrape(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with http.get(f"{base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        s.name: s.value
        for fam in text_string_to_metric_families(text)
        if fam.name.startswith("streamproc_redis_")
        for s in fam.samples
    }


async def _until(
    http: aiohttp.ClientSession, base: str, proc: subprocess.Popen[bytes], ok: Any
) -> dict[str, float]:
    """Scrape until ``ok(figures)``; fails when the ingest exits or after WAIT_S."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        assert proc.poll() is None, "ingest exited"
        try:
            figures = await _scrape(http, base)
        except aiohttp.ClientConnectionError:
            figures = {}
        if ok(figures):
            return figures
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting: {figures}"
        await asyncio.sleep(0.1)


def _start_ingest(
    repo_root: Path, env: dict[str, str], port: int, log_path: Path
) -> subprocess.Popen[bytes]:
    """``streamproc ingest`` on 127.0.0.1:port, its logs (JSON lines) into ``log_path``."""
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "streamproc", "ingest", "--port", str(port)],
            env=env,
            cwd=repo_root,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def test_ingest_exports_the_gauges_and_logs_one_warning_per_episode(
    mem_client: aioredis.Redis, own_redis: str, keys: Keys, repo_root: Path, tmp_path: Path
) -> None:
    await mem_client.config_set("maxmemory", 1 << 30)
    port, log_path = free_port(), tmp_path / "ingest.log"
    env = _env(own_redis, keys, STREAMPROC_REDIS_MEMORY_SAMPLE_S="0.05")
    proc = _start_ingest(repo_root, env, port, log_path)
    base = f"http://127.0.0.1:{port}"
    samples = "streamproc_redis_memory_samples_total"
    try:
        async with aiohttp.ClientSession() as http:
            fig = await _until(http, base, proc, lambda f: f.get(samples, 0) >= 1)
            assert fig["streamproc_redis_maxmemory_bytes"] == 1 << 30
            assert fig["streamproc_redis_used_memory_bytes"] > 0
            assert fig["streamproc_redis_memory_used_ratio"] == round(
                fig["streamproc_redis_used_memory_bytes"] / (1 << 30), 4
            )
            assert fig["streamproc_redis_memory_alert_ratio"] == 0.8
            assert fig["streamproc_redis_memory_high"] == 0

            limit = await set_ratio(mem_client, 0.9)
            fig = await _until(
                http, base, proc, lambda f: f.get("streamproc_redis_memory_high") == 1
            )
            assert fig["streamproc_redis_maxmemory_bytes"] == limit
            assert fig["streamproc_redis_memory_used_ratio"] >= 0.8
            # A few more samples of the same episode, then the recovery and a few after it.
            at = fig[samples]
            await _until(http, base, proc, lambda f: f.get(samples, 0) >= at + 5)
            await mem_client.config_set("maxmemory", 1 << 30)
            fig = await _until(
                http, base, proc, lambda f: f.get("streamproc_redis_memory_high") == 0
            )
            at = fig[samples]
            await _until(http, base, proc, lambda f: f.get(samples, 0) >= at + 5)
            await mem_client.config_set("maxmemory", 0)
            fig = await _until(
                http,
                base,
                proc,
                lambda f: f["streamproc_redis_maxmemory_bytes"] == 0,
            )
            assert "streamproc_redis_memory_used_ratio" not in fig  # no ratio without a limit
            assert fig["streamproc_redis_memory_high"] == 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    [high] = events(lines, "redis_memory_high")
    assert high["level"] == "warning"
    assert high["maxmemory_bytes"] == limit
    [recovered] = events(lines, "redis_memory_recovered")
    assert recovered["maxmemory_bytes"] == 1 << 30


def _cli(repo_root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        check=False,
    )


async def test_check_and_inspect_exit_1_while_redis_memory_is_high(
    mem_client: aioredis.Redis, own_redis: str, keys: Keys, repo_root: Path
) -> None:
    await mem_client.xgroup_create(keys.stream("cluster"), "cluster-events", id="0", mkstream=True)
    env = _env(own_redis, keys)

    # maxmemory not set: said, not judged.
    check = await asyncio.to_thread(_cli, repo_root, env, "check", "cluster-events")
    assert check.returncode == 0, check.stderr
    assert "maxmemory not set" in check.stdout
    inspect = await asyncio.to_thread(_cli, repo_root, env, "inspect", "--json")
    assert inspect.returncode == 0, inspect.stderr
    doc = json.loads(inspect.stdout)
    assert doc["redis_memory"]["maxmemory_bytes"] == 0
    assert doc["redis_memory"]["ratio"] is None
    assert doc["breaches"] == []

    await set_ratio(mem_client, 0.9)
    check = await asyncio.to_thread(_cli, repo_root, env, "check", "cluster-events")
    assert check.returncode == 1
    assert "Redis memory:" in check.stderr
    assert "alert at 80%" in check.stderr
    inspect = await asyncio.to_thread(_cli, repo_root, env, "inspect")
    assert inspect.returncode == 1
    assert "SLO BREACHED" in inspect.stdout
    assert "high; at maxmemory" in inspect.stdout
    # A container's health check shows the figures and does not fail on them.
    health = await asyncio.to_thread(_cli, repo_root, env, "check", "--redis-only")
    assert health.returncode == 0, health.stderr
    assert "HIGH" in health.stdout

    await mem_client.config_set("maxmemory", 1 << 30)
    check = await asyncio.to_thread(_cli, repo_root, env, "check", "cluster-events")
    assert check.returncode == 0, check.stderr
    assert "of maxmemory 1.0GiB" in check.stdout
    assert "HIGH" not in check.stdout
    mem = await redis_memory(mem_client)
    assert mem.ratio is not None
    assert mem.ratio < 0.8
    assert not mem.high


# ---------------------------------------------------------------------- the dashboard's card


async def test_the_dashboard_snapshot_judges_redis_memory_as_check_does(
    mem_client: aioredis.Redis, keys: Keys
) -> None:
    """The snapshot the page renders carries used_memory against maxmemory at the ingest's
    alert ratio (``create_app(memory_alert_ratio=...)``): no ratio while maxmemory is unset,
    high once used/maxmemory reaches the ratio, not high below it."""
    from schemas import REGISTRY
    from streamproc import Codec, Producer
    from streamproc.dashboard import DASHBOARD, build_snapshot
    from streamproc.ingest import Ingest, create_app

    producer = Producer(mem_client, Codec(REGISTRY), keys)
    ingest = Ingest(client=mem_client, registry=REGISTRY, keys=keys, producer=producer)
    app = create_app(ingest, memory_alert_ratio=0.5)
    snap = await app[DASHBOARD].sampler.snapshot()
    mem = snap.redis_memory
    assert mem is not None
    assert (mem.maxmemory_bytes, mem.ratio, mem.high, mem.alert_ratio) == (0, None, False, 0.5)
    assert mem.used_bytes > 0

    now = await used(mem_client)
    await mem_client.config_set("maxmemory", int(now * 1.5))  # ~0.67 of it used
    snap, _ = await build_snapshot(mem_client, keys, memory_alert_ratio=0.5)
    assert snap.redis_memory is not None
    assert snap.redis_memory.high
    assert snap.redis_memory.ratio is not None
    assert 0.5 <= snap.redis_memory.ratio < 1

    await mem_client.config_set("maxmemory", now * 20)
    snap, _ = await build_snapshot(mem_client, keys, memory_alert_ratio=0.5)
    assert snap.redis_memory is not None
    assert not snap.redis_memory.high


async def test_a_dashboard_whose_redis_user_may_not_run_info_shows_no_memory_and_the_rest(
    mem_client: aioredis.Redis, own_redis: str, keys: Keys
) -> None:
    """An ACL user without INFO: the snapshot is still built (its groups, topics), with no
    memory figure, rather than failing as an outage."""
    from streamproc.dashboard import build_snapshot
    from streamproc.groups import ensure_declared_groups

    await ensure_declared_groups(mem_client, keys, {"cluster": ["g"]})
    await mem_client.acl_setuser(
        "no-info",
        enabled=True,
        passwords=["+pw-no-info"],
        keys=["*"],
        channels=["*"],
        commands=["+@all", "-info"],
    )
    host = urlparse(own_redis).netloc.rsplit("@", 1)[-1]
    url = f"redis://no-info:pw-no-info@{host}/0"
    limited = connect(RedisSettings(url=url, key_prefix=keys.prefix))
    try:
        snap, _ = await build_snapshot(limited, keys)
        assert snap.redis_memory is None
        assert [(g.topic, g.group) for g in snap.groups] == [("cluster", "g")]
    finally:
        await limited.aclose()
        await mem_client.acl_deluser("no-info")
