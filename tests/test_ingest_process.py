"""``streamproc ingest`` and ``streamproc agents`` as processes: kill -9, graceful stop, CLI."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY
from streamproc import Codec, Keys
from streamproc.embedded import free_port
from streamproc.event import new_event_id
from streamproc.ingest import AgentStore
from tests.helpers import CliRun, cli_in_process
from tests.test_ingest_support import cluster_event


def _env(redis_url: str, keys: Keys) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_LEVEL": "warning",
    }


@pytest.fixture
def ingest_proc(redis_url: str, keys: Keys, repo_root: Path) -> Iterator[tuple[str, Any]]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamproc", "ingest", "--port", str(port)],
        env=_env(redis_url, keys),
        cwd=repo_root,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


async def _wait_up(session: aiohttp.ClientSession, url: str, proc: Any) -> None:
    while proc.poll() is None:
        try:
            async with session.get(url + "/healthz") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"ingest exited with {proc.returncode}")


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_sigkill_mid_load_never_loses_an_acknowledged_event(
    ingest_proc: tuple[str, Any], client: aioredis.Redis, keys: Keys
) -> None:
    url, proc = ingest_proc
    _, token = await AgentStore(client, keys).add("loader", types=["cluster.*"], clusters=["*"])
    acked: list[str] = []
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        await _wait_up(session, url, proc)

        async def load() -> None:
            while True:
                batch = [cluster_event(id=new_event_id()) for _ in range(10)]
                try:
                    async with session.post(
                        url + "/v1/events", data=orjson.dumps(batch), headers=headers
                    ) as r:
                        if r.status == 202:
                            acked.extend(e["id"] for e in (await r.json())["events"])
                except (TimeoutError, aiohttp.ClientError):
                    return  # the server is gone

        loaders = [asyncio.create_task(load()) for _ in range(8)]
        while len(acked) < 500 and proc.poll() is None:  # noqa: ASYNC110 - counting acks
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*loaders)
    codec = Codec(REGISTRY)
    rows: Any = await client.xrange(keys.stream("cluster"))
    stored = {codec.decode(f).id for _, f in rows}
    assert len(acked) >= 500
    missing = set(acked) - stored
    assert not missing, f"{len(missing)} acknowledged events are not in Redis"


@pytest.mark.slow
@pytest.mark.timeout(60)
async def test_sigterm_lets_an_in_flight_request_finish(
    ingest_proc: tuple[str, Any], client: aioredis.Redis, keys: Keys
) -> None:
    url, proc = ingest_proc
    _, token = await AgentStore(client, keys).add("slow", types=["cluster.*"], clusters=["*"])
    body = orjson.dumps(cluster_event())
    half_sent = asyncio.Event()
    go_on = asyncio.Event()

    async def slow_body() -> AsyncIterator[bytes]:
        yield body[:20]
        half_sent.set()
        await go_on.wait()
        yield body[20:]

    async with aiohttp.ClientSession() as session:
        await _wait_up(session, url, proc)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        request = asyncio.create_task(
            session.post(url + "/v1/events", data=slow_body(), headers=headers)
        )
        await half_sent.wait()
        await asyncio.sleep(0.2)  # let the server start the handler
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.2)
        go_on.set()
        async with await request as r:
            assert r.status == 202
    assert await asyncio.to_thread(proc.wait, 30) == 0
    assert await client.xlen(keys.stream("cluster")) == 1


@pytest.mark.slow
def test_agents_cli_prints_a_token_once_and_keeps_only_its_hash(
    redis_url: str,
    keys: Keys,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "streamproc", "agents", *args],
            env=_env(redis_url, keys),
            cwd=repo_root,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def refused(*args: str) -> CliRun:
        """A refusal by the same ``main`` in this process, without a process start each (add,
        list and revoke each run as a real process too)."""
        overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
        return cli_in_process(monkeypatch, capsys, overrides, "agents", *args)

    added = cli("add", "edge-1", "--types", "cluster.*", "--clusters", "edge-*")
    assert added.returncode == 0, added.stderr
    token = added.stdout.strip()
    assert token.startswith("spk_")
    exists = refused("add", "edge-1", "--types", "cluster.*", "--clusters", "*")
    assert exists.returncode == 2
    assert "exists" in exists.stderr
    useless = refused("add", "idle")
    assert useless.returncode == 2
    assert "could do nothing" in useless.stderr
    viewer = cli("add", "viewer-1", "--clusters", "prod-*")
    assert viewer.returncode == 0, viewer.stderr
    assert refused("add", "x", "--types", "nothing.*").returncode == 2  # matches no type
    listed = cli("list", "--json")
    assert "edge-1" in listed.stdout
    assert token not in listed.stdout
    assert "token_sha256" not in listed.stdout
    import redis

    with redis.Redis.from_url(redis_url) as r:
        stored = r.hgetall(f"{keys.prefix}:agents")
        assert stored
        assert all(token.encode() not in k + v for k, v in stored.items())
    assert cli("revoke", "edge-1").returncode == 0
    assert refused("revoke", "edge-1").returncode == 1
