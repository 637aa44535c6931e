"""``media.render``: clips from a JSON timeline composed into one video (issue 15, item 4).

The subset (docs/media.md, "Render timelines"): clips from the store played one after the
other, each trimmed (``start_s``, ``duration_s``), scaled and padded to the output size and
frame rate; a cut or an ``xfade`` transition at each boundary (the audio crossfades with
``acrossfade`` at a transition and is concatenated at a cut; a clip without audio plays
silence); text overlays drawn with ``drawtext``; an SRT burned in with ``subtitles``; one
output in h264/vp9, mp4/webm. One ffmpeg run does it all, its ``-progress`` measured against
the timeline's computed length.

Everything the payload alone decides is checked at submission (``RenderRequest``'s
``__post_init__``: ``UnsupportedFormat`` is a ``ValueError``, so the task API answers 422 with
the reason); what needs the sources (their lengths) is checked again when the job runs, before
ffmpeg starts, with the same messages.

User text never enters the filter graph: each overlay's text is written to a file that
``drawtext`` reads (``textfile=``, ``expansion=none``: ``%{...}`` stays literal), and every
path or value that does enter it is escaped for both of ffmpeg's parsing levels (``_escape``).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from media.captions import parse_srt
from media.errors import EncoderUnavailable, UnsupportedFormat
from media.ffmpeg import Probe, probe, run_ffmpeg
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
from media.transcode import SOFTWARE, TranscodeRequest, check_format, encoder_args

__all__ = (
    "COLORS",
    "MAX_CLIPS",
    "TRANSITIONS",
    "Clip",
    "RenderOutput",
    "RenderRequest",
    "RenderResult",
    "TextOverlay",
    "Transition",
    "render",
)

#: Clips in one timeline at most.
MAX_CLIPS = 50
#: The ``xfade`` transitions offered (ffmpeg has more; these are the documented subset).
TRANSITIONS = (
    "fade",
    "dissolve",
    "fadeblack",
    "fadewhite",
    "wipeleft",
    "wiperight",
    "wipeup",
    "wipedown",
    "slideleft",
    "slideright",
    "slideup",
    "slidedown",
    "circleopen",
    "circleclose",
    "radial",
    "pixelize",
)
TransitionType = Literal[
    "cut",
    "fade",
    "dissolve",
    "fadeblack",
    "fadewhite",
    "wipeleft",
    "wiperight",
    "wipeup",
    "wipedown",
    "slideleft",
    "slideright",
    "slideup",
    "slidedown",
    "circleopen",
    "circleclose",
    "radial",
    "pixelize",
]
#: Colour names a text may use (or ``#RRGGBB`` / ``#RRGGBBAA``).
COLORS = frozenset(
    (
        *("white", "black", "gray", "grey", "red", "green", "blue", "yellow"),
        *("cyan", "magenta", "orange", "purple", "pink", "brown"),
    )
)
_HEX_COLOR = re.compile(r"#[0-9a-fA-F]{6}([0-9a-fA-F]{2})?")
#: Control characters a text may not hold (newline and tab are fine).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MUXER = {"mp4": "mp4", "webm": "webm"}
_RATE = 48_000

Seconds = Annotated[float, msgspec.Meta(ge=0, le=86_400)]
Length = Annotated[float, msgspec.Meta(gt=0, le=86_400)]


class Clip(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One clip: ``duration_s`` seconds of ``source`` from ``start_s`` (default: to its end)."""

    #: A key in the media store (or a location in it), as for ``media.transcode``.
    source: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]
    start_s: Seconds = 0.0
    duration_s: Length | None = None


class Transition(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A boundary's transition; ``duration_s`` defaults to the request's ``transition_s``."""

    type: TransitionType
    duration_s: Annotated[float, msgspec.Meta(gt=0, le=10)] | None = None


class TextOverlay(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Text drawn from ``start_s`` to ``end_s`` of the output at (``x``, ``y``) pixels from the
    top left (``"center"`` centres it on that axis). Any text is drawn as it is: ``%{...}``
    is not expanded, quotes, colons and backslashes are just characters, newlines break lines."""

    text: Annotated[str, msgspec.Meta(min_length=1, max_length=500)]
    start_s: Seconds = 0.0
    end_s: Length
    x: Annotated[int, msgspec.Meta(ge=0, le=8192)] | Literal["center"] = "center"
    y: Annotated[int, msgspec.Meta(ge=0, le=8192)] | Literal["center"] = "center"
    #: Font size in pixels (DejaVu Sans through fontconfig).
    size: Annotated[int, msgspec.Meta(ge=4, le=512)] = 48
    color: Annotated[str, msgspec.Meta(max_length=16)] = "white"
    #: A half-transparent black box behind the text.
    box: bool = False


class RenderOutput(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    width: Annotated[int, msgspec.Meta(ge=16, le=4096)] = 1280
    height: Annotated[int, msgspec.Meta(ge=16, le=4096)] = 720
    fps: Annotated[int, msgspec.Meta(ge=1, le=60)] = 25
    codec: Literal["h264", "vp9"] = "h264"
    container: Literal["mp4", "webm"] = "mp4"
    #: Constant quality (h264 0..51, default 23; vp9 0..63, default 33).
    crf: Annotated[int, msgspec.Meta(ge=0, le=63)] | None = None
    #: Encoder preset, as for ``media.transcode``.
    speed: Literal["fastest", "fast", "medium", "slow"] = "medium"
    #: The clips' sound (AAC in mp4, Opus in webm); False: no audio stream.
    audio: bool = True


class RenderRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``media.render``."""

    clips: Annotated[list[Clip], msgspec.Meta(min_length=1, max_length=MAX_CLIPS)]
    #: One per boundary (``len(clips) - 1``), each a type or a ``Transition``; empty: every
    #: boundary gets ``transition``.
    transitions: list[TransitionType | Transition] = msgspec.field(default_factory=list)
    transition: TransitionType = "cut"
    #: Length of a transition that does not give its own.
    transition_s: Annotated[float, msgspec.Meta(gt=0, le=10)] = 0.5
    texts: Annotated[list[TextOverlay], msgspec.Meta(max_length=50)] = msgspec.field(
        default_factory=list
    )
    #: An SRT in the store (e.g. a ``media.caption`` output) burned into the picture.
    subtitles: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)] | None = None
    output: RenderOutput = msgspec.field(default_factory=RenderOutput)
    #: The cluster whose viewers may follow the job (``GET /v1/jobs/{id}``, its live feed).
    cluster_id: ClusterId = None

    def __post_init__(self) -> None:
        _check_request(self)


class RenderResult(msgspec.Struct, frozen=True, kw_only=True):
    output: Output
    #: Probed from the output file.
    duration_s: float | None
    #: The timeline's length as computed (clips minus transition overlaps, whole frames).
    timeline_s: float
    width: int
    height: int
    fps: int
    codec: str
    container: str
    encoder: str
    clips: int
    texts: int
    #: Subtitle cues in the burned-in SRT (0 without one).
    subtitle_cues: int
    render_s: float
    #: Seconds of output per second of rendering.
    speed_x: float | None


# ---------------------------------------------------------------------- validation


def _boundaries(req: RenderRequest) -> list[tuple[str, float]]:
    """(type, seconds) of each boundary; a cut is ("cut", 0.0)."""
    given = req.transitions or [req.transition] * (len(req.clips) - 1)
    out: list[tuple[str, float]] = []
    for t in given:
        kind = t if isinstance(t, str) else t.type
        seconds = req.transition_s
        if isinstance(t, Transition) and t.duration_s is not None:
            seconds = t.duration_s
        out.append((kind, 0.0 if kind == "cut" else seconds))
    return out


def _frames(seconds: float, fps: int) -> int:
    return round(seconds * fps)


def _check_timeline(req: RenderRequest, lengths_s: list[float | None]) -> float | None:
    """``UnsupportedFormat`` for a transition that does not fit its clips, or a text that
    starts after the end; the timeline's length when every clip's length is known."""
    fps = req.output.fps
    bounds = _boundaries(req)
    for k, (kind, seconds) in enumerate(bounds):
        if kind != "cut" and _frames(seconds, fps) < 1:
            raise UnsupportedFormat(
                f"transition {k} ({kind}, {seconds:g} s) is shorter than one frame at {fps} fps"
            )
    for i, length in enumerate(lengths_s):
        if length is None:
            continue
        if _frames(length, fps) < 1:
            raise UnsupportedFormat(
                f"clip {i} ({length:g} s) is shorter than one frame at {fps} fps"
            )
        into = bounds[i - 1] if i > 0 else ("cut", 0.0)
        out_of = bounds[i] if i < len(bounds) else ("cut", 0.0)
        for k, (kind, seconds) in ((i - 1, into), (i, out_of)):
            if seconds > length:
                raise UnsupportedFormat(
                    f"transition {k} ({kind}, {seconds:g} s) is longer than clip {i} ({length:g} s)"
                )
        if into[1] + out_of[1] > length:
            raise UnsupportedFormat(
                f"clip {i} ({length:g} s) is shorter than its two transitions together"
                f" ({into[1]:g} s in + {out_of[1]:g} s out): they would overlap"
            )
    if any(length is None for length in lengths_s):
        return None
    frames = sum(_frames(x or 0.0, fps) for x in lengths_s) - sum(
        _frames(s, fps) for _, s in bounds
    )
    total_s = frames / fps
    for j, text in enumerate(req.texts):
        if text.start_s >= total_s:
            raise UnsupportedFormat(
                f"text {j} starts at {text.start_s:g} s, at or after the end of the timeline"
                f" ({total_s:g} s)"
            )
    return total_s


def _check_request(req: RenderRequest) -> None:
    out = req.output
    check_format(out.codec, out.container)
    if out.codec == "h264" and out.crf is not None and out.crf > 51:
        raise UnsupportedFormat(f"crf {out.crf} is out of range for h264 (0..51)")
    for name in ("width", "height"):
        if getattr(out, name) % 2:
            raise UnsupportedFormat(f"output {name} {getattr(out, name)} must be even (4:2:0)")
    if not 1 <= len(req.clips) <= MAX_CLIPS:
        raise UnsupportedFormat(
            f"a timeline holds 1..{MAX_CLIPS} clips, this one has {len(req.clips)}"
        )
    for i, clip in enumerate(req.clips):
        if clip.start_s < 0 or (clip.duration_s is not None and clip.duration_s <= 0):
            raise UnsupportedFormat(f"clip {i}: start_s must be >= 0 and duration_s > 0")
    if req.transitions and len(req.transitions) != len(req.clips) - 1:
        raise UnsupportedFormat(
            f"transitions: {len(req.transitions)} given for {len(req.clips) - 1} boundaries"
            f" between {len(req.clips)} clips (give one per boundary, or none and `transition`)"
        )
    for j, text in enumerate(req.texts):
        if text.start_s < 0 or text.end_s <= text.start_s:
            raise UnsupportedFormat(
                f"text {j}: ends at {text.end_s:g} s, not after its start at {text.start_s:g} s"
            )
        if text.color.lower() not in COLORS and not _HEX_COLOR.fullmatch(text.color):
            raise UnsupportedFormat(
                f"text {j}: color {text.color!r} is not #RRGGBB[AA] or one of "
                + ", ".join(sorted(COLORS))
            )
        if _CONTROL.search(text.text):
            raise UnsupportedFormat(f"text {j} holds a control character (only \\n and \\t)")
    _check_timeline(req, [c.duration_s for c in req.clips])


# ---------------------------------------------------------------------- filter graph

_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_./-")


def _escape_once(value: str) -> str:
    # av_get_token takes the character after a backslash literally, whatever it is.
    return "".join(c if c in _SAFE or ord(c) > 127 else "\\" + c for c in value)


def _escape(value: str) -> str:
    """``value`` as one filter option inside ``-filter_complex``: escaped for the option
    parser (``:`` ``'`` ``\\``), then again for the graph parser (``[ ] , ;`` ``'`` ``\\``), as
    ffmpeg-filters' "Notes on filtergraph escaping" describe. Every ASCII character but
    letters, digits and ``_./-`` is escaped, so nothing in ``value`` can end the option, the
    filter or the graph."""
    return _escape_once(_escape_once(value))


def _filter(name: str, **options: object) -> str:
    if not options:
        return name
    return name + "=" + ":".join(f"{k}={_escape(str(v))}" for k, v in options.items())


def _num(seconds: float) -> str:
    return f"{seconds:.6f}".rstrip("0").rstrip(".") or "0"


def _clip_filters(i: int, frames: int, has_audio: bool, out: RenderOutput) -> list[str]:
    w, h, fps = out.width, out.height, out.fps
    seconds = _num(frames / fps)
    video = ",".join(
        (
            _filter(
                "scale",
                w=w,
                h=h,
                force_original_aspect_ratio="decrease",
                force_divisible_by=2,
            ),
            _filter("pad", w=w, h=h, x="(ow-iw)/2", y="(oh-ih)/2", color="black"),
            _filter("setsar", r=1),
            _filter("fps", fps=fps),
            _filter("format", pix_fmts="yuv420p"),
            # a video stream shorter than asked holds its last frame; then exactly `frames`
            _filter("tpad", stop_mode="clone", stop_duration=seconds),
            _filter("trim", end_frame=frames),
            _filter("setpts", expr="PTS-STARTPTS"),
            # concat outputs microseconds; xfade wants both inputs on one time base
            _filter("settb", expr="AVTB"),
        )
    )
    parts = [f"[{i}:v:0]{video}[v{i}]"]
    if out.audio:
        fmt = _filter("aformat", sample_fmts="fltp", sample_rates=_RATE, channel_layouts="stereo")
        tail = f"{fmt},{_filter('apad')},{_filter('atrim', duration=seconds)}"
        tail += "," + _filter("asetpts", expr="PTS-STARTPTS")
        if has_audio:
            resample = _filter("aresample", out_sample_rate=_RATE)
            parts.append(f"[{i}:a:0]{resample},{tail}[a{i}]")
        else:
            parts.append(f"{_filter('anullsrc', r=_RATE, cl='stereo')},{tail}[a{i}]")
    return parts


@dataclass(frozen=True)
class _Plan:
    inputs: list[str]
    graph: str
    video_label: str
    audio_label: str | None
    timeline_s: float


def _plan(
    req: RenderRequest,
    sources: list[Path],
    probes: list[Probe],
    frames: list[int],
    text_files: list[Path],
    subtitles: Path | None,
) -> _Plan:
    out = req.output
    fps = out.fps
    inputs: list[str] = []
    parts: list[str] = []
    for i, clip in enumerate(req.clips):
        inputs += ["-ss", _num(clip.start_s), "-t", _num(frames[i] / fps), "-i", str(sources[i])]
        parts += _clip_filters(i, frames[i], probes[i].audio is not None, out)
    video, audio = "v0", "a0"
    total = frames[0]
    for k, (kind, seconds) in enumerate(_boundaries(req)):
        nxt = k + 1
        if kind == "cut":
            parts.append(f"[{video}][v{nxt}]{_filter('concat', n=2, v=1, a=0)}[vj{k}]")
            if out.audio:
                parts.append(f"[{audio}][a{nxt}]{_filter('concat', n=2, v=0, a=1)}[aj{k}]")
            total += frames[nxt]
        else:
            overlap = _frames(seconds, fps)
            xfade = _filter(
                "xfade",
                transition=kind,
                duration=_num(overlap / fps),
                offset=_num((total - overlap) / fps),
            )
            parts.append(f"[{video}][v{nxt}]{xfade}[vj{k}]")
            if out.audio:
                across = _filter("acrossfade", d=_num(overlap / fps))
                parts.append(f"[{audio}][a{nxt}]{across}[aj{k}]")
            total += frames[nxt] - overlap
        video, audio = f"vj{k}", f"aj{k}"
    post: list[str] = []
    if subtitles is not None:
        post.append(_filter("subtitles", filename=subtitles))
    for text, path in zip(req.texts, text_files, strict=True):
        options: dict[str, object] = {
            "textfile": path,
            "expansion": "none",
            "fontsize": text.size,
            "fontcolor": text.color,
            "x": "(w-text_w)/2" if text.x == "center" else text.x,
            "y": "(h-text_h)/2" if text.y == "center" else text.y,
            "enable": f"between(t,{_num(text.start_s)},{_num(text.end_s)})",
        }
        if text.box:
            options |= {"box": 1, "boxcolor": "black@0.5", "boxborderw": 8}
        post.append(_filter("drawtext", **options))
    if post:
        parts.append(f"[{video}]{','.join(post)}[vout]")
        video = "vout"
    return _Plan(
        inputs=inputs,
        graph=";".join(parts),
        video_label=video,
        audio_label=audio if out.audio else None,
        timeline_s=total / fps,
    )


# ---------------------------------------------------------------------- the job


async def _encoder(codec: str) -> str:
    available = await runtime().encoders()
    for name in SOFTWARE[codec]:
        if name in available:
            return name
    raise EncoderUnavailable(f"this host's ffmpeg has no {codec} encoder ({SOFTWARE[codec]})")


def _lengths(req: RenderRequest, probes: list[Probe]) -> list[float]:
    """Each clip's length in seconds; ``UnsupportedFormat`` when it runs past its source."""
    slack_s = max(0.05, 1 / req.output.fps)  # container durations round; AAC priming
    lengths: list[float] = []
    for i, (clip, info) in enumerate(zip(req.clips, probes, strict=True)):
        if info.video is None:
            raise UnsupportedFormat(f"clip {i}: source {clip.source!r} has no video stream")
        source_s = info.duration_s
        if source_s is None:
            if clip.duration_s is None:
                raise UnsupportedFormat(
                    f"clip {i}: the length of {clip.source!r} is unknown; give duration_s"
                )
            lengths.append(clip.duration_s)
            continue
        if clip.start_s >= source_s:
            raise UnsupportedFormat(
                f"clip {i} starts at {clip.start_s:g} s, but {clip.source!r} is {source_s:g} s long"
            )
        if clip.duration_s is None:
            lengths.append(source_s - clip.start_s)
        elif clip.start_s + clip.duration_s > source_s + slack_s:
            raise UnsupportedFormat(
                f"clip {i} ({clip.start_s:g} s + {clip.duration_s:g} s) runs past the end of"
                f" {clip.source!r} ({source_s:g} s)"
            )
        else:
            lengths.append(clip.duration_s)
    return lengths


async def render(req: RenderRequest, ctx: JobContext) -> RenderResult:
    """Fetch and probe the clips, check the timeline against them, run ffmpeg, upload."""
    rt = runtime()
    _check_request(req)  # a payload built without validation
    out = req.output
    encoder = await _encoder(out.codec)
    async with work_folder(rt, "render", ctx) as work:
        work = work.resolve()  # the graph names files by absolute path
        await ctx.progress(0.0, stage="fetch")
        fetched: dict[str, Path] = {}
        probes_of: dict[str, Probe] = {}
        for n, clip in enumerate(req.clips):
            if clip.source not in fetched:
                folder = work / f"clip-{n}"
                await asyncio.to_thread(folder.mkdir)
                path = (await fetch_source(rt, clip.source, folder)).resolve()
                fetched[clip.source] = path
                probes_of[clip.source] = await probe(path, ffprobe=rt.settings.ffprobe)
            await ctx.progress(0.04 * (n + 1) / len(req.clips), stage="fetch")
        sources = [fetched[c.source] for c in req.clips]
        probes = [probes_of[c.source] for c in req.clips]
        lengths = _lengths(req, probes)
        timeline_s = _check_timeline(req, list(lengths))
        assert timeline_s is not None  # every length is known now
        subtitles, cues = None, 0
        if req.subtitles is not None:
            folder = work / "subtitles"
            await asyncio.to_thread(folder.mkdir)
            srt = (await fetch_source(rt, req.subtitles, folder)).resolve()
            try:
                text = await asyncio.to_thread(srt.read_text, encoding="utf-8")
                cues = len(parse_srt(text))
            except (UnicodeDecodeError, ValueError) as e:
                raise UnsupportedFormat(f"subtitles {req.subtitles!r}: {e}") from e
            subtitles = srt if cues else None  # no cues (silence): nothing to burn in
        text_files: list[Path] = []
        for j, overlay in enumerate(req.texts):
            path = work / f"text-{j}.txt"
            await asyncio.to_thread(path.write_text, overlay.text, encoding="utf-8")
            text_files.append(path)
        frames = [max(1, _frames(x, out.fps)) for x in lengths]
        plan = _plan(req, sources, probes, frames, text_files, subtitles)
        target = work / f"output.{out.container}"
        args = [*plan.inputs, "-filter_complex", plan.graph, "-map", f"[{plan.video_label}]"]
        codec_req = TranscodeRequest(
            source="-", codec=out.codec, container=out.container, crf=out.crf, speed=out.speed
        )
        args += encoder_args(encoder, out.codec, codec_req)
        if plan.audio_label is not None:
            acodec = "libopus" if out.container == "webm" else "aac"
            args += ["-map", f"[{plan.audio_label}]", "-c:a", acodec, "-b:a", "128k"]
        args += ["-f", _MUXER[out.container]]
        if out.container == "mp4":
            args += ["-movflags", "+faststart"]

        async def on_progress(fraction: float) -> None:
            await ctx.progress(0.05 + 0.9 * fraction, stage="render", rendered=fraction)

        await ctx.progress(0.05, stage="render", rendered=0.0)
        started = time.monotonic()
        await run_ffmpeg(
            [*args, str(target)],
            duration_s=plan.timeline_s,
            timeout_s=rt.settings.render_timeout_s,
            on_progress=on_progress,
            nice=nice_of(QUEUES["media.render"].priority),
            ffmpeg=rt.settings.ffmpeg,
        )
        render_s = time.monotonic() - started
        info = await probe(target, ffprobe=rt.settings.ffprobe)
        await ctx.progress(0.96, stage="upload")
        output = await store_output(rt, "render", ctx.task_id, target)
    await ctx.progress(1.0, stage="done")
    speed_x = round(plan.timeline_s / render_s, 3) if render_s > 0 else None
    return RenderResult(
        output=output,
        duration_s=info.duration_s,
        timeline_s=round(plan.timeline_s, 6),
        width=out.width,
        height=out.height,
        fps=out.fps,
        codec=out.codec,
        container=out.container,
        encoder=encoder,
        clips=len(req.clips),
        texts=len(req.texts),
        subtitle_cues=cues,
        render_s=round(render_s, 3),
        speed_x=speed_x,
    )
