"""The ``media.caption`` task type: a video's speech as an SRT file in the store.

One attempt, under the queue's time limit (``MediaSettings.caption_timeout_s``, the seed's
15 min) for all its steps together: fetch the source, extract its audio with ffmpeg
(``captions.extract_audio_async``, progress 0.02-0.2), recognise the speech in a child process
(``captions.transcribe_async``, 0.2-0.95), write ``captions.srt`` and upload it
(``application/x-subrip``). A time limit passed is a transient error (the runner retries it up
to the queue's ``max_retries``); a file ffmpeg cannot read, or a language the backend cannot
do, is permanent. No audio, or only silence: an empty SRT, not an error.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec

from media.captions import CaptionSettings, to_srt, transcribe_async
from media.captions import extract_audio_async as extract_audio
from media.errors import FfmpegTimeout
from media.jobs import ClusterId, JobContext, Output, fetch_source, store_output, work_folder
from media.runtime import runtime

__all__ = ("CaptionRequest", "CaptionResult", "caption", "use_caption_settings")


class CaptionRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``media.caption``."""

    source: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    #: ``en`` / ``en-us`` (the bundled pocketsphinx model), or ``auto``: the Whisper backend
    #: detects it when configured; pocketsphinx then answers English.
    language: Annotated[str, msgspec.Meta(pattern=r"^(auto|[a-z]{2}(-[a-z]{2})?)$")] = "en-us"
    #: The cluster whose viewers may follow the job (``GET /v1/jobs/{id}``, its live feed);
    #: an id as the feed route takes it. None: operators only.
    cluster_id: ClusterId = None


class CaptionResult(msgspec.Struct, frozen=True, kw_only=True):
    output: Output
    language: str
    language_detected: bool
    #: ``pocketsphinx`` or ``whisper``.
    backend: str
    captions: int
    words: int
    audio_s: float | None
    #: Seconds of audio per second of the whole job.
    speed_x: float | None


_settings = CaptionSettings()


def use_caption_settings(settings: CaptionSettings) -> None:
    """The recogniser's settings from now on (``STREAMPROC_MEDIA_WHISPER_MODEL`` …)."""
    global _settings
    _settings = settings


async def caption(req: CaptionRequest, ctx: JobContext) -> CaptionResult:
    rt = runtime()
    limit_s = rt.settings.caption_timeout_s
    started = time.monotonic()

    def left_s() -> float:
        left = limit_s - (time.monotonic() - started)
        if left <= 0:
            raise FfmpegTimeout(f"captioning ran past its {limit_s:g}s limit")
        return left

    async with work_folder(rt, "caption", ctx) as work:
        await ctx.progress(0.0, stage="fetch")
        src = await fetch_source(rt, req.source, work)
        wav = work / "audio.wav"

        async def extracted(fraction: float) -> None:
            await ctx.progress(0.02 + 0.18 * fraction, stage="audio")

        await extract_audio(
            src,
            wav,
            timeout_s=left_s(),
            on_progress=extracted,
            ffmpeg=rt.settings.ffmpeg,
            ffprobe=rt.settings.ffprobe,
        )

        async def recognised(fraction: float) -> None:
            await ctx.progress(0.2 + 0.75 * fraction, stage="speech")

        transcript = await transcribe_async(
            wav,
            timeout_s=left_s(),
            language=None if req.language == "auto" else req.language,
            settings=_settings,
            on_progress=recognised,
        )
        srt = work / "captions.srt"
        srt.write_text(to_srt(transcript.segments, max_line_chars=_settings.max_line_chars))
        output = await store_output(rt, "caption", ctx.task_id, srt)
        await ctx.progress(1.0, stage="done")
    took = time.monotonic() - started
    audio_s = transcript.duration_s
    return CaptionResult(
        output=output,
        language=transcript.language,
        language_detected=transcript.language_detected,
        backend=transcript.backend,
        captions=len(transcript.segments),
        words=sum(len(s.text.split()) for s in transcript.segments),
        audio_s=audio_s,
        speed_x=round(audio_s / took, 2) if audio_s and took > 0 else None,
    )
