"""Media jobs on real ffmpeg: transcode matrix, refusals, corrupt input, time limit, progress,
previews, the S3 store on moto and the task runner end to end.

Inputs are generated here with ffmpeg's test sources (2 s, 320x240, 25 fps, a sine tone); the
encoders run at their fastest presets so the module stays well under a minute. NVENC tests
run only where ``nvidia-smi`` exists (``scripts/gpu_media_check.sh`` on a GPU host).
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs in the dev group
import pytest
import redis.asyncio as aioredis

import media
from media.errors import FfmpegFailed, FfmpegTimeout, SourceUnavailable, UnsupportedFormat
from media.ffmpeg import run_ffmpeg
from media.preview import PreviewRequest, interval_times, preview
from media.runtime import MediaRuntime, MediaSettings, use_settings
from media.store import S3Store
from media.transcode import FORMATS, TranscodeRequest, canonical_codec, transcode
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.tasks import TaskStore, task_concern, task_event_class
from tests.helpers import moto_server

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (make test-deps)"),
]

HAS_GPU = shutil.which("nvidia-smi") is not None
EXPECTED_CODEC = {"h264": "h264", "hevc": "hevc", "vp9": "vp9", "av1": "av1"}
EXPECTED_FORMAT = {"mp4": "mp4", "webm": "webm", "mkv": "matroska"}


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


FFPROBE_JSON = ("ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams")


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*FFPROBE_JSON, str(path)],
        check=True,
        capture_output=True,
    ).stdout
    return dict(msgspec.json.decode(out))


def raw_rgb(path: Path) -> bytes:
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout


class Ctx:
    """A job context that records progress (the task runner's TaskContext in production)."""

    def __init__(self, task_id: str = "job-1", attempt: int = 0) -> None:
        self.task_id, self.attempt = task_id, attempt
        self.fractions: list[float] = []
        self.details: list[dict[str, Any]] = []

    async def progress(self, fraction: float, **detail: Any) -> None:
        self.fractions.append(fraction)
        self.details.append(detail)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The media store with the test inputs: a clip with sound, a clip with two cuts, junk."""
    root = tmp_path_factory.mktemp("media-store")
    (root / "in").mkdir()
    ffmpeg(
        "-f", "lavfi", "-i", "testsrc=duration=2:size=320x240:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=2",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-g", "25",
        "-c:a", "aac", "-shortest", str(root / "in" / "clip.mp4"),
    )  # fmt: skip
    ffmpeg(
        "-f", "lavfi", "-i", "color=c=red:size=320x240:rate=25:duration=1",
        "-f", "lavfi", "-i", "color=c=blue:size=320x240:rate=25:duration=1",
        "-f", "lavfi", "-i", "testsrc=size=320x240:rate=25:duration=1",
        "-filter_complex", "[0:v][1:v][2:v]concat=n=3:v=1:a=0",
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        str(root / "in" / "cuts.mp4"),
    )  # fmt: skip
    (root / "in" / "corrupt.mp4").write_bytes(os.urandom(64 * 1024))
    return root


@pytest.fixture
def rt(store_dir: Path, tmp_path: Path) -> Iterator[MediaRuntime]:
    yield use_settings(MediaSettings(store=str(store_dir), work_dir=str(tmp_path / "w"), gpus=()))
    use_settings(MediaSettings())


def local(location: str) -> Path:
    assert location.startswith("file://")
    return Path(location.removeprefix("file://"))


# ---------------------------------------------------------------------- transcode

MATRIX = [(codec, container) for codec, containers in FORMATS.items() for container in containers]


@pytest.mark.parametrize(("codec", "container"), MATRIX)
async def test_each_supported_format_transcodes_and_probes_as_asked(
    rt: MediaRuntime, codec: str, container: str
) -> None:
    ctx = Ctx(f"{codec}-{container}")
    req = TranscodeRequest(source="in/clip.mp4", codec=codec, container=container, speed="fastest")  # type: ignore[arg-type]
    result = await transcode(req, ctx)
    probed = await asyncio.to_thread(ffprobe, local(result.output.location))
    video = next(s for s in probed["streams"] if s["codec_type"] == "video")
    audio = next(s for s in probed["streams"] if s["codec_type"] == "audio")
    assert video["codec_name"] == EXPECTED_CODEC[codec]
    assert (video["width"], video["height"]) == (320, 240)
    assert EXPECTED_FORMAT[container] in probed["format"]["format_name"].split(",")
    assert float(probed["format"]["duration"]) == pytest.approx(2.0, abs=0.1)
    assert audio["codec_name"] == ("opus" if container == "webm" else "aac")
    assert (
        result.output.content_type
        == {
            "mp4": "video/mp4",
            "webm": "video/webm",
            "mkv": "video/x-matroska",
        }[container]
    )
    assert result.device == "cpu"
    assert result.encoder in {"libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1"}
    # progress only grows, and ends at 1.0
    assert ctx.fractions == sorted(ctx.fractions)
    assert len(set(ctx.fractions)) == len(ctx.fractions)
    assert ctx.fractions[-1] == 1.0
    assert any(d.get("stage") == "encode" and 0 < d["encoded"] < 1 for d in ctx.details)


async def test_resolution_and_bitrate_are_applied(rt: MediaRuntime) -> None:
    req = TranscodeRequest(
        source="in/clip.mp4", codec="h264", width=160, bitrate_kbps=200, speed="fastest"
    )
    result = await transcode(req, Ctx())
    assert (result.width, result.height) == (160, 120)
    probed = await asyncio.to_thread(ffprobe, local(result.output.location))
    assert int(probed["format"]["bit_rate"]) < 400_000  # 200k video + 128k audio, roughly


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"codec": "h264", "container": "webm"}, "WebM holds only VP8, VP9 and AV1"),
        ({"codec": "h265", "container": "webm"}, "h265 goes in mp4, mkv"),
        ({"codec": "h264", "crf": 23, "bitrate_kbps": 900}, "not both"),
        ({"codec": "h264", "crf": 60}, "out of range for h264 (0..51)"),
        ({"codec": "vp9", "container": "webm", "width": 321}, "must be even"),
        ({"codec": "vp9", "container": "webm", "hardware": "gpu"}, "NVENC encodes h264 and h265"),
    ],
)
def test_unsupported_combinations_are_refused_permanently_saying_why(
    payload: dict[str, Any], why: str
) -> None:
    body = {"source": "in/clip.mp4", **payload}
    # at submission: the task API converts the payload, msgspec refuses it with the reason
    with pytest.raises(msgspec.ValidationError, match=re.escape(why)):
        msgspec.convert(body, media.TASK_TYPES["media.transcode"].payload_type)
    # built in code: a Permanent error (the runner fails the task without retrying)
    with pytest.raises(UnsupportedFormat, match=re.escape(why)) as caught:
        TranscodeRequest(**body)
    assert isinstance(caught.value, Permanent)


async def test_a_corrupt_input_fails_permanently_with_ffmpegs_message(rt: MediaRuntime) -> None:
    with pytest.raises(FfmpegFailed, match="Invalid data found when processing input") as caught:
        await transcode(TranscodeRequest(source="in/corrupt.mp4"), Ctx())
    assert isinstance(caught.value, Permanent)
    assert caught.value.stderr_tail


async def test_a_missing_or_outside_source_is_permanent(rt: MediaRuntime) -> None:
    for source in ("in/none.mp4", "../etc/passwd", "file:///etc/passwd"):
        with pytest.raises(SourceUnavailable):
            await transcode(TranscodeRequest(source=source), Ctx())


def ffmpeg_children() -> list[psutil.Process]:
    """This process's ffmpeg children (other children, e.g. a moto server, are not ours)."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("ffmpeg") and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


async def test_the_time_limit_kills_ffmpeg_and_the_next_job_runs(
    rt: MediaRuntime, store_dir: Path, tmp_path: Path
) -> None:
    # run_ffmpeg: a 60 s real-time source under a 1 s limit
    fractions: list[float] = []

    async def on_progress(f: float) -> None:
        fractions.append(f)

    args = ["-re", "-f", "lavfi", "-i", "testsrc=duration=60:size=320x240:rate=25"]
    with pytest.raises(FfmpegTimeout, match="1s time limit") as caught:
        await run_ffmpeg(
            [*args, "-f", "null", "-"], duration_s=60, timeout_s=1, on_progress=on_progress
        )
    assert not isinstance(caught.value, Permanent)  # transient: the runner retries it
    assert ffmpeg_children() == []  # the process group is gone
    assert fractions == sorted(fractions)
    assert all(0 < f < 0.1 for f in fractions)
    # a transcode job under a limit it cannot meet, then one with the usual limit
    slow = MediaSettings(
        store=str(store_dir), work_dir=str(tmp_path / "w2"), gpus=(), transcode_timeout_s=0.3
    )
    use_settings(slow)
    with pytest.raises(FfmpegTimeout):
        await transcode(TranscodeRequest(source="in/clip.mp4", codec="av1", speed="slow"), Ctx())
    assert ffmpeg_children() == []
    assert not list((tmp_path / "w2").iterdir())  # its work folder was removed
    use_settings(msgspec.structs.replace(slow, transcode_timeout_s=1800))
    done = await transcode(TranscodeRequest(source="in/clip.mp4", speed="fastest"), Ctx("next"))
    assert done.duration_s == pytest.approx(2.0, abs=0.1)


async def test_run_ffmpeg_progress_grows_and_ends_at_one(tmp_path: Path) -> None:
    fractions: list[float] = []

    async def on_progress(f: float) -> None:
        fractions.append(f)

    args = ["-f", "lavfi", "-i", "testsrc=duration=3:size=640x480:rate=25"]
    args += ["-c:v", "libx264", "-preset", "ultrafast", "-stats_period", "0.1"]
    result = await run_ffmpeg(
        [*args, str(tmp_path / "o.mp4")], duration_s=3, timeout_s=60, on_progress=on_progress
    )
    assert fractions == sorted(fractions)
    assert len(set(fractions)) == len(fractions)
    assert fractions[-1] == 1.0
    assert result.progress == 1.0
    assert len(fractions) >= 2


# ---------------------------------------------------------------------- preview


async def test_interval_preview_frames_are_at_their_times_with_a_contact_sheet(
    rt: MediaRuntime, store_dir: Path, tmp_path: Path
) -> None:
    ctx = Ctx("prev-1")
    result = await preview(PreviewRequest(source="in/clip.mp4", count=4, format="png"), ctx)
    assert [f.time_s for f in result.frames] == interval_times(2.0, 4) == [0.25, 0.75, 1.25, 1.75]
    for i, frame in enumerate(result.frames):
        assert frame.output.content_type == "image/png"
        # the same pixels as frame number ceil(t * 25) of the source, selected by number
        n = math.ceil(frame.time_s * 25)
        ref = tmp_path / f"ref-{i}.png"
        await asyncio.to_thread(
            ffmpeg, "-i", str(store_dir / "in/clip.mp4"),
            "-vf", f"select=eq(n\\,{n}),scale=320:-2", "-frames:v", "1", str(ref),
        )  # fmt: skip
        got = await asyncio.to_thread(raw_rgb, local(frame.output.location))
        assert got == await asyncio.to_thread(raw_rgb, ref), f"frame {i} is not source frame {n}"
    assert result.sheet is not None
    sheet = await asyncio.to_thread(ffprobe, local(result.sheet.location))
    # 2x2 tiles of 320x240, 4 px padding between, 4 px margin around
    assert (sheet["streams"][0]["width"], sheet["streams"][0]["height"]) == (652, 492)
    assert ctx.fractions == sorted(ctx.fractions)
    assert ctx.fractions[-1] == 1.0


async def test_scene_preview_finds_the_cuts(rt: MediaRuntime) -> None:
    result = await preview(PreviewRequest(source="in/cuts.mp4", mode="scene", count=5), Ctx("s"))
    assert [round(f.time_s, 1) for f in result.frames] == [1.0, 2.0]
    assert all(f.output.content_type == "image/jpeg" for f in result.frames)
    assert result.sheet is not None
    assert local(result.sheet.location).stat().st_size > 0


# ---------------------------------------------------------------------- S3 store


async def test_s3_store_round_trip_on_moto(
    store_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3  # type: ignore[import-untyped]

    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
        monkeypatch.setenv(k, v)
    with moto_server() as url:
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        await asyncio.to_thread(s3.create_bucket, Bucket="media-test")
        # a multipart upload and a ranged download of a 6 MiB file (5 MiB parts)
        store = S3Store("media-test", "p", endpoint_url=url, region="us-east-1",
                        part_size_bytes=5 * 1024 * 1024)  # fmt: skip
        big = tmp_path / "big.bin"
        big.write_bytes(os.urandom(6 * 1024 * 1024))
        loc = await asyncio.to_thread(store.upload, big, "in/big.bin", "application/octet-stream")
        assert loc == "s3://media-test/p/in/big.bin"
        back = await asyncio.to_thread(store.local_copy, loc, tmp_path / "dl")
        assert back.read_bytes() == big.read_bytes()
        with pytest.raises(FileNotFoundError):
            await asyncio.to_thread(store.local_copy, "in/none.mp4", tmp_path / "dl2")
        with pytest.raises(ValueError, match="not in the render store"):
            await asyncio.to_thread(store.local_copy, "s3://other/p/x.mp4", tmp_path / "dl3")
        # a transcode whose source and output are in the bucket
        await asyncio.to_thread(store.upload, store_dir / "in/clip.mp4", "in/clip.mp4", "video/mp4")
        use_settings(
            MediaSettings(store="s3://media-test/p", s3_endpoint_url=url,
                          work_dir=str(tmp_path / "w"), gpus=())
        )  # fmt: skip
        try:
            result = await transcode(
                TranscodeRequest(source="in/clip.mp4", container="mkv", speed="fastest"),
                Ctx("s3-job"),
            )
        finally:
            use_settings(MediaSettings())
        assert result.output.location == "s3://media-test/p/media/transcode/s3-job/output.mkv"
        head = await asyncio.to_thread(
            s3.head_object, Bucket="media-test", Key="p/media/transcode/s3-job/output.mkv"
        )
        assert head["ContentType"] == "video/x-matroska"
        assert head["ContentLength"] == result.output.size_bytes
        out = await asyncio.to_thread(store.local_copy, result.output.location, tmp_path / "o")
        probed = await asyncio.to_thread(ffprobe, out)
        assert probed["streams"][0]["codec_name"] == "h264"


# ---------------------------------------------------------------------- task runner


async def test_preview_task_runs_through_the_task_runner(
    rt: MediaRuntime,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    runner = Consumer(
        task_concern(media.TASK_TYPES),
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="media-1", block_ms=50),
    )
    await runner.ensure_groups()
    store = TaskStore(client, keys)
    ids = {"ok": "task-media-ok", "bad": "task-media-bad"}
    payloads: dict[str, dict[str, Any]] = {
        "ok": {"source": "in/clip.mp4", "count": 2},
        "bad": {"source": "in/corrupt.mp4"},
    }
    for what, task_id in ids.items():
        await store.create(task_id, type="media.preview", priority="normal", submitted_by="t")
        await producer.publish(
            task_event_class("normal", "video")(
                id=task_id, task_type="media.preview", payload=payloads[what], priority="normal"
            )
        )
    while await runner.process_once():
        pass
    ok, bad = await store.get(ids["ok"]), await store.get(ids["bad"])
    assert ok is not None
    assert bad is not None
    assert ok.status == "completed", ok.error
    assert ok.progress == 1.0
    assert [f["time_s"] for f in ok.result["frames"]] == [0.5, 1.5]
    assert ok.result["sheet"]["content_type"] == "image/jpeg"
    assert bad.status == "failed"
    assert bad.attempts == 1  # permanent: not retried
    assert "Invalid data found" in (bad.error or "")


# ---------------------------------------------------------------------- NVENC (GPU hosts)


@pytest.mark.skipif(not HAS_GPU, reason="no nvidia-smi: no GPU on this host")
@pytest.mark.parametrize("codec", ["h264", "h265"])
async def test_nvenc_on_a_gpu_host(store_dir: Path, tmp_path: Path, codec: str) -> None:
    """With a GPU, auto uses NVENC when the GPU can encode, else says why it did not."""
    use_settings(MediaSettings(store=str(store_dir), work_dir=str(tmp_path / "w")))
    try:
        result = await transcode(TranscodeRequest(source="in/clip.mp4", codec=codec), Ctx(codec))  # type: ignore[arg-type]
        probed = await asyncio.to_thread(ffprobe, local(result.output.location))
        assert probed["streams"][0]["codec_name"] == EXPECTED_CODEC[canonical_codec(codec)]
        if result.encoder.endswith("_nvenc"):
            assert result.device.startswith("gpu:")
        else:  # e.g. H100/H200: no NVENC unit; the result says why
            assert "failed on GPU" in result.encoder_reason, result.encoder_reason
            if os.environ.get("MEDIA_REQUIRE_NVENC") == "1":
                pytest.fail(f"NVENC required but not used: {result.encoder_reason}")
    finally:
        use_settings(MediaSettings())
