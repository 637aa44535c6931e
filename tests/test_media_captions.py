"""Captions on real tools: espeak-ng speech in an ffmpeg-made video, through extract_audio,
pocketsphinx and SRT; silence, missing audio, corrupt input, time limits; the SRT format and
the caption grouping rules on their own.

The speech is espeak-ng's ``en-us+klatt`` voice at 150 words/min: two sentences of common
words with 1.5 s of silence between them. pocketsphinx's general English model is far from
perfect on synthetic voices (espeak's default voice and "hello world" come out as
"oh we're all"); on this voice it gets (nearly) every word, and the test asks for 60 %.
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import subprocess
import wave
from dataclasses import dataclass
from pathlib import Path

import pytest

from media.captions import (
    CaptionSettings,
    Segment,
    TranscribeTimeout,
    Transcript,
    choose_backend,
    extract_audio,
    extract_audio_async,
    group_words,
    parse_srt,
    to_srt,
    transcribe,
    transcribe_async,
)
from media.errors import FfmpegTimeout
from streamproc.config import settings_from_env
from streamproc.errors import ConfigError, Permanent

pytestmark = pytest.mark.timeout(90)

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None,
    reason="needs ffmpeg (make test-deps)",
)
needs_espeak = pytest.mark.skipif(
    shutil.which("espeak-ng") is None, reason="needs espeak-ng (make test-deps)"
)

VOICE = ("-v", "en-us+klatt", "-s", "150")
SENTENCE_1 = "one two three four five six seven"
SENTENCE_2 = "this is a test how are you today"
GAP_S = 1.5


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", *args], check=True)


def wav_duration_s(path: Path) -> float:
    with wave.open(str(path), "rb") as w:
        return w.getnframes() / w.getframerate()


@dataclass(frozen=True)
class Spoken:
    """The speech video, what became of it, and where the silence lies."""

    video: Path
    wav: Path
    transcript: Transcript
    srt: str
    #: The end of sentence 1's audio: the 1.5 s silence starts here (or before).
    silence_start_s: float


@pytest.fixture(scope="module")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> Spoken:
    """One video (black 160x120 + AAC speech), extracted and transcribed once for the module."""
    if shutil.which("espeak-ng") is None or shutil.which("ffmpeg") is None:
        pytest.skip("needs ffmpeg and espeak-ng (make test-deps)")
    d = tmp_path_factory.mktemp("captions")
    for name, text in (("s1", SENTENCE_1), ("s2", SENTENCE_2)):
        subprocess.run(["espeak-ng", *VOICE, "-w", str(d / f"{name}.wav"), text], check=True)
    video = d / "speech.mp4"
    ffmpeg(
        *("-i", str(d / "s1.wav"), "-i", str(d / "s2.wav")),
        *("-f", "lavfi", "-i", "color=c=black:s=160x120:r=10"),
        "-filter_complex",
        f"[0:a]aresample=16000,apad=pad_dur={GAP_S}[a0];[1:a]aresample=16000[a1];"
        "[a0][a1]concat=n=2:v=0:a=1[a]",
        *("-map", "2:v", "-map", "[a]", "-shortest"),
        *("-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", "-ac", "1"),
        str(video),
    )
    wav = d / "speech.wav"
    extract_audio(video, wav, timeout_s=60)
    # The job's path: the recogniser in its own process.
    transcript = asyncio.run(transcribe_async(wav, timeout_s=60))
    return Spoken(
        video=video,
        wav=wav,
        transcript=transcript,
        srt=to_srt(transcript.segments),
        silence_start_s=wav_duration_s(d / "s1.wav"),
    )


@needs_ffmpeg
@needs_espeak
def test_extracted_audio_is_16khz_mono_s16le_of_the_videos_length(spoken: Spoken) -> None:
    with wave.open(str(spoken.wav), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16_000)
    expected = spoken.silence_start_s + GAP_S + 2.0  # sentence 2 lasts about 2 s
    assert abs(wav_duration_s(spoken.wav) - expected) < 1.0


@needs_ffmpeg
@needs_espeak
def test_srt_holds_most_of_the_spoken_words(spoken: Spoken) -> None:
    cues = parse_srt(spoken.srt)
    heard = " ".join(c.text for c in cues).split()
    for sentence in (SENTENCE_1, SENTENCE_2):
        words = sentence.split()
        got = [w for w in words if w in heard]
        assert len(got) >= 0.6 * len(words), f"heard {heard} for {sentence!r}"
    assert spoken.transcript.backend == "pocketsphinx"
    assert spoken.transcript.language == "en"
    assert not spoken.transcript.language_detected


@needs_ffmpeg
@needs_espeak
def test_srt_timings_are_monotonic_within_the_audio_and_split_at_the_silence(
    spoken: Spoken,
) -> None:
    cues = parse_srt(spoken.srt)
    assert [c.text for c in cues] == [s.text for s in spoken.transcript.segments]
    duration_s = wav_duration_s(spoken.wav)
    for a, b in itertools.pairwise(cues):
        assert a.end_s <= b.start_s, f"{a} overlaps {b}"
    for c in cues:
        assert 0.0 <= c.start_s < c.end_s <= duration_s + 0.001
    second = SENTENCE_2.split()
    first_of_2 = next(c for c in cues if any(w in second for w in c.text.split()))
    # Sentence 2's caption starts after the silence begins, near where the speech resumes,
    # and no caption spans the silence.
    assert spoken.silence_start_s <= first_of_2.start_s <= spoken.silence_start_s + GAP_S + 0.5
    before = [c for c in cues if c.start_s < first_of_2.start_s]
    assert before, "sentence 1 has no caption"
    assert all(c.end_s <= spoken.silence_start_s + GAP_S for c in before)


@needs_ffmpeg
async def test_silent_video_gives_an_empty_srt(tmp_path: Path) -> None:
    video = tmp_path / "silent.mp4"
    ffmpeg(
        *("-f", "lavfi", "-i", "color=c=black:s=160x120:r=10:d=3"),
        *("-f", "lavfi", "-i", "anullsrc=r=44100:cl=stereo"),
        *("-t", "3", "-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac", str(video)),
    )
    wav = tmp_path / "silent.wav"
    await extract_audio_async(video, wav, timeout_s=30)
    assert wav_duration_s(wav) > 2.5
    transcript = await asyncio.to_thread(transcribe, wav)
    assert transcript.segments == ()
    assert to_srt(transcript.segments) == ""
    assert parse_srt("") == []


@needs_ffmpeg
async def test_video_without_an_audio_stream_gives_an_empty_srt(tmp_path: Path) -> None:
    video = tmp_path / "mute.mp4"
    ffmpeg(
        *("-f", "lavfi", "-i", "color=c=black:s=160x120:r=10:d=1"),
        *("-c:v", "libx264", "-preset", "ultrafast", str(video)),
    )
    wav = tmp_path / "mute.wav"
    await extract_audio_async(video, wav, timeout_s=30)
    assert wav_duration_s(wav) == 0.0
    assert (await asyncio.to_thread(transcribe, wav)).segments == ()


@needs_ffmpeg
async def test_a_corrupt_file_is_a_permanent_error_with_ffmpegs_message(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 40)
    with pytest.raises(Permanent, match=r"(?i)invalid data|moov atom not found"):
        await extract_audio_async(bad, tmp_path / "out.wav", timeout_s=30)
    # and a file that is not the recogniser's WAV, handed to it directly
    with pytest.raises(Permanent, match="not a WAV file"):
        transcribe(bad)


def test_pocketsphinx_refuses_a_language_it_has_no_model_for(tmp_path: Path) -> None:
    wav = tmp_path / "empty.wav"
    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16_000)
    with pytest.raises(Permanent, match="only the US-English model"):
        transcribe(wav, language="fr")


@needs_ffmpeg
async def test_huge_input_is_bounded_by_the_extraction_time_limit(tmp_path: Path) -> None:
    """About 8 h of audio (one 1 s clip listed 30 000 times): ffmpeg is killed at the limit."""
    clip = tmp_path / "clip.wav"
    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", str(clip))
    playlist = tmp_path / "long.ffconcat"
    playlist.write_text("ffconcat version 1.0\n" + "file clip.wav\n" * 30_000)
    with pytest.raises(FfmpegTimeout, match="time limit"):  # raised only when it killed ffmpeg
        await extract_audio_async(playlist, tmp_path / "long.wav", timeout_s=2.0)


@needs_ffmpeg
@needs_espeak
async def test_recognition_past_its_time_limit_is_killed(spoken: Spoken) -> None:
    with pytest.raises(TranscribeTimeout):  # raised only when it killed the recogniser
        await transcribe_async(spoken.wav, timeout_s=0.3)


# ---------------------------------------------------------------------- SRT and grouping


def test_to_srt_numbers_cues_formats_times_and_wraps_lines() -> None:
    long_text = "a quick brown fox jumps over the lazy dog and keeps on running far"
    srt = to_srt(
        [
            Segment(start_s=1.5, end_s=3.0, text="hello world"),
            Segment(start_s=3661.25, end_s=3663.0005, text=long_text),
        ]
    )
    assert srt == (
        "1\n00:00:01,500 --> 00:00:03,000\nhello world\n\n"
        "2\n01:01:01,250 --> 01:01:03,000\n"
        "a quick brown fox jumps over the lazy dog\nand keeps on running far\n\n"
    )
    back = parse_srt(srt)
    assert [(c.start_s, c.end_s, c.text) for c in back] == [
        (1.5, 3.0, "hello world"),
        (3661.25, 3663.0, long_text),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        "2\n00:00:01,000 --> 00:00:02,000\nmisnumbered\n",
        "1\n00:00:01.000 --> 00:00:02,000\ndot for comma\n",
        "1\n00:00:03,000 --> 00:00:02,000\nbackwards\n",
    ],
)
def test_parse_srt_rejects_malformed_cues(bad: str) -> None:
    with pytest.raises(ValueError, match="SRT cue 1"):
        parse_srt(bad)


def words(*spec: tuple[float, float, str]) -> list[tuple[float, float, str]]:
    return list(spec)


def test_captions_split_at_pauses_at_seven_seconds_and_at_two_lines() -> None:
    s = CaptionSettings()
    pause = words((0.0, 0.4, "good"), (0.5, 0.9, "morning"), (1.8, 2.2, "friends"))
    assert [g.text for g in group_words([pause], s, duration_s=10)] == [
        "good morning",
        "friends",
    ]
    slow = [[(float(i), i + 0.8, f"w{i}") for i in range(10)]]  # one word a second, no pauses
    texts = [g.text for g in group_words(slow, s, duration_s=10)]
    assert texts == ["w0 w1 w2 w3 w4 w5 w6", "w7 w8 w9"]
    fast = [[(i * 0.2, i * 0.2 + 0.15, "abcdefghij") for i in range(12)]]  # 10-letter words
    groups = group_words(fast, s, duration_s=10)
    assert [len(g.text.split()) for g in groups] == [6, 6]  # 3 a line (32 chars), 2 lines
    assert all(len(line) <= 42 for g in groups for line in to_srt([g]).splitlines()[2:])


def test_utterances_never_share_a_caption_and_short_captions_are_held_a_second() -> None:
    s = CaptionSettings()
    groups = group_words(
        [words((0.0, 0.3, "yes")), words((0.5, 0.8, "no")), words((5.0, 5.2, "maybe"))],
        s,
        duration_s=5.6,
    )
    assert [(g.start_s, g.end_s, g.text) for g in groups] == [
        (0.0, 0.5, "yes"),  # held until the next caption starts
        (0.5, 1.5, "no"),  # held to one second
        (5.0, 5.6, "maybe"),  # held to the end of the audio
    ]


def test_settings_are_validated_and_read_from_the_media_prefix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="max_line_chars"):
        CaptionSettings(max_line_chars=3)
    with pytest.raises(ConfigError, match="whisper_device"):
        CaptionSettings(whisper_device="tpu")
    env = {"STREAMPROC_MEDIA_WHISPER_MODEL": str(tmp_path), "STREAMPROC_MEDIA_MAX_LINES": "1"}
    settings = settings_from_env(CaptionSettings, "STREAMPROC_MEDIA_", env)
    assert (settings.whisper_model, settings.max_lines) == (str(tmp_path), 1)
    # faster_whisper is not installed here: a configured model falls back to pocketsphinx
    assert choose_backend(settings) == "pocketsphinx"
    assert choose_backend(CaptionSettings()) == "pocketsphinx"


@needs_ffmpeg
@needs_espeak
def test_the_caption_job_writes_the_srt_to_the_store(spoken: Spoken, tmp_path: Path) -> None:
    """``media.caption`` end to end: source from the store, SRT back with its content type,
    progress growing to 1.0."""
    import msgspec

    from media import TASK_TYPES
    from media.caption_job import CaptionRequest, caption
    from media.runtime import MediaSettings, use_settings

    store = tmp_path / "store"
    (store / "in").mkdir(parents=True)
    shutil.copy(spoken.video, store / "in" / "speech.mp4")
    use_settings(MediaSettings(store=str(store), work_dir=str(tmp_path / "work"), gpus=()))
    fractions: list[float] = []

    class Ctx:
        task_id, attempt = "cap-1", 0

        async def progress(self, fraction: float, **detail: object) -> None:
            fractions.append(fraction)

    try:
        result = asyncio.run(caption(CaptionRequest(source="in/speech.mp4"), Ctx()))
    finally:
        use_settings(MediaSettings())
    assert result.output.content_type == "application/x-subrip"
    assert result.backend == "pocketsphinx"
    srt = Path(result.output.location.removeprefix("file://")).read_text()
    heard = " ".join(s.text for s in parse_srt(srt)).split()
    assert len(set(heard) & set(SENTENCE_1.split())) >= 4
    assert result.captions == len(parse_srt(srt)) >= 2
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert not list((tmp_path / "work").iterdir())  # the work folder is gone
    # The payload is checked when the task is submitted.
    t = TASK_TYPES["media.caption"]
    for bad in ({"source": ""}, {"source": "x", "language": "klingon!"}, {"source": "x", "y": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, t.payload_type)
