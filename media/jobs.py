"""What the media jobs share: the queue table, the job context, source and output handling.

``QUEUES`` holds the seed's per-queue settings (priority, concurrency, time limit) and this
package's retry counts. A job function takes its payload and a ``JobContext`` (the task
runner's ``TaskContext`` is one), fetches its source through the store into its work folder,
and writes each output back with ``store_output`` (content type set, location returned).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec

from media.errors import SourceUnavailable
from media.runtime import MediaRuntime
from media.store import content_type_of, output_key

__all__ = (
    "QUEUES",
    "ClusterId",
    "JobContext",
    "Output",
    "Queue",
    "fetch_source",
    "store_output",
    "work_folder",
)


@dataclass(frozen=True)
class Queue:
    #: Higher first where queues share something (GPU slots) and as CPU niceness of ffmpeg.
    priority: int
    #: Jobs at once across all runner processes (the task runner's global slots).
    concurrency: int
    #: Time limit of one attempt (the task type's backstop adds ``STORE_GRACE_S``).
    timeout_s: float
    #: Retries of a transient failure (timeout, OOM kill) before the task fails.
    max_retries: int


#: The cluster whose viewers may follow a job (``GET /v1/jobs/{id}``, its live feed): an id
#: as the feed route takes it; None = operators only.
ClusterId = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,252}$")] | None

#: The seed's queues (docs/media.md).
QUEUES: dict[str, Queue] = {
    "media.render": Queue(priority=10, concurrency=2, timeout_s=3600, max_retries=2),
    "media.transcode": Queue(priority=7, concurrency=2, timeout_s=1800, max_retries=2),
    "media.caption": Queue(priority=6, concurrency=1, timeout_s=900, max_retries=2),
    "media.preview": Queue(priority=5, concurrency=4, timeout_s=300, max_retries=3),
}
#: Time beyond a queue's ffmpeg limit for download and upload before the runner gives up.
STORE_GRACE_S = 600.0


def nice_of(priority: int) -> int:
    """ffmpeg's CPU niceness for a queue priority: 10 -> 0, 7 -> 3, 5 -> 5."""
    return max(0, min(19, 10 - priority))


class JobContext(Protocol):
    """What a job needs from the task runner (``streamproc.tasks.TaskContext`` fits)."""

    task_id: str
    attempt: int

    async def progress(self, fraction: float, **detail: Any) -> None: ...


class Output(msgspec.Struct, frozen=True, kw_only=True):
    """One file a job wrote back to the store."""

    name: str
    location: str
    content_type: str
    size_bytes: int


def work_folder(rt: MediaRuntime, kind: str, ctx: JobContext) -> AbstractAsyncContextManager[Path]:
    """The job attempt's work folder (``MediaRuntime.job_dir``), held active against cleanup
    when the context has the task's Redis (the task runner's does)."""
    return rt.job_dir(
        kind,
        ctx.task_id,
        ctx.attempt,
        redis=getattr(ctx, "redis", None),
        keys=getattr(ctx, "keys", None),
    )


async def fetch_source(rt: MediaRuntime, source: str, work: Path) -> Path:
    """The job's source as a local file (streamed from S3 into ``work``)."""
    try:
        return await asyncio.to_thread(rt.store.local_copy, source, work)
    except (FileNotFoundError, ValueError) as e:
        raise SourceUnavailable(f"source {source!r}: {e}") from e


async def store_output(rt: MediaRuntime, kind: str, job_id: str, path: Path) -> Output:
    ctype = content_type_of(path.name)
    key = output_key(kind, job_id, path.name)
    location = await asyncio.to_thread(rt.store.upload, path, key, ctype)
    size = (await asyncio.to_thread(path.stat)).st_size
    return Output(name=path.name, location=location, content_type=ctype, size_bytes=size)
