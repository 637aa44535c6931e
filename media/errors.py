"""What can go wrong in a media job, as the task runner needs to know it.

Permanent (``streamproc.errors.Permanent``: the task ends ``failed`` at once, no retry):

- ``FfmpegFailed``: ffmpeg or ffprobe exited non-zero on its own: a corrupt or truncated input,
  a stream it cannot decode, options the encoder refuses. The message carries the tool's last
  stderr lines.
- ``UnsupportedFormat``: a codec/container/option combination outside the formats table. It is
  also a ``ValueError``, so raised in a payload's ``__post_init__`` it makes msgspec refuse the
  payload (``POST /v1/tasks`` answers 422 with the reason).
- ``EncoderUnavailable``: this host's ffmpeg has no encoder for the codec (or GPU was required
  and there is none).
- ``SourceUnavailable``: the source object does not exist or is outside the store.

Transient (retried by the task runner with backoff, up to the task type's ``max_retries``):

- ``FfmpegTimeout``: the job's time limit passed; ffmpeg's process group was killed.
- ``FfmpegKilled``: ffmpeg died by a signal it did not get from us (the kernel's OOM killer
  sends SIGKILL), or stopped on a resource error (out of memory, no space left on device, a GPU
  out of encoder sessions): the same job may pass on a retry or on another host.
"""

from __future__ import annotations

from collections.abc import Sequence

from streamproc.errors import Permanent, StreamprocError

__all__ = (
    "EncoderUnavailable",
    "FfmpegFailed",
    "FfmpegKilled",
    "FfmpegTimeout",
    "MediaError",
    "MediaTransient",
    "SourceUnavailable",
    "UnsupportedFormat",
)


class MediaError(StreamprocError):
    """Base class of the media package's errors."""


class MediaTransient(MediaError):
    """A failure that may pass on a retry (not a ``Permanent``)."""


class FfmpegFailed(MediaError, Permanent):
    """ffmpeg/ffprobe refused the job: exit status and its last stderr lines."""

    def __init__(self, tool: str, returncode: int, stderr_tail: Sequence[str], what: str) -> None:
        self.tool, self.returncode, self.stderr_tail = tool, returncode, tuple(stderr_tail)
        last = " | ".join(self.stderr_tail[-5:]) or "(no message)"
        super().__init__(f"{tool} failed {what} (exit {returncode}): {last}")


class FfmpegTimeout(MediaTransient):
    """The time limit passed: ffmpeg's process group was killed."""


class FfmpegKilled(MediaTransient):
    """ffmpeg died by a signal or on a resource error; the message says which."""


class UnsupportedFormat(MediaError, Permanent, ValueError):
    """A format combination outside the supported table; the message says why."""


class EncoderUnavailable(MediaError, Permanent):
    """No encoder for the requested codec on this host."""


class SourceUnavailable(MediaError, Permanent):
    """The job's source is missing or outside the store."""
