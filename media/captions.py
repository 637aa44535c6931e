"""Captions: a video's speech as SRT (issue 15, item 5; the seed's caption queue).

Steps, each usable on its own (the ``media.caption`` job chains them):

1. ``extract_audio`` / ``extract_audio_async``: ffmpeg (``media.ffmpeg.run_ffmpeg``, so the
   same time limit, process-group kill and error classes as the other media jobs) writes the
   first audio stream as 16 kHz mono s16le WAV. A file ffmpeg cannot read is ``FfmpegFailed``
   (``Permanent``, with ffmpeg's message); past ``timeout_s`` ffmpeg is killed and
   ``FfmpegTimeout`` (transient) is raised. A media file without an audio stream gives an
   empty WAV (nothing to caption is not an error).
2. ``transcribe`` (blocking, CPU-bound) / ``transcribe_async`` (the same in a child process
   ``python -m media.captions``, killed past its time limit: the event loop never runs the
   recogniser): a ``Transcript`` of timed caption ``Segment``s.

   - **pocketsphinx** (default): the US-English model inside the pocketsphinx wheel
     (``pocketsphinx.get_model_path()``); no download at run time. Voice activity detection
     (pocketsphinx's ``Endpointer``) cuts the audio into utterances, each decoded on its own
     (at most ``max_utterance_s``, so memory and search stay bounded on long speech); word
     times come from ``Decoder.seg()`` (10 ms frames). It has no language detection: the
     transcript says ``language="en"``, ``language_detected=False``; another language is
     refused (``Permanent``) rather than transcribed as English nonsense.
   - **whisper** (faster-whisper): used when ``CaptionSettings.whisper_model`` names a local
     model directory *and* ``faster_whisper`` is importable. NOT a dependency of this project
     and NOT installed or tested here: the code path follows faster-whisper's documented API
     (``WhisperModel(path).transcribe(..., word_timestamps=True, vad_filter=True)``) but has
     never run in this repository's CI. It detects the language when ``language=None``.

3. ``to_srt``: numbered cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm`` with the text wrapped to
   ``max_line_chars``; ``parse_srt`` reads them back (tests, round trips).

Caption segmentation (both backends): words are grouped in time order; a new caption starts at
an utterance boundary, at a pause of ``pause_split_s`` or more, or when the next word would make
the caption longer than ``max_caption_s`` or its text need more than ``max_lines`` lines of
``max_line_chars``. A caption shown for less than ``min_caption_s`` is held longer, up to the
next caption's start and the audio's end. Silence, or audio with no recognised words, gives an
empty transcript and an empty SRT.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.util
import os
import re
import signal
import sys
import textwrap
import time
import wave
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import msgspec
import structlog

from media.ffmpeg import probe, run_ffmpeg
from streamproc.errors import ConfigError, Permanent, StreamprocError

__all__ = (
    "Backend",
    "CaptionSettings",
    "Segment",
    "TranscribeFailed",
    "TranscribeTimeout",
    "Transcript",
    "choose_backend",
    "extract_audio",
    "extract_audio_async",
    "group_words",
    "parse_srt",
    "to_srt",
    "transcribe",
    "transcribe_async",
)

log = structlog.get_logger("media.captions")

Backend = Literal["pocketsphinx", "whisper"]

#: The recogniser's input: what ``extract_audio`` writes and ``transcribe`` expects.
SAMPLE_RATE = 16_000
#: pocketsphinx's frame rate (its ``frate`` default): ``seg()`` times are in these frames.
_FRAMES_PER_S = 100
#: Languages the bundled pocketsphinx model can be asked for.
_POCKETSPHINX_LANGUAGES = frozenset({"en", "en-us"})


class CaptionSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Read at the entry point with ``settings_from_env(CaptionSettings, "STREAMPROC_MEDIA_",
    env)``: ``STREAMPROC_MEDIA_WHISPER_MODEL``, ``STREAMPROC_MEDIA_MAX_LINE_CHARS``, …"""

    #: A local faster-whisper model directory; empty = pocketsphinx only.
    whisper_model: str = ""
    #: faster-whisper's ``device`` (``auto``, ``cpu``, ``cuda``).
    whisper_device: str = "auto"
    max_line_chars: int = 42
    max_lines: int = 2
    max_caption_s: float = 7.0
    min_caption_s: float = 1.0
    #: A silence between words at least this long starts a new caption.
    pause_split_s: float = 0.6
    #: Continuous speech is cut into utterances of at most this long for pocketsphinx.
    max_utterance_s: float = 30.0

    def __post_init__(self) -> None:
        checks = (
            ("max_line_chars", 10, 200),
            ("max_lines", 1, 4),
            ("max_caption_s", 1.0, 60.0),
            ("min_caption_s", 0.0, 10.0),
            ("pause_split_s", 0.1, 10.0),
            ("max_utterance_s", 5.0, 600.0),
        )
        for name, low, high in checks:
            value = getattr(self, name)
            if not low <= value <= high:
                raise ConfigError(f"CaptionSettings.{name} must be {low}..{high}, got {value}")
        if self.min_caption_s > self.max_caption_s:
            raise ConfigError("CaptionSettings.min_caption_s must be <= max_caption_s")
        if self.whisper_device not in ("auto", "cpu", "cuda"):
            raise ConfigError(
                f"CaptionSettings.whisper_device must be auto, cpu or cuda, "
                f"got {self.whisper_device!r}"
            )


class Segment(msgspec.Struct, frozen=True, kw_only=True):
    """One caption: shown from ``start_s`` to ``end_s`` (seconds from the audio's start)."""

    start_s: float
    end_s: float
    text: str


class Transcript(msgspec.Struct, frozen=True, kw_only=True):
    #: ``en`` for pocketsphinx (its only model); whisper's detected or requested language.
    language: str
    segments: tuple[Segment, ...]
    backend: Backend
    #: True when the backend detected the language (whisper with ``language=None``).
    language_detected: bool = False
    #: The audio's length in seconds.
    duration_s: float = 0.0


class TranscribeFailed(StreamprocError):
    """The recogniser's process failed in a way that may pass on a retry (crash, kill)."""


class TranscribeTimeout(TranscribeFailed):
    """``transcribe_async`` ran past its time limit; its process was killed."""


# ---------------------------------------------------------------------- audio


async def extract_audio_async(
    video: Path,
    wav: Path,
    *,
    timeout_s: float,
    on_progress: Callable[[float], Awaitable[None]] | None = None,
    ffmpeg: str = "ffmpeg",
    ffprobe: str = "ffprobe",
) -> None:
    """The first audio stream of ``video`` as 16 kHz mono s16le WAV at ``wav``.

    Raises ``FfmpegFailed`` (Permanent, ffmpeg's/ffprobe's message) for a file they cannot
    read, ``FfmpegTimeout`` (transient) past ``timeout_s``. No audio stream: an empty WAV.
    """
    started = time.monotonic()
    info = await probe(video, timeout_s=min(60.0, timeout_s), ffprobe=ffprobe)
    if info.audio is None:
        log.info("caption_no_audio_stream", video=str(video))
        _write_empty_wav(wav)
        return
    left_s = max(1.0, timeout_s - (time.monotonic() - started))
    args = [
        *("-i", str(video)),
        *("-map", "0:a:0", "-vn", "-sn", "-dn"),
        *("-ac", "1", "-ar", str(SAMPLE_RATE), "-c:a", "pcm_s16le", "-f", "wav"),
        str(wav),
    ]
    await run_ffmpeg(
        args, duration_s=info.duration_s, timeout_s=left_s, on_progress=on_progress, ffmpeg=ffmpeg
    )


def extract_audio(video: Path, wav: Path, *, timeout_s: float) -> None:
    """Blocking ``extract_audio_async`` (for a worker thread or process without a loop)."""
    asyncio.run(extract_audio_async(video, wav, timeout_s=timeout_s))


def _write_empty_wav(path: Path) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)


@contextlib.contextmanager
def _open_wav(path: Path) -> Iterator[wave.Wave_read]:
    """``path`` open for reading; ``Permanent`` unless it is 16 kHz mono 16-bit WAV."""
    try:
        w = wave.open(str(path), "rb")  # noqa: SIM115  # closed below, after the checks
    except (wave.Error, EOFError) as e:
        raise Permanent(f"{path.name}: not a WAV file ({e})") from e
    with w:
        shape = (w.getnchannels(), w.getsampwidth(), w.getframerate())
        if shape != (1, 2, SAMPLE_RATE):
            raise Permanent(
                f"{path.name}: expected 16 kHz mono 16-bit WAV (extract_audio writes it), got "
                f"{shape[0]} channel(s), {8 * shape[1]}-bit, {shape[2]} Hz"
            )
        yield w


# ---------------------------------------------------------------------- recognition


def choose_backend(settings: CaptionSettings) -> Backend:
    """whisper when a model directory is configured and faster_whisper imports; else
    pocketsphinx."""
    if (
        settings.whisper_model
        and Path(settings.whisper_model).is_dir()
        and importlib.util.find_spec("faster_whisper") is not None
    ):
        return "whisper"
    return "pocketsphinx"


#: (start_s, end_s, word) of one recognised word.
_Word = tuple[float, float, str]
#: Words of one utterance (a stretch of speech between silences).
_Utterance = list[_Word]


def transcribe(
    wav: Path,
    *,
    language: str | None = "en-us",
    backend: Backend | None = None,
    settings: CaptionSettings | None = None,
    on_progress: Callable[[float], None] | None = None,
) -> Transcript:
    """Speech in ``wav`` (16 kHz mono s16le, as ``extract_audio`` writes) as caption segments.

    ``backend=None`` chooses (``choose_backend``). ``language=None`` asks whisper to detect
    the language; pocketsphinx has only US English and reports ``en``, undetected. Blocking
    and CPU-bound: in an event loop use ``transcribe_async``. Silence gives no segments.
    """
    settings = settings or CaptionSettings()
    chosen: Backend = backend or choose_backend(settings)
    with _open_wav(wav) as w:
        duration_s = w.getnframes() / SAMPLE_RATE
        if chosen == "pocketsphinx":
            if language is not None and language.lower() not in _POCKETSPHINX_LANGUAGES:
                raise Permanent(
                    f"pocketsphinx has only the US-English model; language {language!r} needs "
                    "the whisper backend (STREAMPROC_MEDIA_WHISPER_MODEL)"
                )
            utterances = _pocketsphinx_words(w, settings, on_progress)
            lang, detected = "en", False
    if chosen == "whisper":
        utterances, lang, detected = _whisper_words(wav, language, settings)
    segments = group_words(utterances, settings, duration_s=duration_s)
    log.info(
        "caption_transcribed",
        backend=chosen,
        language=lang,
        duration_s=round(duration_s, 2),
        words=sum(len(u) for u in utterances),
        segments=len(segments),
    )
    return Transcript(
        language=lang,
        segments=segments,
        backend=chosen,
        language_detected=detected,
        duration_s=duration_s,
    )


def _clean_word(word: str) -> str | None:
    """A dictionary word without its pronunciation variant (``the(2)``); None for fillers
    (``<s>``, ``</s>``, ``<sil>``, ``[NOISE]``, ``+BREATH+``)."""
    if not word or word[0] in "<[+":
        return None
    return re.sub(r"\(\d+\)$", "", word)


def _pocketsphinx_words(
    w: wave.Wave_read, settings: CaptionSettings, on_progress: Callable[[float], None] | None
) -> list[_Utterance]:
    ps: Any = importlib.import_module("pocketsphinx")  # no type information in the wheel
    ps.set_loglevel("ERROR")
    # dither: 1/2-bit noise so digital silence (zeros) does not derail the features; a fixed
    # seed keeps the result reproducible.
    decoder = ps.Decoder(samprate=SAMPLE_RATE, dither=True, seed=1)
    endpointer = ps.Endpointer(sample_rate=SAMPLE_RATE)
    frame_bytes: int = endpointer.frame_bytes
    total_frames = max(1, w.getnframes())
    max_utt_bytes = int(settings.max_utterance_s * SAMPLE_RATE) * 2
    utterances: list[_Utterance] = []
    utt_start_s: float | None = None  # None: no utterance open
    utt_bytes = 0

    def close() -> None:
        nonlocal utt_start_s, utt_bytes
        decoder.end_utt()
        assert utt_start_s is not None
        words: _Utterance = []
        for seg in decoder.seg():
            text = _clean_word(seg.word)
            if text:
                start = utt_start_s + seg.start_frame / _FRAMES_PER_S
                end = utt_start_s + (seg.end_frame + 1) / _FRAMES_PER_S
                words.append((start, end, text))
        if words:
            utterances.append(words)
        utt_start_s, utt_bytes = None, 0

    frame = w.readframes(frame_bytes // 2)
    while frame:
        following = w.readframes(frame_bytes // 2)
        last = not following or len(frame) < frame_bytes
        speech = endpointer.end_stream(frame) if last else endpointer.process(frame)
        if speech:  # None outside speech; end_stream may return b""
            if utt_start_s is None:
                decoder.start_utt()
                utt_start_s = float(endpointer.speech_start)
            decoder.process_raw(speech, False, False)
            utt_bytes += len(speech)
        if utt_start_s is not None:
            if not endpointer.in_speech or last:
                close()
            elif utt_bytes >= max_utt_bytes:  # a long stretch of speech: cut it here
                cut_s = utt_start_s + utt_bytes / 2 / SAMPLE_RATE
                close()
                decoder.start_utt()
                utt_start_s = cut_s
        if on_progress is not None and utt_start_s is None:
            on_progress(min(1.0, w.tell() / total_frames))
        frame = following
    return utterances


def _whisper_words(
    wav: Path, language: str | None, settings: CaptionSettings
) -> tuple[list[_Utterance], str, bool]:
    """faster-whisper's words, one utterance per whisper segment. UNTESTED here (not
    installed); follows faster-whisper's documented ``WhisperModel.transcribe`` API."""
    try:
        fw: Any = importlib.import_module("faster_whisper")
    except ImportError as e:
        raise Permanent("the whisper backend needs the faster_whisper package") from e
    if not settings.whisper_model or not Path(settings.whisper_model).is_dir():
        raise Permanent(
            f"the whisper backend needs a local model directory; "
            f"STREAMPROC_MEDIA_WHISPER_MODEL={settings.whisper_model!r} is not one"
        )
    model = fw.WhisperModel(settings.whisper_model, device=settings.whisper_device)
    wanted = language.split("-")[0].lower() if language else None
    segments, info = model.transcribe(
        str(wav), language=wanted, word_timestamps=True, vad_filter=True
    )
    utterances: list[_Utterance] = []
    for seg in segments:
        words = [
            (float(wd.start), float(wd.end), str(wd.word).strip())
            for wd in (seg.words or ())
            if str(wd.word).strip()
        ]
        if not words and str(seg.text).strip():
            words = [(float(seg.start), float(seg.end), str(seg.text).strip())]
        if words:
            utterances.append(words)
    return utterances, str(info.language), wanted is None


# ---------------------------------------------------------------------- segmentation


def _lines(text: str, settings: CaptionSettings) -> list[str]:
    return textwrap.wrap(text, settings.max_line_chars, break_long_words=False) or [""]


def group_words(
    utterances: Sequence[Sequence[_Word]], settings: CaptionSettings, *, duration_s: float
) -> tuple[Segment, ...]:
    """Caption segments from timed words (the rules are in the module's docstring)."""
    groups: list[list[_Word]] = []
    for utterance in utterances:
        current: list[_Word] = []
        for word in utterance:
            if current:
                text = " ".join(wd[2] for wd in (*current, word))
                if (
                    word[0] - current[-1][1] >= settings.pause_split_s
                    or word[1] - current[0][0] > settings.max_caption_s
                    or len(_lines(text, settings)) > settings.max_lines
                ):
                    groups.append(current)
                    current = []
            current.append(word)
        if current:
            groups.append(current)
    segments: list[Segment] = []
    for i, group in enumerate(groups):
        start, end = max(0.0, group[0][0]), min(duration_s, group[-1][1])
        limit = groups[i + 1][0][0] if i + 1 < len(groups) else duration_s
        if end - start < settings.min_caption_s:
            end = max(end, min(start + settings.min_caption_s, limit))
        text = " ".join(wd[2] for wd in group)
        segments.append(Segment(start_s=round(start, 3), end_s=round(end, 3), text=text))
    return tuple(segments)


# ---------------------------------------------------------------------- SRT

_TIME_RE = re.compile(r"(\d{2,}):(\d{2}):(\d{2}),(\d{3})")
_CUE_RE = re.compile(rf"^{_TIME_RE.pattern} --> {_TIME_RE.pattern}$")


def _srt_time(seconds: float) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def to_srt(segments: Iterable[Segment], *, max_line_chars: int = 42) -> str:
    """SRT: cues numbered from 1, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, the text wrapped at
    ``max_line_chars``, a blank line after each. No segments: the empty string."""
    cues = []
    for n, seg in enumerate(segments, 1):
        lines = textwrap.wrap(seg.text, max_line_chars, break_long_words=False)
        cues.append(
            f"{n}\n{_srt_time(seg.start_s)} --> {_srt_time(seg.end_s)}\n" + "\n".join(lines)
        )
    return "".join(cue + "\n\n" for cue in cues)


def parse_srt(text: str) -> list[Segment]:
    """Segments of an SRT document (lines of a cue joined with spaces); ``ValueError`` if a
    cue is malformed or misnumbered."""
    segments: list[Segment] = []
    blocks = [b for b in re.split(r"\n\s*\n", text.replace("\r\n", "\n").strip()) if b.strip()]
    for expected, block in enumerate(blocks, 1):
        lines = block.split("\n")
        if len(lines) < 2 or lines[0].strip() != str(expected):
            raise ValueError(f"SRT cue {expected}: expected its number, got {lines[0]!r}")
        m = _CUE_RE.match(lines[1].strip())
        if m is None:
            raise ValueError(f"SRT cue {expected}: bad time line {lines[1]!r}")
        h1, m1, s1, ms1, h2, m2, s2, ms2 = (int(g) for g in m.groups())
        start = h1 * 3600 + m1 * 60 + s1 + ms1 / 1000
        end = h2 * 3600 + m2 * 60 + s2 + ms2 / 1000
        if end < start:
            raise ValueError(f"SRT cue {expected}: ends before it starts")
        segments.append(
            Segment(start_s=start, end_s=end, text=" ".join(x.strip() for x in lines[2:]))
        )
    return segments


# ---------------------------------------------------------------------- child process


class _Request(msgspec.Struct, frozen=True, kw_only=True):
    wav: str
    language: str | None
    backend: Backend | None
    settings: CaptionSettings


class _Message(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    progress: float | None = None
    transcript: Transcript | None = None
    #: A Permanent error's message (the parent raises Permanent with it).
    permanent: str | None = None


async def transcribe_async(
    wav: Path,
    *,
    timeout_s: float,
    language: str | None = "en-us",
    backend: Backend | None = None,
    settings: CaptionSettings | None = None,
    on_progress: Callable[[float], Awaitable[None]] | None = None,
) -> Transcript:
    """``transcribe`` in a child process (``python -m media.captions``, its own session): the
    recogniser never runs on the event loop, and past ``timeout_s`` or on cancellation the
    process group is SIGKILLed. Raises ``Permanent`` as ``transcribe`` does,
    ``TranscribeTimeout`` past the limit, ``TranscribeFailed`` if the process dies."""
    request = _Request(
        wav=str(wav), language=language, backend=backend, settings=settings or CaptionSettings()
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "media.captions",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    decoder = msgspec.json.Decoder(_Message)
    result: _Message | None = None
    stderr = b""

    async def talk() -> None:
        nonlocal result, stderr
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(msgspec.json.encode(request))
        proc.stdin.close()
        err_task = asyncio.ensure_future(proc.stderr.read())
        async for line in proc.stdout:
            msg = decoder.decode(line)
            if msg.progress is not None and on_progress is not None:
                await on_progress(msg.progress)
            if msg.transcript is not None or msg.permanent is not None:
                result = msg
        stderr = await err_task
        await proc.wait()

    try:
        async with asyncio.timeout(timeout_s):
            await talk()
    except TimeoutError:
        raise TranscribeTimeout(
            f"speech recognition ran past its {timeout_s:g}s time limit and was killed"
        ) from None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
    if result is not None and result.permanent is not None:
        raise Permanent(result.permanent)
    if result is None or result.transcript is None or proc.returncode != 0:
        tail = stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise TranscribeFailed(
            f"speech recognition process exited {proc.returncode}: {' | '.join(tail) or '-'}"
        )
    return result.transcript


def _child_main() -> int:
    """``python -m media.captions``: one JSON request on stdin, JSON lines on stdout (logs go
    to stderr, which the parent keeps for its error message)."""
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    request = msgspec.json.decode(sys.stdin.buffer.read(), type=_Request)
    out = sys.stdout.buffer
    last = -1.0

    def progress(fraction: float) -> None:
        nonlocal last
        if fraction - last >= 0.01 or (fraction == 1.0 and last < 1.0):
            last = fraction
            out.write(msgspec.json.encode(_Message(progress=round(fraction, 4))) + b"\n")
            out.flush()

    try:
        transcript = transcribe(
            Path(request.wav),
            language=request.language,
            backend=request.backend,
            settings=request.settings,
            on_progress=progress,
        )
    except Permanent as e:
        out.write(msgspec.json.encode(_Message(permanent=str(e))) + b"\n")
        return 0
    out.write(msgspec.json.encode(_Message(transcript=transcript)) + b"\n")
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
