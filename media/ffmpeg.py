"""Debian's ``ffmpeg``/``ffprobe`` as asyncio subprocesses: progress, time limit, error classes.

Why a subprocess and not PyAV: the ``ffmpeg`` command line is the interface FFmpeg documents
and tests (filters, NVENC options, muxer flags are written as in its manual); the encoders are
whatever the host's ffmpeg was built with (Debian's has libx264/libx265/libvpx/libaom/libsvtav1
and NVENC); a process can be killed (time limit, cancel) with everything it holds, which a
library call inside our process cannot; and a crash or OOM kill of the encoder takes down
ffmpeg, not the consumer. The event loop only reads short progress lines from a pipe.

- ``run_ffmpeg(args, duration_s=, timeout_s=, on_progress=)`` runs ``ffmpeg -progress pipe:1
  -nostats ... args`` in its own session (process group); the ``out_time_us`` of each progress
  block over ``duration_s`` gives the fraction, reported when it grows, and ``progress=end``
  reports 1.0. Past ``timeout_s``, or when the caller is cancelled, the whole group is
  SIGKILLed and reaped.
- Exit classes (``media.errors``): non-zero exit = ``FfmpegFailed`` (permanent, with the last
  stderr lines) unless stderr names a resource error; death by a signal we did not send (the
  OOM killer), or a resource error = ``FfmpegKilled``; the time limit = ``FfmpegTimeout``
  (both transient).
- ``probe(path)``: ffprobe's format and streams (a corrupt input fails here, permanently).
- ``encoders()``: the encoder names ``ffmpeg -encoders`` lists (cached per binary).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import msgspec
import structlog

from media.errors import FfmpegFailed, FfmpegKilled, FfmpegTimeout

__all__ = (
    "FfmpegResult",
    "Probe",
    "ProbeStream",
    "encoders",
    "probe",
    "run_ffmpeg",
)

log = structlog.get_logger("media.ffmpeg")

#: stderr lines kept for an error message.
STDERR_TAIL_LINES = 20
#: stderr that means "not this input's fault": retry rather than fail for good.
_RESOURCE_ERRORS = (
    "no space left on device",
    "cannot allocate memory",
    "out of memory",
    "resource temporarily unavailable",
    "exiting normally, received signal",
)


@dataclass(frozen=True)
class FfmpegResult:
    elapsed_s: float
    #: The last stderr lines (warnings at the default log level).
    stderr_tail: tuple[str, ...]
    #: The last fraction reported (1.0 once ffmpeg said ``progress=end``).
    progress: float


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: ffmpeg and any child


async def _reap(proc: asyncio.subprocess.Process) -> None:
    _kill_group(proc)
    await asyncio.shield(proc.wait())


async def run_ffmpeg(
    args: Sequence[str],
    *,
    duration_s: float | None,
    timeout_s: float,
    on_progress: Callable[[float], Awaitable[None]] | None = None,
    on_stderr: Callable[[str], None] | None = None,
    loglevel: str = "warning",
    nice: int = 0,
    env: Mapping[str, str] | None = None,
    ffmpeg: str = "ffmpeg",
) -> FfmpegResult:
    """Run ``ffmpeg [global options] *args``; see the module's docstring for what it raises."""
    prefix = ["nice", "-n", str(nice)] if nice and shutil.which("nice") else []
    cmd = [
        *prefix,
        ffmpeg,
        "-hide_banner",
        "-nostdin",
        "-nostats",
        "-loglevel",
        loglevel,
        "-progress",
        "pipe:1",
        "-y",
        *args,
    ]
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, **env} if env else None,
    )
    tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
    last = 0.0
    total_us = duration_s * 1e6 if duration_s and duration_s > 0 else 0.0

    async def read_progress() -> None:
        nonlocal last
        assert proc.stdout is not None
        out_us = 0
        async for raw in proc.stdout:
            key, _, value = raw.decode(errors="replace").strip().partition("=")
            if key == "out_time_us":
                with contextlib.suppress(ValueError):  # "N/A" before the first frame
                    out_us = int(value)
            elif key == "progress":
                if value == "end":
                    fraction = 1.0
                elif total_us:
                    fraction = min(0.999, max(0.0, out_us / total_us))
                else:
                    continue
                if fraction > last:
                    last = fraction
                    if on_progress is not None:
                        await on_progress(fraction)

    async def read_stderr() -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            if line:
                tail.append(line[:1000])
                if on_stderr is not None:
                    on_stderr(line)

    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(read_progress(), read_stderr())
            returncode = await proc.wait()
    except TimeoutError:
        await _reap(proc)
        log.warning("ffmpeg_timeout", timeout_s=timeout_s, pid=proc.pid)
        raise FfmpegTimeout(
            f"ffmpeg ran past its {timeout_s:g}s time limit and was killed"
            f" (at {last:.0%}); last output: {' | '.join(list(tail)[-3:]) or '(none)'}"
        ) from None
    finally:
        if proc.returncode is None:  # cancelled, or a reader failed: never leave it running
            await _reap(proc)
    elapsed_s = time.monotonic() - started
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        hint = " (the kernel's OOM killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        raise FfmpegKilled(
            f"ffmpeg was killed by signal {name or -returncode}{hint} after {elapsed_s:.1f}s; "
            f"last output: {' | '.join(list(tail)[-3:]) or '(none)'}"
        )
    if returncode != 0:
        text = "\n".join(tail).lower()
        if any(marker in text for marker in _RESOURCE_ERRORS):
            raise FfmpegKilled(
                f"ffmpeg stopped on a resource error (exit {returncode}): "
                + " | ".join(list(tail)[-5:])
            )
        raise FfmpegFailed("ffmpeg", returncode, list(tail), "on this job")
    return FfmpegResult(elapsed_s=elapsed_s, stderr_tail=tuple(tail), progress=last)


# ---------------------------------------------------------------------- probe


class ProbeStream(msgspec.Struct, frozen=True, kw_only=True):
    index: int = 0
    codec_type: str = ""
    codec_name: str = ""
    width: int | None = None
    height: int | None = None
    duration: str | None = None


class _ProbeFormat(msgspec.Struct, frozen=True, kw_only=True):
    format_name: str = ""
    duration: str | None = None


class _ProbeOut(msgspec.Struct, frozen=True, kw_only=True):
    streams: list[ProbeStream] = msgspec.field(default_factory=list)
    format: _ProbeFormat = msgspec.field(default_factory=_ProbeFormat)


@dataclass(frozen=True)
class Probe:
    #: ffprobe's demuxer names, e.g. ``mov,mp4,m4a,3gp,3g2,mj2`` or ``matroska,webm``.
    format_name: str
    duration_s: float | None
    streams: tuple[ProbeStream, ...]

    @property
    def video(self) -> ProbeStream | None:
        return next((s for s in self.streams if s.codec_type == "video"), None)

    @property
    def audio(self) -> ProbeStream | None:
        return next((s for s in self.streams if s.codec_type == "audio"), None)


def _seconds(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw else None
    except ValueError:
        return None
    return value if value is not None and value >= 0 else None


async def _capture(cmd: Sequence[str], timeout_s: float) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        raise FfmpegTimeout(f"{cmd[0]} ran past {timeout_s:g}s and was killed") from None
    finally:
        if proc.returncode is None:
            await _reap(proc)
    return proc.returncode or 0, out, err


async def probe(path: Path | str, *, timeout_s: float = 60.0, ffprobe: str = "ffprobe") -> Probe:
    """Format, duration and streams of a media file; ``FfmpegFailed`` if ffprobe refuses it."""
    cmd = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams"]
    rc, out, err = await _capture([*cmd, str(path)], timeout_s)
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    if rc != 0:
        raise FfmpegFailed("ffprobe", rc, lines[-STDERR_TAIL_LINES:], "to read the input")
    parsed = msgspec.json.decode(out, type=_ProbeOut)
    duration = _seconds(parsed.format.duration)
    if duration is None:  # some containers carry the duration on the streams only
        durations = [d for s in parsed.streams if (d := _seconds(s.duration)) is not None]
        duration = max(durations, default=None)
    return Probe(
        format_name=parsed.format.format_name,
        duration_s=duration,
        streams=tuple(parsed.streams),
    )


# ---------------------------------------------------------------------- encoders

_encoders: dict[str, frozenset[str]] = {}


async def encoders(ffmpeg: str = "ffmpeg") -> frozenset[str]:
    """Encoder names ``ffmpeg -encoders`` lists (built in; NVENC listed needs a GPU to run)."""
    if ffmpeg not in _encoders:
        rc, out, err = await _capture([ffmpeg, "-hide_banner", "-encoders"], 30.0)
        if rc != 0:
            raise FfmpegFailed("ffmpeg", rc, err.decode(errors="replace").splitlines(), "-encoders")
        names = set()
        listing = out.decode(errors="replace").split("------", 1)[-1]
        for line in listing.splitlines():
            parts = line.split()
            if len(parts) >= 2 and len(parts[0]) == 6:  # flags column, e.g. "V....D"
                names.add(parts[1])
        _encoders[ffmpeg] = frozenset(names)
    return _encoders[ffmpeg]
