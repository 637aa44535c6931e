"""``media.render`` on real ffmpeg: timeline lengths with cuts and fades, text overlays (hostile
text included), burned-in subtitles, refused timelines, a missing clip.

The clips are generated here with ffmpeg's test sources, tiny (160x120 or 320x180, 10 fps,
1-2 s) and rendered at 160x120, 10 fps, x264 ``ultrafast``, so the module stays well under a
minute. Frames are compared as raw grey pixels decoded by ffmpeg.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

import media
from media.errors import SourceUnavailable, UnsupportedFormat
from media.jobs import QUEUES
from media.render import Clip, RenderRequest, RenderResult, render
from media.runtime import MediaRuntime, MediaSettings, use_settings
from streamproc import Permanent

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg (make test-deps)"),
]

W, H, FPS = 160, 120, 10
FAST: dict[str, Any] = {"width": W, "height": H, "fps": FPS, "speed": "fastest"}
#: A text that would break or inject into a filter graph if it were written into one, and
#: would change from frame to frame if ``%{...}`` were expanded.
HOSTILE = "it's: a \\ 'test' %{pts} %{n}\n[x],;=%{localtime} \\'"


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def duration_of(path: Path) -> float:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return float(out)


def gray_frame(path: Path, t: float) -> bytes:
    """The frame shown at ``t`` seconds (frame number ``t * FPS``), as W*H grey bytes."""
    n = round(t * FPS)
    return subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-vf", f"select=eq(n\\,{n})",
         "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", "gray", "-"],
        check=True,
        capture_output=True,
    ).stdout  # fmt: skip


def mean(pixels: bytes) -> float:
    return sum(pixels) / len(pixels)


class Ctx:
    def __init__(self, task_id: str = "render-1", attempt: int = 0) -> None:
        self.task_id, self.attempt = task_id, attempt
        self.fractions: list[float] = []
        self.details: list[dict[str, Any]] = []

    async def progress(self, fraction: float, **detail: Any) -> None:
        self.fractions.append(fraction)
        self.details.append(detail)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Clips: ``a`` 1 s with a tone, ``b`` 2 s without audio, ``c`` 1.5 s wider than the
    output with a tone, ``black`` 2 s of black; and SRT files (one under a hostile name)."""
    root = tmp_path_factory.mktemp("render-store")
    (root / "in").mkdir()
    x264 = ("-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p")
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc=duration=1:size={W}x{H}:rate={FPS}",
        "-f", "lavfi", "-i", "sine=frequency=440:duration=1",
        *x264, "-c:a", "aac", "-shortest", str(root / "in" / "a.mp4"),
    )  # fmt: skip
    ffmpeg(
        "-f", "lavfi", "-i", f"testsrc2=duration=2:size={W}x{H}:rate={FPS}",
        *x264, str(root / "in" / "b.mp4"),
    )  # fmt: skip
    ffmpeg(
        "-f", "lavfi", "-i", "color=c=blue:duration=1.5:size=320x180:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=660:duration=1.5",
        *x264, "-c:a", "aac", "-shortest", str(root / "in" / "c.mp4"),
    )  # fmt: skip
    ffmpeg(
        "-f", "lavfi", "-i", f"color=c=black:duration=2:size={W}x{H}:rate={FPS}",
        *x264, str(root / "in" / "black.mp4"),
    )  # fmt: skip
    srt = "1\n00:00:00,500 --> 00:00:01,200\nHELLO SUBTITLES\n"
    (root / "in" / "subs.srt").write_text(srt)
    (root / "in" / "it's [1], a; b: c.srt").write_text(srt)
    (root / "in" / "broken.srt").write_text("1\nnot a time line\nx\n")
    return root


@pytest.fixture
def rt(store_dir: Path, tmp_path: Path) -> Iterator[MediaRuntime]:
    yield use_settings(MediaSettings(store=str(store_dir), work_dir=str(tmp_path / "w"), gpus=()))
    use_settings(MediaSettings())


def local(result: RenderResult) -> Path:
    assert result.output.location.startswith("file://")
    return Path(urllib.parse.unquote(result.output.location.removeprefix("file://")))


def request(**payload: Any) -> RenderRequest:
    """A payload as the task API converts it (validation included)."""
    payload.setdefault("output", FAST)
    return msgspec.convert(payload, RenderRequest)


def test_the_render_queue_is_the_seeds() -> None:
    queue = QUEUES["media.render"]
    assert (queue.priority, queue.concurrency, queue.timeout_s) == (10, 2, 3600)
    task_type = media.TASK_TYPES["media.render"]
    assert task_type.payload_type is RenderRequest
    assert (task_type.concurrency, task_type.max_retries) == (2, 2)


async def test_three_clips_with_cuts_last_their_sum(rt: MediaRuntime) -> None:
    clips = [{"source": "in/a.mp4"}, {"source": "in/b.mp4"}, {"source": "in/c.mp4"}]
    ctx = Ctx("cuts")
    result = await render(request(clips=clips), ctx)
    out = local(result)
    assert result.timeline_s == pytest.approx(4.5)
    assert await asyncio.to_thread(duration_of, out) == pytest.approx(4.5, abs=0.1)
    assert result.output.content_type == "video/mp4"
    assert result.output.size_bytes == out.stat().st_size > 0
    assert (result.encoder, result.width, result.height) == ("libx264", W, H)
    # the wide blue clip is scaled and letterboxed: black bars above and below, blue inside
    frame = await asyncio.to_thread(gray_frame, out, 3.5)
    assert mean(frame[: W * 10]) < 30
    assert mean(frame[W * 55 : W * 65]) > 15
    assert ctx.fractions == sorted(ctx.fractions)
    assert ctx.fractions[-1] == 1.0
    assert any(d.get("stage") == "render" and 0 < d["rendered"] < 1 for d in ctx.details)


async def test_two_half_second_fades_shorten_the_timeline_by_one_second(
    rt: MediaRuntime,
) -> None:
    clips = [
        {"source": "in/a.mp4"},
        {"source": "in/b.mp4", "start_s": 0.5, "duration_s": 1.5},
        {"source": "in/c.mp4"},
    ]
    req = request(clips=clips, transitions=["fade", {"type": "dissolve"}], transition_s=0.5)
    result = await render(req, Ctx("fades"))
    assert result.timeline_s == pytest.approx(1 + 1.5 + 1.5 - 1.0)
    assert await asyncio.to_thread(duration_of, local(result)) == pytest.approx(3.0, abs=0.1)


async def test_a_webm_render_of_clips_without_audio(rt: MediaRuntime) -> None:
    output = {**FAST, "codec": "vp9", "container": "webm"}
    req = request(clips=[{"source": "in/b.mp4"}] * 2, transition="wipeleft", output=output)
    result = await render(req, Ctx("webm"))
    assert result.output.content_type == "video/webm"
    assert result.encoder == "libvpx-vp9"
    assert await asyncio.to_thread(duration_of, local(result)) == pytest.approx(3.5, abs=0.1)


async def test_a_text_overlay_is_burned_in_during_its_window(rt: MediaRuntime) -> None:
    text = {"text": "HELLO", "start_s": 0.5, "end_s": 1.5, "size": 60, "color": "white"}
    result = await render(request(clips=[{"source": "in/black.mp4"}], texts=[text]), Ctx("txt"))
    out = local(result)
    inside = await asyncio.to_thread(gray_frame, out, 1.0)
    before, after = [await asyncio.to_thread(gray_frame, out, t) for t in (0.2, 1.8)]
    assert mean(inside) > mean(before) + 10  # big white letters on black
    assert mean(before) < 5
    assert mean(after) < 5


async def test_hostile_text_renders_literally_without_expansion(
    rt: MediaRuntime, store_dir: Path
) -> None:
    # a task id with filter-graph syntax puts it into the work folder's path as well
    ctx = Ctx("it's: [a],b;c")
    text = {"text": HOSTILE, "end_s": 2.0, "size": 14, "x": 4, "y": 30}
    output = {**FAST, "crf": 0}  # lossless: equal frames decode to equal bytes
    result = await render(
        request(clips=[{"source": "in/black.mp4"}], texts=[text], output=output), ctx
    )
    out = local(result)
    early, late = [await asyncio.to_thread(gray_frame, out, t) for t in (0.1, 1.7)]
    assert mean(early) > 2  # the text is there...
    assert early == late  # ...and the same on every frame: %{pts}, %{n} were not expanded


async def test_burned_in_subtitles_change_the_frames_of_their_cue(rt: MediaRuntime) -> None:
    clips = [{"source": "in/black.mp4"}]
    for key in ("in/subs.srt", "in/it's [1], a; b: c.srt"):
        result = await render(request(clips=clips, subtitles=key), Ctx("subs"))
        assert result.subtitle_cues == 1
        out = local(result)
        during = await asyncio.to_thread(gray_frame, out, 0.8)
        before, after = [await asyncio.to_thread(gray_frame, out, t) for t in (0.2, 1.6)]
        bright = [sum(p > 128 for p in f) for f in (before, during, after)]
        assert bright[1] > 20, bright  # white letters (libass's default style) on black
        assert bright[0] == bright[2] == 0, bright


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"clips": []}, "length >= 1"),
        ({"clips": [{"source": "in/a.mp4"}] * 51}, "length <= 50"),
        ({"clips": [{"source": "in/a.mp4", "start_s": -1}]}, "Expected `float` >= 0"),
        ({"clips": [{"source": "in/a.mp4", "duration_s": 0}]}, "Expected `float` > 0"),
        (
            {
                "clips": [{"source": "x", "duration_s": 1}, {"source": "y", "duration_s": 0.4}],
                "transition": "fade",
                "transition_s": 0.5,
            },
            "transition 0 (fade, 0.5 s) is longer than clip 1 (0.4 s)",
        ),
        (
            {
                "clips": [{"source": "x", "duration_s": 1}] * 3,
                "transition": "fade",
                "transition_s": 0.6,
            },
            "clip 1 (1 s) is shorter than its two transitions together (0.6 s in + 0.6 s out)",
        ),
        (
            {"clips": [{"source": "x"}] * 3, "transitions": ["fade"]},
            "transitions: 1 given for 2 boundaries between 3 clips",
        ),
        ({"clips": [{"source": "x"}] * 2, "transition": "zoom"}, "Invalid enum value 'zoom'"),
        (
            {"clips": [{"source": "x"}], "texts": [{"text": "t", "start_s": 2, "end_s": 1}]},
            "text 0: ends at 1 s, not after its start at 2 s",
        ),
        (
            {
                "clips": [{"source": "x", "duration_s": 2}],
                "texts": [{"text": "t", "start_s": 3, "end_s": 4}],
            },
            "text 0 starts at 3 s, at or after the end of the timeline (2 s)",
        ),
        (
            {"clips": [{"source": "x"}], "texts": [{"text": "t", "end_s": 1, "color": "red:x"}]},
            "color 'red:x' is not #RRGGBB[AA]",
        ),
        ({"clips": [{"source": "x"}], "texts": [{"text": "a\x00b", "end_s": 1}]}, "control"),
        (
            {"clips": [{"source": "x"}], "output": {"codec": "h264", "container": "webm"}},
            "WebM holds only VP8, VP9 and AV1",
        ),
        ({"clips": [{"source": "x"}], "output": {"width": 161}}, "output width 161 must be even"),
        ({"clips": [{"source": "x"}], "output": {"crf": 60}}, "out of range for h264 (0..51)"),
        ({"clips": [{"source": "x"}], "speed": "fast"}, "Object contains unknown field `speed`"),
    ],
)
def test_bad_timelines_are_refused_at_submission_saying_why(
    payload: dict[str, Any], why: str
) -> None:
    # the task API converts the payload: msgspec refuses it (POST /v1/tasks answers 422)
    with pytest.raises(msgspec.ValidationError, match=re.escape(why)):
        msgspec.convert(payload, media.TASK_TYPES["media.render"].payload_type)


def test_a_timeline_built_in_code_is_checked_too() -> None:
    with pytest.raises(
        UnsupportedFormat, match=re.escape("a timeline holds 1..50 clips")
    ) as caught:
        RenderRequest(clips=[Clip(source="x")] * 51)
    assert isinstance(caught.value, Permanent)


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        ({"clips": [{"source": "in/a.mp4", "start_s": 5}]}, "clip 0 starts at 5 s, but"),
        (
            {"clips": [{"source": "in/a.mp4", "start_s": 0.5, "duration_s": 2}]},
            "clip 0 (0.5 s + 2 s) runs past the end of 'in/a.mp4'",
        ),
        (
            {
                "clips": [{"source": "in/a.mp4"}, {"source": "in/b.mp4"}],
                "transition": "fade",
                "transition_s": 1.5,
            },
            "transition 0 (fade, 1.5 s) is longer than clip 0 (1 s)",
        ),
        (
            {
                "clips": [{"source": "in/a.mp4"}],
                "texts": [{"text": "t", "start_s": 1.5, "end_s": 2}],
            },
            "text 0 starts at 1.5 s, at or after the end of the timeline (1 s)",
        ),
        ({"clips": [{"source": "in/a.mp4"}], "subtitles": "in/broken.srt"}, "bad time line"),
    ],
)
async def test_timelines_that_do_not_fit_their_sources_fail_permanently_before_ffmpeg(
    rt: MediaRuntime, payload: dict[str, Any], why: str
) -> None:
    with pytest.raises(UnsupportedFormat, match=re.escape(why)) as caught:
        await render(request(**payload), Ctx("misfit"))
    assert isinstance(caught.value, Permanent)


async def test_a_missing_clip_source_is_permanent(rt: MediaRuntime) -> None:
    req = request(clips=[{"source": "in/a.mp4"}, {"source": "in/none.mp4"}])
    with pytest.raises(SourceUnavailable, match=re.escape("in/none.mp4")) as caught:
        await render(req, Ctx("missing"))
    assert isinstance(caught.value, Permanent)
    with pytest.raises(SourceUnavailable):
        await render(request(clips=[{"source": "in/a.mp4"}], subtitles="in/none.srt"), Ctx())
