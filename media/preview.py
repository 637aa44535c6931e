"""``media.preview``: thumbnails at intervals or at scene changes, and a contact sheet.

- ``interval``: ``count`` frames at the middles of ``count`` equal spans of the video
  (``t_k = duration * (k + 0.5) / count``), each by its own short ffmpeg run with an input seek
  (``-ss t_k -i src``: exact, and fast on long inputs since it decodes from the nearest
  keyframe only).
- ``scene``: one decoding pass with ``select='gt(scene,<threshold>)'``; the first ``count``
  frames whose scene score passes the threshold, their times read from ``showinfo``. A video
  without cuts gives no frame (the result says so; no sheet).
- Thumbnails are ``width`` pixels wide (height keeps the aspect ratio), JPEG or PNG; the
  contact sheet tiles them (ffmpeg's ``tile`` filter, ``columns`` wide, default about square).

Progress: one step per frame (interval) or the decoding pass (scene), then the sheet.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from media.errors import FfmpegTimeout, UnsupportedFormat
from media.ffmpeg import probe, run_ffmpeg
from media.jobs import (
    QUEUES,
    ClusterId,
    JobContext,
    Output,
    fetch_source,
    nice_of,
    store_output,
    work_folder,
)
from media.runtime import runtime

__all__ = ("Frame", "PreviewRequest", "PreviewResult", "interval_times", "preview")

_EXT = {"jpeg": "jpg", "png": "png"}
_PTS_TIME = re.compile(r"\bpts_time:\s*(-?[0-9.]+)")


class PreviewRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``media.preview``."""

    source: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    count: Annotated[int, msgspec.Meta(ge=1, le=100)] = 9
    mode: Literal["interval", "scene"] = "interval"
    #: Scene-change score a frame must pass (``select='gt(scene,…)'``), scene mode only.
    scene_threshold: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.3
    format: Literal["jpeg", "png"] = "jpeg"
    #: Thumbnail width in pixels (even); the height keeps the aspect ratio.
    width: Annotated[int, msgspec.Meta(ge=16, le=3840)] = 320
    #: Contact-sheet columns; default ceil(sqrt(frames)). None with ``sheet`` off.
    columns: Annotated[int, msgspec.Meta(ge=1, le=20)] | None = None
    sheet: bool = True
    #: The cluster whose viewers may follow the job (``GET /v1/jobs/{id}``, its live feed);
    #: an id as the feed route takes it. None: operators only.
    cluster_id: ClusterId = None

    def __post_init__(self) -> None:
        if self.width % 2:
            raise UnsupportedFormat(f"width {self.width} must be even")


class Frame(msgspec.Struct, frozen=True, kw_only=True):
    output: Output
    #: The frame's time in the source, seconds.
    time_s: float


class PreviewResult(msgspec.Struct, frozen=True, kw_only=True):
    frames: list[Frame]
    #: None when there is no frame (scene mode without cuts) or ``sheet`` was off.
    sheet: Output | None
    mode: str
    source_duration_s: float | None
    elapsed_s: float


def interval_times(duration_s: float, count: int) -> list[float]:
    """The middles of ``count`` equal spans of ``duration_s``."""
    return [round(duration_s * (k + 0.5) / count, 6) for k in range(count)]


def _quality(fmt: str) -> list[str]:
    return ["-q:v", "3"] if fmt == "jpeg" else []


async def preview(req: PreviewRequest, ctx: JobContext) -> PreviewResult:
    rt = runtime()
    nice = nice_of(QUEUES["media.preview"].priority)
    started = time.monotonic()
    deadline = started + rt.settings.preview_timeout_s

    def remaining_s() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise FfmpegTimeout(f"preview ran past its {rt.settings.preview_timeout_s:g}s limit")
        return left

    ext = _EXT[req.format]
    async with work_folder(rt, "preview", ctx) as work:
        await ctx.progress(0.0, stage="fetch")
        src = await fetch_source(rt, req.source, work)
        info = await probe(src, ffprobe=rt.settings.ffprobe, timeout_s=min(60.0, remaining_s()))
        if info.video is None:
            raise UnsupportedFormat(f"source {req.source!r} has no video stream")
        scale = f"scale={req.width}:-2"
        shots: list[tuple[Path, float]] = []
        if req.mode == "interval":
            duration = info.duration_s or 0.0
            for k, t in enumerate(interval_times(duration, req.count)):
                path = work / f"frame-{k + 1:03d}.{ext}"
                args = ["-ss", f"{t:.6f}", "-i", str(src), "-map", "0:v:0", "-frames:v", "1"]
                args += ["-vf", scale, *_quality(req.format), str(path)]
                await run_ffmpeg(
                    args,
                    duration_s=None,
                    timeout_s=remaining_s(),
                    nice=nice,
                    ffmpeg=rt.settings.ffmpeg,
                )
                if path.exists():  # a seek past the last frame writes nothing
                    shots.append((path, t))
                await ctx.progress(0.9 * (k + 1) / req.count, stage="frames", frames=len(shots))
        else:
            times: list[float] = []

            def on_stderr(line: str) -> None:
                if "Parsed_showinfo" in line and (m := _PTS_TIME.search(line)):
                    times.append(float(m.group(1)))

            async def on_progress(fraction: float) -> None:
                await ctx.progress(0.9 * fraction, stage="scenes")

            pattern = work / f"frame-%03d.{ext}"
            args = ["-i", str(src), "-map", "0:v:0", "-an"]
            args += ["-vf", f"select='gt(scene,{req.scene_threshold})',{scale},showinfo"]
            args += ["-fps_mode", "vfr", "-frames:v", str(req.count), *_quality(req.format)]
            await run_ffmpeg(
                [*args, str(pattern)],
                duration_s=info.duration_s,
                timeout_s=remaining_s(),
                on_progress=on_progress,
                on_stderr=on_stderr,
                loglevel="info",  # showinfo logs each selected frame at info level
                nice=nice,
                ffmpeg=rt.settings.ffmpeg,
            )
            files = sorted(work.glob(f"frame-*.{ext}"))
            shots = list(zip(files, times, strict=False))
        frames: list[Frame] = []
        for path, t in shots:
            output = await store_output(rt, "preview", ctx.task_id, path)
            frames.append(Frame(output=output, time_s=round(t, 6)))
        sheet: Output | None = None
        if req.sheet and shots:
            await ctx.progress(0.92, stage="sheet")
            columns = req.columns or math.ceil(math.sqrt(len(shots)))
            rows = math.ceil(len(shots) / columns)
            listing = work / "frames.txt"
            await asyncio.to_thread(
                listing.write_text, "".join(f"file '{p.name}'\n" for p, _ in shots)
            )
            sheet_path = work / f"sheet.{ext}"
            args = ["-f", "concat", "-safe", "0", "-i", str(listing), "-frames:v", "1"]
            args += ["-vf", f"tile={columns}x{rows}:padding=4:margin=4", *_quality(req.format)]
            await run_ffmpeg(
                [*args, str(sheet_path)],
                duration_s=None,
                timeout_s=remaining_s(),
                nice=nice,
                ffmpeg=rt.settings.ffmpeg,
            )
            sheet = await store_output(rt, "preview", ctx.task_id, sheet_path)
    await ctx.progress(1.0, stage="done", frames=len(frames))
    return PreviewResult(
        frames=frames,
        sheet=sheet,
        mode=req.mode,
        source_duration_s=info.duration_s,
        elapsed_s=round(time.monotonic() - started, 3),
    )
