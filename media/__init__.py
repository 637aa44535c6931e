"""Media jobs on Debian's ffmpeg (issue 15): transcode and preview as task types.

The jobs are task types of the engine's task API (``POST /v1/tasks`` with ``type``
``media.transcode`` / ``media.preview``; ``GET /v1/tasks/{id}`` for status, progress and the
result), run by the application's task runner (``consumers.tasks``). See docs/media.md.

Modules: ``store`` (local folder or S3, streamed), ``ffmpeg`` (the subprocess: progress, time
limit, error classes), ``transcode``, ``preview``, ``jobs`` (queue table, shared job steps),
``runtime`` (settings, work folders, GPU slots), ``errors``; ``api`` (job status for clients:
``GET /v1/jobs/{id}`` and the job on its cluster's live feed, ``add_routes`` here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from media import cleanup, resources
from media.caption_job import CaptionRequest, caption, use_caption_settings
from media.captions import CaptionSettings
from media.jobs import QUEUES, STORE_GRACE_S
from media.preview import PreviewRequest, preview
from media.render import RenderRequest, render
from media.runtime import MediaSettings, runtime, use_settings
from media.transcode import TranscodeRequest, transcode
from streamproc.concern import Concern
from streamproc.config import settings_from_env
from streamproc.tasks import TaskContext, TaskType

if TYPE_CHECKING:
    from aiohttp import web

    from streamproc.ingest import Ingest

__all__ = (
    "CONCERNS",
    "ON_SHUTDOWN",
    "ON_STARTUP",
    "QUEUES",
    "TASK_TYPES",
    "CaptionRequest",
    "MediaSettings",
    "PreviewRequest",
    "RenderRequest",
    "TranscodeRequest",
    "add_routes",
    "configure_from_env",
    "runtime",
    "use_settings",
)


def _task_type(name: str, run: object, payload_type: type) -> TaskType:
    q = QUEUES[name]
    tt = TaskType(
        name=name,
        run=run,  # type: ignore[arg-type]  # async fn(payload struct, TaskContext)
        payload_type=payload_type,
        queue="video",
        concurrency=q.concurrency,
        max_retries=q.max_retries,
        retry_base_s=5.0,
        retry_cap_s=120.0,
        # ffmpeg's own limit is q.timeout_s (a transient, retried error); this backstop
        # (permanent, the runner's) also covers downloads and uploads.
        time_limit_s=q.timeout_s + STORE_GRACE_S,
    )
    return _on_feed(tt)


def _on_feed(tt: TaskType) -> TaskType:
    """``tt`` whose jobs, when their payload names a ``cluster_id``, record it in the task and
    put their progress and outcome on that cluster's live feed (``media.api.follow``)."""
    job = tt.run

    async def run(payload: Any, ctx: TaskContext) -> Any:
        cluster_id = getattr(payload, "cluster_id", None)
        if cluster_id is None:
            return await job(payload, ctx)
        # Imported here: media.api loads notifications and the ingest service, which the
        # caption child process (``python -m media.captions``) has no use for (about 1 s).
        from media import api

        return await api.follow(tt, payload, ctx, cluster_id)

    return dataclasses.replace(tt, run=run)


#: The media task types, for ``consumers.tasks.TASK_TYPES``.
TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        _task_type("media.transcode", transcode, TranscodeRequest),
        _task_type("media.preview", preview, PreviewRequest),
        _task_type("media.caption", caption, CaptionRequest),
        _task_type("media.render", render, RenderRequest),
    )
}


def add_routes(app: web.Application, ingest: Ingest) -> None:
    """``GET /v1/jobs/{id}`` on the ingest service (an ``App(routes=...)`` hook)."""
    from media import api  # here, as in _on_feed

    api.add_routes(app, ingest)


#: The tick concerns: the per-host resource monitor and the temp cleanup
#: (docs/media.md); their per-host background loops start with consume roles.
CONCERNS: tuple[Concern, ...] = (resources.CONCERN, cleanup.CONCERN)
ON_STARTUP = (*resources.ON_STARTUP, *cleanup.ON_STARTUP)
ON_SHUTDOWN = (*resources.ON_SHUTDOWN, *cleanup.ON_SHUTDOWN)


def configure_from_env(env: Mapping[str, str]) -> None:
    """``STREAMPROC_MEDIA_<FIELD>`` (``STORE``, ``S3_ENDPOINT_URL``, ``WORK_DIR``, ``GPUS``, …):
    the queues' time limits come from the settings, the rest from ``QUEUES``; and the
    resource monitor's (``STREAMPROC_RESOURCES_*``) and cleanup's (``STREAMPROC_CLEANUP_*``)."""
    settings = settings_from_env(MediaSettings, "STREAMPROC_MEDIA_", env)
    use_settings(settings)
    use_caption_settings(settings_from_env(CaptionSettings, "STREAMPROC_MEDIA_", env))
    resources.configure_from_env(env)
    cleanup.configure_from_env(env, work_dir=settings.work_dir)
