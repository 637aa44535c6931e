"""/metrics, /healthz, /readyz on --http-port, and ``streamproc check`` for health checks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter

from schemas.cluster import SpotInterruption
from streamproc import Keys, Producer
from streamproc.embedded import free_port
from streamproc.health import start_http_server
from tests.helpers import cli_in_process


def env_for(redis_url: str, keys: Keys) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_JSON": "1",
    }


def check(repo_root: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", "check", *args],
        cwd=repo_root,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_server_answers_liveness_readiness_and_metrics() -> None:
    registry = CollectorRegistry()
    Counter("streamproc_test_things", "things", registry=registry).inc(3)
    ready = False
    server = await start_http_server(port=0, ready=lambda: ready, registry=registry)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/healthz") as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ok"
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 503
            ready = True
            async with http.get(f"{base}/readyz") as r:
                assert r.status == 200
            async with http.get(f"{base}/metrics") as r:
                assert r.status == 200
                assert r.headers["Content-Type"].startswith("text/plain")
                assert "streamproc_test_things_total 3.0" in await r.text()
    finally:
        await server.close()


def test_check_exits_3_when_redis_is_unreachable(repo_root: Path, keys: Keys) -> None:
    env = env_for(f"redis://127.0.0.1:{free_port()}/0", keys)
    done = check(repo_root, env, "--timeout-s", "0.2")
    assert done.returncode == 3, done.stderr
    assert "cannot reach Redis" in done.stderr


async def test_check_exits_1_until_the_group_exists(
    client: aioredis.Redis,
    keys: Keys,
    redis_url: str,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = env_for(redis_url, keys)
    missing = check(repo_root, env, "cluster-events")
    assert missing.returncode == 1
    assert "group cluster-events does not exist" in missing.stderr
    await client.xgroup_create(keys.stream("cluster"), "cluster-events", id="0", mkstream=True)
    assert check(repo_root, env, "cluster-events").returncode == 0
    # An unknown group, by the same ``main`` in this process (its own event loop, so in a
    # thread): exit codes 0 and 1 came from real processes above.
    overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    unknown = await asyncio.to_thread(
        cli_in_process, monkeypatch, capsys, overrides, "check", "no-such-group"
    )
    assert unknown.returncode == 2


@pytest.mark.slow
async def test_consume_serves_metrics_and_readiness_on_http_port(
    keys: Keys, producer: Producer, redis_url: str, repo_root: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streamproc",
        "consume",
        "cluster-events",
        "--http-port",
        "0",
        cwd=repo_root,
        env=env_for(redis_url, keys),
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    try:
        port = 0
        while not port:
            line = await proc.stderr.readline()
            assert line, "consume exited before listening"
            if b"http_listening" in line:
                port = json.loads(line)["port"]
        drain = asyncio.create_task(proc.stderr.read())  # keep the pipe from filling
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            while True:  # ready once the groups exist (bounded by the test timeout)
                async with http.get(f"{base}/readyz") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            await producer.publish(
                SpotInterruption(
                    cluster_id="c", instance_id="i-1", instance_type="t", availability_zone="a"
                )
            )
            want = "streamproc_events_acked_total{consumer="
            while True:
                async with http.get(f"{base}/metrics") as r:
                    text = await r.text()
                acked = [ln for ln in text.splitlines() if ln.startswith(want)]
                if acked and acked[0].endswith(" 1.0"):
                    break
                await asyncio.sleep(0.05)
            assert "streamproc_event_loop_lag_seconds_count" in text
            assert "streamproc_consumer_ready{consumer=" in text
        done = await asyncio.to_thread(
            check,
            repo_root,
            env_for(redis_url, keys),
            "cluster-events",
            "--http-port",
            str(port),
        )
        assert done.returncode == 0, done.stderr
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        rc = await proc.wait()
    await drain
    assert rc == 0
