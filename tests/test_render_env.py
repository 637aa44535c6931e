"""Render settings from the environment: parsing, precise errors, and a real consume process."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from consumers import configure_from_env, renders
from schemas.renders import RenderDone, RenderRequested
from streamproc import Codec, Keys, Producer
from streamproc.config import settings_from_env
from streamproc.errors import ConfigError
from streamproc.ingest.settings import IngestSettings
from streamproc.offload import OffloadSettings
from tests.test_cli import ROOT, cli

P, PI = "STREAMPROC_RENDER_", "STREAMPROC_INGEST_"


def render_settings(**env: str) -> renders.RenderSettings:
    return settings_from_env(renders.RenderSettings, P, env)


def test_nothing_set_keeps_every_default() -> None:
    assert render_settings() == renders.RenderSettings()
    assert render_settings().pool.gpus is None  # None = detect


def test_fields_nested_fields_and_lists() -> None:
    s = render_settings(
        STREAMPROC_RENDER_STORE="s3://bucket/renders",
        STREAMPROC_RENDER_S3_ENDPOINT_URL="http://127.0.0.1:5000",
        STREAMPROC_RENDER_POOL_CPU_WORKERS="3",
        STREAMPROC_RENDER_POOL_GPUS="0, 1",
        STREAMPROC_RENDER_POOL_MAX_TASKS_PER_CHILD="0",
    )
    assert s.store == "s3://bucket/renders"
    assert s.s3_endpoint_url == "http://127.0.0.1:5000"
    assert s.pool == OffloadSettings(cpu_workers=3, gpus=(0, 1), max_tasks_per_child=0)
    assert render_settings(STREAMPROC_RENDER_POOL_GPUS="").pool.gpus == ()  # no GPU at all


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        ("STREAMPROC_RENDER_POOL_CPU_WORKERS", "abc", "Expected `int`"),
        ("STREAMPROC_RENDER_POOL_CPU_WORKERS", "0", "cpu_workers must be 1..512, got 0"),
        ("STREAMPROC_RENDER_POOL_GPUS", "0,x", "Expected `int`"),
        ("STREAMPROC_RENDER_POOL_GPUS", "-1", "GPU indices are 0..1023"),
        ("STREAMPROC_RENDER_POOL_MAX_QUEUED", "9" * 400, "max_queued must be 0..1000000"),
    ],
)
def test_a_bad_value_names_its_variable(var: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        render_settings(**{var: value})
    assert str(e.value).startswith(f"{var}=")
    assert reason in str(e.value)


def test_ingest_settings_errors_name_the_variable_too() -> None:
    with pytest.raises(ConfigError, match=r"^STREAMPROC_INGEST_RATE_LEASE_S='x': Expected"):
        settings_from_env(
            IngestSettings, "STREAMPROC_INGEST_", {"STREAMPROC_INGEST_RATE_LEASE_S": "x"}
        )
    with pytest.raises(ConfigError, match=r"^STREAMPROC_INGEST_MAX_BATCH='-1': .*> 0"):
        settings_from_env(
            IngestSettings, "STREAMPROC_INGEST_", {"STREAMPROC_INGEST_MAX_BATCH": "-1"}
        )


async def test_a_store_without_bucket_is_refused_naming_the_variable() -> None:
    try:
        with pytest.raises(ConfigError, match=r"^STREAMPROC_RENDER_STORE='s3://': .*no bucket"):
            configure_from_env({"STREAMPROC_RENDER_STORE": "s3://"})
    finally:
        await renders.configure(renders.RenderSettings())


def test_consume_refuses_a_bad_render_variable_before_starting() -> None:
    r = cli("consume", "renders", env={"STREAMPROC_RENDER_POOL_CPU_WORKERS": "many"}, timeout=30)
    assert r.returncode == 2
    assert "STREAMPROC_RENDER_POOL_CPU_WORKERS='many'" in r.stderr


async def test_consume_renders_into_the_store_the_environment_names(
    redis_url: str,
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "STREAMPROC_LOG_LEVEL": "warning",
        "STREAMPROC_RENDER_STORE": str(store),
        "STREAMPROC_RENDER_POOL_CPU_WORKERS": "1",
        "STREAMPROC_RENDER_POOL_GPUS": "",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", "consume", "renders", env=env, cwd=ROOT
    )
    try:
        await producer.publish(RenderRequested(kind="preview", width=32, height=24, frames=2))
        done_stream = keys.stream("renders-done")
        found: list[Any] = []
        for _ in range(600):  # the process starts, spawns its worker, renders (normally 2-5 s)
            found = list(await client.xrange(done_stream) or [])
            if found or proc.returncode is not None:
                break
            await asyncio.sleep(0.1)
        assert proc.returncode is None, "the consumer exited"
        [(_, fields)] = found
        done = codec.decode(fields)
        assert isinstance(done, RenderDone)
        assert done.device == "numpy"  # POOL_GPUS="" : no GPU, even where one is detected
        assert done.location.startswith(f"file://{store}/")
        stored = Path(done.location.removeprefix("file://"))
        assert await asyncio.to_thread(stored.is_file)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
