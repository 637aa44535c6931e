"""``media.transcode``: one source into one codec/container, at a bitrate or a quality (CRF).

``FORMATS`` is the supported table (codec -> containers); anything else is refused with
``UnsupportedFormat`` naming why, at submission (the payload's ``__post_init__``) and again
when the job runs. Encoders: ``h264_nvenc``/``hevc_nvenc`` on a GPU slot when the host has a
GPU, ``ffmpeg -encoders`` lists the encoder and a test encode on that GPU works; otherwise the
software encoder (``SOFTWARE``: the first of its list that this ffmpeg has). The result names
the encoder and why it was chosen.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Literal

import msgspec

from media.errors import EncoderUnavailable, UnsupportedFormat
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
from media.runtime import MediaRuntime, runtime

__all__ = (
    "FORMATS",
    "NVENC",
    "SOFTWARE",
    "TranscodeRequest",
    "TranscodeResult",
    "check_format",
    "encoder_args",
    "transcode",
)

Codec = Literal["h264", "h265", "hevc", "vp9", "av1"]
Container = Literal["mp4", "webm", "mkv"]
Speed = Literal["fastest", "fast", "medium", "slow"]

#: Supported codec -> containers (WebM holds only VP8/VP9/AV1 video, by its specification).
FORMATS: dict[str, tuple[str, ...]] = {
    "h264": ("mp4", "mkv"),
    "hevc": ("mp4", "mkv"),
    "vp9": ("webm", "mkv", "mp4"),
    "av1": ("webm", "mkv", "mp4"),
}
#: Software encoders per codec, preferred first (Debian 12's ffmpeg has all but none is assumed).
SOFTWARE: dict[str, tuple[str, ...]] = {
    "h264": ("libx264",),
    "hevc": ("libx265",),
    "vp9": ("libvpx-vp9",),
    "av1": ("libsvtav1", "libaom-av1", "librav1e"),
}
NVENC: dict[str, str] = {"h264": "h264_nvenc", "hevc": "hevc_nvenc"}
#: CRF range per codec (x264/x265 0..51; VP9 and AV1 0..63) and the default.
_CRF: dict[str, tuple[int, int]] = {
    "h264": (51, 23),
    "hevc": (51, 28),
    "vp9": (63, 33),
    "av1": (63, 35),
}
_MUXER = {"mp4": "mp4", "webm": "webm", "mkv": "matroska"}


def canonical_codec(codec: str) -> str:
    return "hevc" if codec == "h265" else codec


def check_format(codec: str, container: str) -> None:
    """``UnsupportedFormat`` with the reason when ``codec`` in ``container`` is not supported."""
    c = canonical_codec(codec)
    if c not in FORMATS:
        raise UnsupportedFormat(f"codec {codec!r} is not supported (one of h264, h265, vp9, av1)")
    if container not in FORMATS[c]:
        why = " (WebM holds only VP8, VP9 and AV1 video)" if container == "webm" else ""
        raise UnsupportedFormat(
            f"{codec} in {container} is not supported{why}; {codec} goes in "
            + ", ".join(FORMATS[c])
        )


class TranscodeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``media.transcode``."""

    #: A key in the media store (``uploads/in.mov``) or a location in it (``s3://…``).
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    codec: Codec = "h264"
    container: Container = "mp4"
    #: Constant quality (lower = better); default per codec. Not with ``bitrate_kbps``.
    crf: Annotated[int, msgspec.Meta(ge=0, le=63)] | None = None
    #: Average video bitrate instead of a quality.
    bitrate_kbps: Annotated[int, msgspec.Meta(ge=16, le=500_000)] | None = None
    #: Output size; one of them alone keeps the aspect ratio. Even numbers (4:2:0 chroma).
    width: Annotated[int, msgspec.Meta(ge=16, le=8192)] | None = None
    height: Annotated[int, msgspec.Meta(ge=16, le=8192)] | None = None
    #: Encoder preset: fastest (x264 ultrafast, VP9 realtime, SVT-AV1 preset 12) … slow.
    speed: Speed = "medium"
    #: Keep the first audio stream (AAC; Opus in WebM).
    audio: bool = True
    audio_bitrate_kbps: Annotated[int, msgspec.Meta(ge=8, le=512)] = 128
    #: auto: NVENC when this host can, else software; cpu: software; gpu: NVENC or fail.
    hardware: Literal["auto", "cpu", "gpu"] = "auto"
    #: The cluster whose viewers may follow the job (``GET /v1/jobs/{id}``, its live feed);
    #: an id as the feed route takes it. None: operators only.
    cluster_id: ClusterId = None

    def __post_init__(self) -> None:
        check_format(self.codec, self.container)
        if self.crf is not None and self.bitrate_kbps is not None:
            raise UnsupportedFormat("give crf or bitrate_kbps, not both")
        high = _CRF[canonical_codec(self.codec)][0]
        if self.crf is not None and self.crf > high:
            raise UnsupportedFormat(f"crf {self.crf} is out of range for {self.codec} (0..{high})")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and value % 2:
                raise UnsupportedFormat(f"{name} {value} must be even (4:2:0 chroma)")
        if self.hardware == "gpu" and canonical_codec(self.codec) not in NVENC:
            raise UnsupportedFormat(f"hardware=gpu: NVENC encodes h264 and h265, not {self.codec}")


class TranscodeResult(msgspec.Struct, frozen=True, kw_only=True):
    output: Output
    codec: str
    container: str
    encoder: str
    #: "gpu:<index>" or "cpu".
    device: str
    #: Why this encoder (e.g. "no GPU on this host", "NVENC failed on GPU 0: …").
    encoder_reason: str
    duration_s: float | None
    width: int | None
    height: int | None
    source_duration_s: float | None
    encode_s: float
    #: Seconds of video per second of encoding.
    speed_x: float | None


def encoder_args(
    encoder: str, codec: str, req: TranscodeRequest
) -> list[str]:  # one encoder's flags
    """Video encoder options for ``req`` (rate control and speed preset)."""
    level = ("fastest", "fast", "medium", "slow").index(req.speed)
    crf = req.crf if req.crf is not None else _CRF[codec][1]
    rate = f"{req.bitrate_kbps}k" if req.bitrate_kbps else ""
    args = ["-c:v", encoder]
    if encoder in ("libx264", "libx265"):
        args += ["-preset", ("ultrafast", "veryfast", "medium", "slow")[level]]
        args += (
            ["-b:v", rate, "-maxrate", rate, "-bufsize", f"{2 * (req.bitrate_kbps or 0)}k"]
            if (rate)
            else ["-crf", str(crf)]
        )
        if encoder == "libx265":
            args += ["-x265-params", "log-level=error"]
    elif encoder.endswith("_nvenc"):
        args += ["-preset", ("p1", "p3", "p5", "p7")[level], "-rc", "vbr"]
        args += ["-b:v", rate] if rate else ["-cq", str(crf), "-b:v", "0"]
    elif encoder == "libvpx-vp9":
        args += [("-deadline", "realtime"), ("-deadline", "good")][min(level, 1)]
        args += ["-cpu-used", ("8", "5", "2", "1")[level], "-row-mt", "1"]
        args += ["-b:v", rate] if rate else ["-crf", str(crf), "-b:v", "0"]
    elif encoder == "libsvtav1":
        args += ["-preset", ("12", "10", "8", "5")[level]]
        args += ["-b:v", rate] if rate else ["-crf", str(crf)]
    elif encoder == "libaom-av1":
        args += ["-usage", "realtime" if level == 0 else "good"]
        args += ["-cpu-used", ("8", "6", "4", "2")[level], "-row-mt", "1"]
        args += ["-b:v", rate] if rate else ["-crf", str(crf), "-b:v", "0"]
    elif encoder == "librav1e":
        args += ["-speed", ("10", "8", "6", "4")[level]]
        args += ["-b:v", rate] if rate else ["-qp", str(min(255, crf * 4))]
    return args


@dataclass(frozen=True)
class _Choice:
    encoder: str
    gpu: int | None
    reason: str


def _software(codec: str, available: frozenset[str], reason: str) -> _Choice:
    for name in SOFTWARE[codec]:
        if name in available:
            return _Choice(name, None, reason)
    raise EncoderUnavailable(
        f"this host's ffmpeg has no {codec} encoder (looked for {', '.join(SOFTWARE[codec])})"
    )


@contextlib.asynccontextmanager
async def _encoder(rt: MediaRuntime, req: TranscodeRequest, codec: str) -> AsyncIterator[_Choice]:
    """The encoder for ``req``, holding a GPU slot while the body runs when it is NVENC."""
    available = await rt.encoders()
    nvenc = NVENC.get(codec)
    if req.hardware == "cpu" or nvenc is None:
        why = "hardware=cpu requested" if req.hardware == "cpu" else f"no NVENC for {codec}"
        yield _software(codec, available, why)
        return
    problem = ""
    if nvenc not in available:
        problem = f"this ffmpeg does not list {nvenc}"
    elif not await rt.gpus():
        problem = "no GPU on this host"
    if not problem:
        async with rt.gpu_slot(QUEUES["media.transcode"].priority) as gpu:
            problem = await rt.nvenc_problem(gpu, nvenc)
            if not problem:
                yield _Choice(nvenc, gpu, f"NVENC on GPU {gpu}")
                return
            problem = f"{nvenc} failed on GPU {gpu}: {problem}"
    if req.hardware == "gpu":
        raise EncoderUnavailable(f"hardware=gpu requested but {problem}")
    yield _software(codec, available, problem)


async def transcode(req: TranscodeRequest, ctx: JobContext) -> TranscodeResult:
    """Run one transcode: fetch, probe, encode (progress), probe the output, upload."""
    rt = runtime()
    check_format(req.codec, req.container)  # a payload built without validation
    codec = canonical_codec(req.codec)
    queue = QUEUES["media.transcode"]
    async with work_folder(rt, "transcode", ctx) as work:
        await ctx.progress(0.0, stage="fetch")
        src = await fetch_source(rt, req.source, work)
        info = await probe(src, ffprobe=rt.settings.ffprobe)
        if info.video is None:
            raise UnsupportedFormat(f"source {req.source!r} has no video stream")
        await ctx.progress(0.02, stage="encode", encoded=0.0)
        out = work / f"output.{req.container}"

        async def on_progress(fraction: float) -> None:
            await ctx.progress(0.02 + 0.93 * fraction, stage="encode", encoded=fraction)

        async with _encoder(rt, req, codec) as choice:
            args = ["-hwaccel", "cuda"] if choice.gpu is not None else []
            args += ["-i", str(src), "-map", "0:v:0", "-pix_fmt", "yuv420p"]
            if req.width or req.height:
                args += ["-vf", f"scale={req.width or -2}:{req.height or -2}"]
            args += encoder_args(choice.encoder, codec, req)
            if codec == "hevc" and req.container == "mp4":
                args += ["-tag:v", "hvc1"]  # what Apple players expect of HEVC in MP4
            if req.audio and info.audio is not None:
                acodec = "libopus" if req.container == "webm" else "aac"
                args += ["-map", "0:a:0", "-c:a", acodec, "-b:a", f"{req.audio_bitrate_kbps}k"]
            else:
                args += ["-an"]
            args += ["-sn", "-dn", "-f", _MUXER[req.container]]
            if req.container == "mp4":
                args += ["-movflags", "+faststart"]
            started = time.monotonic()
            await run_ffmpeg(
                [*args, str(out)],
                duration_s=info.duration_s,
                timeout_s=rt.settings.transcode_timeout_s,
                on_progress=on_progress,
                nice=nice_of(queue.priority),
                env={"CUDA_VISIBLE_DEVICES": str(choice.gpu)} if choice.gpu is not None else None,
                ffmpeg=rt.settings.ffmpeg,
            )
            encode_s = time.monotonic() - started
        result_info = await probe(out, ffprobe=rt.settings.ffprobe)
        await ctx.progress(0.96, stage="upload")
        output = await store_output(rt, "transcode", ctx.task_id, out)
    await ctx.progress(1.0, stage="done")
    video = result_info.video
    return TranscodeResult(
        output=output,
        codec=codec,
        container=req.container,
        encoder=choice.encoder,
        device=f"gpu:{choice.gpu}" if choice.gpu is not None else "cpu",
        encoder_reason=choice.reason,
        duration_s=result_info.duration_s,
        width=video.width if video else None,
        height=video.height if video else None,
        source_duration_s=info.duration_s,
        encode_s=round(encode_s, 3),
        speed_x=round(info.duration_s / encode_s, 3) if info.duration_s and encode_s else None,
    )
