"""Render jobs and the render concern: charts + HTML, frames on NumPy (torch when present),
and the weekly-report pipeline end to end: tick -> render -> S3 artefact -> report.ready."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import redis.asyncio as aioredis

from consumers import renders
from consumers.render_jobs import (
    FRAME_TOLERANCE,
    DayMetrics,
    FrameInput,
    ReportInput,
    frame_job,
    render_frame,
    report_job,
    unpack_files,
)
from schemas.metrics import daily_key
from schemas.renders import RenderDone, RenderRequested, ReportReady
from schemas.ticks import WeeklyReportTick
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.offload import OffloadSettings, WorkerContext
from streamproc.schedule import Schedule, cron
from streamproc.ticker import Ticker, TickerSettings
from tests.helpers import entries, moto_server

PNG = b"\x89PNG\r\n\x1a\n"
MONDAY_9 = datetime(2026, 11, 23, 9, 0, tzinfo=UTC)


def test_report_job_draws_one_chart_per_metric_and_an_html_summary() -> None:
    days = [
        DayMetrics(
            day=f"2026-11-{16 + i:02d}", values={"savings_usd": 10.0 * i, "interruptions": i}
        )
        for i in range(7)
    ]
    report = ReportInput(
        title="Weekly", period_start=MONDAY_9 - timedelta(days=7), period_end=MONDAY_9, days=days
    )
    files = unpack_files(
        report_job(msgspec.msgpack.encode(report), WorkerContext("j", "report", "cpu"))
    )
    assert set(files) == {"savings_usd.png", "interruptions.png", "index.html"}
    assert files["savings_usd.png"].startswith(PNG)
    page = files["index.html"].decode()
    assert 'src="savings_usd.png"' in page
    assert "210.00" in page  # total savings over the week


def test_frame_render_is_deterministic_on_numpy() -> None:
    inp = FrameInput(width=64, height=48, seed=7)
    a, b = render_frame(inp, 0), render_frame(inp, 0)
    assert a.shape == (48, 64, 3)
    assert np.array_equal(a, b)
    assert a.min() >= 0.0
    assert a.max() <= 1.0
    assert not np.array_equal(a, render_frame(inp, 5))  # the scene moves
    files = unpack_files(
        frame_job(
            msgspec.msgpack.encode(FrameInput(width=32, height=32, frames=2)),
            WorkerContext("j", "preview", "cpu"),
        )
    )
    assert files["frame-0001.png"].startswith(PNG)
    assert files["backend.txt"] == b"numpy"


def test_torch_and_numpy_frames_match_within_tolerance() -> None:
    pytest.importorskip("torch")
    inp = FrameInput(width=64, height=64, seed=3)
    ref = render_frame(inp, 2, "numpy")
    assert np.abs(render_frame(inp, 2, "torch-cpu") - ref).max() <= FRAME_TOLERANCE


# ---------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_server() as url:
        yield url


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(k, v)


@pytest.fixture
async def render_settings(
    request: pytest.FixtureRequest, s3_endpoint: str, aws_env: None, keys: Keys
) -> AsyncIterator[renders.RenderSettings]:
    import boto3  # type: ignore[import-untyped]

    bucket = f"reports-{keys.prefix.lower()}"
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    settings = renders.RenderSettings(
        store=f"s3://{bucket}/weekly",
        s3_endpoint_url=s3_endpoint,
        pool=OffloadSettings(cpu_workers=1, gpus=()),
    )
    await renders.configure(settings)
    yield settings
    await renders.configure(renders.RenderSettings())


def consumer(client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer) -> Consumer:
    return Consumer(
        renders.CONCERN,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="r1"),
    )


async def drive_until(
    c: Consumer, client: aioredis.Redis, stream: str, rounds: int = 20
) -> list[Any]:
    for _ in range(rounds):
        await c.process_once(block_ms=200)
        if got := await entries(client, stream):
            return got
    raise AssertionError(f"nothing on {stream} after {rounds} steps")


async def test_weekly_report_tick_to_report_ready_with_the_artefact_in_s3(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    render_settings: renders.RenderSettings,
    s3_endpoint: str,
) -> None:
    import boto3

    for i in range(7):
        day = (MONDAY_9 - timedelta(days=7 - i)).strftime("%Y-%m-%d")
        await client.hset(daily_key(keys, day), mapping={"savings_usd": 100 + i})
    # The ticker fires the Monday 09:00 tick (last fired the week before).
    sched = Schedule(name="weekly-report", trigger=cron("Mon 09:00"), event=WeeklyReportTick)
    await client.hset(
        keys.ticker_last(), "weekly-report", int((MONDAY_9 - timedelta(days=7)).timestamp() * 1000)
    )
    ticker = Ticker(
        [sched], client=client, producer=producer, keys=keys, settings=TickerSettings(node="t")
    )
    assert await ticker.lease.acquire()
    await ticker.load_state()
    [tick] = await ticker.fire_due(MONDAY_9 + timedelta(seconds=1))

    c = consumer(client, codec, keys, producer)
    await c.ensure_groups()
    [(_, fields)] = await drive_until(c, client, keys.stream("reports"))
    ready = codec.decode(fields)
    assert isinstance(ready, ReportReady)
    assert ready.cause_id == tick.id
    assert ready.location.startswith(f"s3://reports-{keys.prefix.lower()}/weekly/renders/report/")
    assert ready.location.endswith("/index.html")
    assert ready.period_end == MONDAY_9
    bucket, _, key = ready.location[5:].partition("/")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    page = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    assert "savings_usd" in page
    assert "721.00" in page
    chart_key = key.replace("index.html", "savings_usd.png")
    assert s3.get_object(Bucket=bucket, Key=chart_key)["Body"].read().startswith(PNG)
    # Progress was published for clients to follow.
    states = [
        codec.decode(f).state for _, f in await entries(client, keys.stream("render-progress"))
    ]
    assert states[0] == "queued"
    assert "done" in states
    # A second delivery of the same tick asks for nothing new (derived, deduplicated ids).
    await producer.publish(tick)
    assert len(await entries(client, keys.stream("renders"))) == 1


async def test_preview_render_on_a_host_without_gpu_falls_back_to_numpy(
    client: aioredis.Redis,
    codec: Codec[Any],
    keys: Keys,
    producer: Producer,
    tmp_path: Path,
) -> None:
    await renders.configure(
        renders.RenderSettings(store=str(tmp_path), pool=OffloadSettings(cpu_workers=1, gpus=()))
    )
    try:
        await producer.publish(RenderRequested(kind="preview", width=32, height=24, frames=2))
        c = consumer(client, codec, keys, producer)
        await c.ensure_groups()
        [(_, fields)] = await drive_until(c, client, keys.stream("renders-done"))
        done = codec.decode(fields)
        assert isinstance(done, RenderDone)
        assert done.device == "numpy"
        assert done.location.startswith("file://")
        stored = Path(done.location.removeprefix("file://"))
        assert (await asyncio.to_thread(stored.read_bytes)).startswith(PNG)
    finally:
        await renders.configure(renders.RenderSettings())
