"""The resource monitor and the temp cleanup (issue 15 §8-9) on a real Redis, driven through
real consumers: figures reach the host's hash (with its TTL), the ``hosts`` stream and the
Hosts panel; a threshold crossed warns once and recovers once; ``nvidia-smi`` output is
parsed, from text and from a fake executable on the PATH; cleanup deletes by age, size cap and
retention, removes empty directories, and leaves active files, symlinks' targets and paths
outside its roots alone."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from media import cleanup, resources
from media.cleanup import CleanupSettings, active, clean, clean_host, follow_once
from media.hosts_panel import read_hosts
from media.resources import ResourceSettings, parse_nvidia_smi
from schemas import REGISTRY
from schemas.hosts import GpuFigures, HostResources
from schemas.notify import Notification
from schemas.ticks import ResourceMonitorTick, TempCleanupTick
from streamproc import Codec, ConsumerSettings, Keys, Producer
from streamproc.app import App, AppContext
from streamproc.consumer import Consumer
from streamproc.schedule import tick_id
from tests.helpers import entries

pytestmark = pytest.mark.timeout(30)

DAY_S = 86_400
QUIET = ResourceSettings(
    host="host-a", sampler=False, cpu_threshold=100, memory_threshold=100, disk_threshold=100
)


@pytest.fixture(autouse=True)
def reset_settings() -> Iterator[None]:
    """Host ``host-a``; CPU, memory and disk never alert (this machine may be busy)."""
    resources.use_settings(QUIET)
    cleanup.use_settings(None)
    yield
    resources.use_settings(None)
    cleanup.use_settings(None)


def consumer_of(concern: Any, client: aioredis.Redis, keys: Keys, producer: Producer) -> Consumer:
    return Consumer(
        concern,
        client=client,
        codec=producer.codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="c1", block_ms=50, grace_s=1.0),
    )


def tick(cls: Any, schedule: str, minute: int) -> Any:
    at = datetime(2026, 1, 1, tzinfo=UTC) + timedelta(minutes=minute)
    return cls(id=tick_id(schedule, at), schedule=schedule, scheduled_for=at)


async def out(client: aioredis.Redis, keys: Keys, codec: Codec[Any], topic: str) -> list[Any]:
    return [codec.decode(f) for _, f in await entries(client, keys.stream(topic))]


# -------------------------------------------------------------------- the monitor


async def test_a_tick_publishes_the_hosts_figures_to_its_hash_the_stream_and_the_panel(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    c = consumer_of(resources.CONCERN, client, keys, producer)
    await c.ensure_groups()
    first = tick(ResourceMonitorTick, "resource-monitor", 1)
    await producer.publish(first)
    assert await c.process_once(block_ms=200) == 1

    h = await client.hgetall(resources.host_key(keys, "host-a"))
    assert h[b"host"] == b"host-a"
    assert 0 <= float(h[b"cpu"]) <= 100
    assert 0 < float(h[b"memory"]) <= 100
    assert b'"path":"/"' in h[b"disks"]
    assert h[b"alerts"] == b""
    assert 0 < await client.ttl(resources.host_key(keys, "host-a")) <= 180
    [event] = await out(client, keys, codec, "hosts")
    assert isinstance(event, HostResources)
    assert (event.host, event.key, event.cause_id) == ("host-a", "host-a", first.id)
    assert event.disks[0].total_bytes > 0
    assert await client.zscore(resources.index_key(keys), "host-a") is not None

    # Another tick within the interval: this host was sampled, nothing new.
    await producer.publish(tick(ResourceMonitorTick, "resource-monitor", 2))
    assert await c.process_once(block_ms=200) == 1
    assert len(await out(client, keys, codec, "hosts")) == 1

    panel = await read_hosts(client, keys)
    assert panel.total == 1
    [row] = panel.rows
    assert row[0] == "host-a"
    assert isinstance(row[1], float)
    assert isinstance(row[4], str)  # "none" unless this machine has GPUs
    assert row[-1] == "ok"


async def test_a_threshold_crossed_warns_once_and_recovers_once(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    low = msgspec.structs.replace(QUIET, memory_threshold=0.1)
    for _ in range(3):  # above 0.1 % three samples in a row: one episode
        await client.delete(keys.state("{hosts}", "host-a", "slot"))
        await resources.sample_host(client, keys, producer, via="test", s=low)
    notes = [e for e in await out(client, keys, codec, "notify") if isinstance(e, Notification)]
    assert [(n.severity, n.source, n.cluster_id) for n in notes] == [
        ("warning", "resource-monitor", "")
    ]
    assert notes[0].title.startswith("host host-a: memory ")
    h = await client.hgetall(resources.host_key(keys, "host-a"))
    assert h[b"alerts"] == b"memory"
    assert set(await client.hkeys(resources.alerts_key(keys, "host-a"))) == {b"memory"}
    assert (await read_hosts(client, keys)).rows[0][-1] == "memory"

    high = msgspec.structs.replace(QUIET, recovery_margin=0)
    for _ in range(2):
        await client.delete(keys.state("{hosts}", "host-a", "slot"))
        await resources.sample_host(client, keys, producer, via="test", s=high)
    notes = [e for e in await out(client, keys, codec, "notify") if isinstance(e, Notification)]
    assert [n.severity for n in notes] == ["warning", "info"]
    assert "back to" in notes[1].title
    assert await client.hgetall(resources.alerts_key(keys, "host-a")) == {}


async def test_every_consume_process_samples_its_host_in_the_background(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    """ON_STARTUP: a ``consume`` process samples its host with no tick; other roles do not."""
    resources.use_settings(msgspec.structs.replace(QUIET, sampler=True, host="host-bg"))
    app = App(registry=REGISTRY)
    ingest = AppContext(app=app, role="ingest", redis=client, keys=keys, producer=producer)
    await resources.on_startup(ingest)
    assert ingest.state == {}
    ctx = AppContext(app=app, role="consume", redis=client, keys=keys, producer=producer)
    await resources.on_startup(ctx)
    try:
        # The sample's event (the first write of a sample) within 5 s.
        assert await client.xread({keys.stream("hosts"): "0"}, count=1, block=5000)
    finally:
        await resources.on_shutdown(ctx)
    assert ctx.state == {}
    [event] = await out(client, keys, codec, "hosts")
    assert (event.host, event.cause_id) == ("host-bg", "")


def test_nvidia_smi_output_is_parsed_with_na_figures_and_odd_lines() -> None:
    text = (
        "0, NVIDIA H200, 35, 1234, 143771\n"
        "1, NVIDIA A100-SXM4-80GB, [N/A], [N/A], 81920\n"
        "2, Tesla, Custom, Name, 100, 40000, 40000\n"
        "\n"
        "NVIDIA-SMI has failed because it couldn't communicate with the driver\n"
    )
    g0, g1, g2 = parse_nvidia_smi(text)
    assert g0 == GpuFigures(
        index=0,
        name="NVIDIA H200",
        utilization=35.0,
        memory_used_mib=1234.0,
        memory_total_mib=143771.0,
        memory_percent=0.86,
    )
    assert (g1.index, g1.utilization, g1.memory_used_mib, g1.memory_percent) == (
        1,
        None,
        None,
        None,
    )
    assert (g2.name, g2.memory_percent) == ("Tesla,Custom,Name", 100.0)
    assert parse_nvidia_smi("") == []


async def test_a_fake_nvidia_smi_on_the_path_gives_gpus_and_their_alert(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "nvidia-smi"
    fake.write_text(
        '#!/bin/sh\n[ "$1" = "--query-gpu=index,name,utilization.gpu,memory.used,memory.total" ]'
        ' || exit 9\necho "0, Fake GPU, 50, 7900, 8000"\necho "1, Fake GPU, 5, 100, 8000"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    found = await resources.gpus(ResourceSettings())
    assert [(g.index, g.utilization, g.memory_percent) for g in found] == [
        (0, 50.0, 98.75),
        (1, 5.0, 1.25),
    ]
    await resources.sample_host(client, keys, producer, via="test")
    [event] = await out(client, keys, codec, "hosts")
    assert [g.index for g in event.gpus] == [0, 1]
    assert event.alerts == ["gpu0:memory"]
    [note] = [e for e in await out(client, keys, codec, "notify") if isinstance(e, Notification)]
    assert note.title == "host host-a: GPU 0 memory 98.8% above 95%"
    assert (await read_hosts(client, keys)).rows[0][4] == "0: 50% util, 99% mem; 1: 5% util, 1% mem"

    # One that fails: no GPUs, logged; one that is absent: no GPUs.
    fake.write_text("#!/bin/sh\necho 'driver not loaded' >&2\nexit 3\n")
    with capture_logs() as logs:
        assert await resources.gpus(ResourceSettings()) == []
    assert [e["returncode"] for e in logs if e["event"] == "nvidia_smi_failed"] == [3]
    assert await resources.gpus(ResourceSettings(nvidia_smi="no-such-nvidia-smi")) == []


# -------------------------------------------------------------------- cleanup


def put(path: Path, size: int = 10, age_days: float = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    at = time.time() - age_days * DAY_S
    os.utime(path, (at, at))
    return path


def age_dir(path: Path, age_days: float) -> None:
    at = time.time() - age_days * DAY_S
    os.utime(path, (at, at))


async def test_cleanup_deletes_old_files_keeps_new_ones_and_removes_empty_dirs(
    tmp_path: Path, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    root = tmp_path / "tmp-media"
    old = put(root / "job-1" / "in.mp4", age_days=8)
    new = put(root / "job-2" / "out.mp4", age_days=1)
    age_dir(root / "job-1", 8)
    (root / "fresh-empty").mkdir()
    (root / "old-empty" / "deeper").mkdir(parents=True)
    age_dir(root / "old-empty" / "deeper", 2)
    age_dir(root / "old-empty", 2)
    store = tmp_path / "store"
    expired = put(store / "outputs" / "a.mp4", age_days=31)
    kept = put(store / "outputs" / "b.mp4", age_days=29)
    cleanup.use_settings(CleanupSettings(roots=(str(root),), output_roots=(str(store),)))
    c = consumer_of(cleanup.CONCERN, client, keys, producer)
    await c.ensure_groups()
    await producer.publish(tick(TempCleanupTick, "temp-cleanup", 1))
    with capture_logs() as logs:
        assert await c.process_once(block_ms=200) == 1
    assert not old.exists()
    assert new.exists()
    assert not expired.exists()
    assert kept.exists()
    assert not (root / "job-1").exists()
    assert not (root / "old-empty").exists()
    assert (root / "fresh-empty").is_dir()
    assert root.is_dir()
    [done] = [e for e in logs if e["event"] == "cleanup_done"]
    assert done["files"] == {"age": 1, "retention": 1}
    assert done["bytes"] == {"age": 10, "retention": 10}
    assert done["dirs"] == 3
    assert done["host"] == "host-a"


def test_the_size_cap_deletes_the_oldest_first(tmp_path: Path) -> None:
    root = tmp_path / "r"
    files = [put(root / f"f{i}", size=100, age_days=5 - i) for i in range(5)]  # f0 oldest
    out = clean(CleanupSettings(roots=(str(root),), size_cap_bytes=250), held=())
    assert [f.exists() for f in files] == [False, False, False, True, True]
    assert out.files == {"size_cap": 3}
    assert out.bytes == {"size_cap": 300}


async def test_active_files_are_never_deleted(
    tmp_path: Path, client: aioredis.Redis, keys: Keys
) -> None:
    root = tmp_path / "r"
    job_dir = root / "job-9"
    inside = put(job_dir / "part.mp4", age_days=10)
    single = put(root / "single.wav", age_days=10)
    other = put(root / "other.wav", age_days=10)
    age_dir(job_dir, 10)
    s = CleanupSettings(roots=(str(root),), size_cap_bytes=1)
    async with active(client, keys, job_dir), active(client, keys, single) as held_single:
        assert held_single == str(single.resolve())
        assert await cleanup.active_paths(client, keys) == {
            str(job_dir.resolve()),
            str(single.resolve()),
        }
        result = await clean_host(client, keys, request="r1", via="test", s=s)
    assert result is not None
    assert inside.exists()
    assert single.exists()
    assert not other.exists()
    assert result.skipped["active"] == 2 * 2  # by age, then by the size cap
    assert await cleanup.active_paths(client, keys) == set()  # released on exit
    assert await client.zcard(cleanup.active_key(keys)) == 0
    # Released: the next run deletes them.
    await clean_host(client, keys, request="r2", via="test", s=s)
    assert not inside.exists()
    assert not single.exists()
    assert not job_dir.exists()


def test_symlinks_are_never_followed_out_of_the_root(tmp_path: Path) -> None:
    root = tmp_path / "r"
    outside = tmp_path / "precious"
    target = put(outside / "keep.mp4", age_days=100)
    root.mkdir()
    (root / "dir-link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(target)
    (root / "sub").mkdir()
    (root / "sub" / "link").symlink_to(outside)
    age_dir(root / "sub", 100)
    out = clean(CleanupSettings(roots=(str(root),), size_cap_bytes=1), held=())
    assert target.exists()
    assert (root / "dir-link").is_symlink()
    assert (root / "file-link").is_symlink()
    assert (root / "sub" / "link").is_symlink()  # so "sub" is not empty: kept
    assert out.skipped == {"symlink": 3}
    assert out.files == {}


def test_a_root_that_does_not_exist_is_reported_and_the_others_cleaned(tmp_path: Path) -> None:
    root = tmp_path / "r"
    old = put(root / "old", age_days=8)
    missing = tmp_path / "nope"
    out = clean(CleanupSettings(roots=(str(missing), str(root))), held=())
    assert out.missing_roots == [str(missing)]
    assert not old.exists()


async def test_every_host_cleans_after_the_tick_once(
    tmp_path: Path, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """The tick is handled on host-a; host-b's process sees the request and cleans its own."""
    root = tmp_path / "r"
    cleanup.use_settings(CleanupSettings(roots=(str(root),)))
    assert await follow_once(client, keys) is None  # nothing asked yet
    c = consumer_of(cleanup.CONCERN, client, keys, producer)
    await c.ensure_groups()
    await producer.publish(tick(TempCleanupTick, "temp-cleanup", 1))
    assert await c.process_once(block_ms=200) == 1
    assert await follow_once(client, keys) is None  # host-a served it
    old = put(root / "old", age_days=8)
    resources.use_settings(ResourceSettings(host="host-b", sampler=False))
    assert await follow_once(client, keys) is not None
    assert not old.exists()
    assert await follow_once(client, keys) is None  # once


async def test_a_media_jobs_work_folder_is_held_active_while_the_job_runs(
    client: aioredis.Redis, keys: Keys, tmp_path: Path
) -> None:
    """The folder ``job_dir`` hands a job (with the task's Redis) is in the active set, so
    cleanup skips it, and leaves it when the job ends; the cleanup's default root follows
    ``STREAMPROC_MEDIA_WORK_DIR``."""
    import media
    from media.runtime import runtime

    media.configure_from_env({"STREAMPROC_MEDIA_WORK_DIR": str(tmp_path / "work")})
    try:
        assert cleanup.settings().roots == (str(tmp_path / "work"),)
        rt = runtime()
        async with rt.job_dir("transcode", "t-1", 0, redis=client, keys=keys) as work:
            assert str(work.resolve()) in await cleanup.active_paths(client, keys)
            (work / "in.mp4").write_bytes(b"x")
            os.utime(work / "in.mp4", (1, 1))  # older than any age limit
            clean(cleanup.settings(), await cleanup.active_paths(client, keys))
            assert (work / "in.mp4").exists()
        assert await cleanup.active_paths(client, keys) == set()
        assert not work.exists()
    finally:
        media.configure_from_env({})
