"""The media jobs' settings and per-process runtime: store, work folders, GPU slots, encoders.

``MediaSettings`` come from ``STREAMPROC_MEDIA_<FIELD>`` (``media.configure_from_env``) or
``media.use_settings(...)`` before the first job; ``runtime()`` is this process's runtime.

- **Work folders**: each job gets ``<work_dir>/<kind>-<task id>-<attempt>/`` (input downloads,
  outputs before upload), removed when the job ends however it ends. ``active_dirs`` lists the
  ones in use in this process (for the temp-file cleanup).
- **GPU slots**: ``nvenc_sessions_per_gpu`` slots per GPU (``gpus``; unset = detected with
  ``nvidia-smi``, as the render pool does), handed to the most urgent queue first (its
  ``priority``: transcode 7 before preview 5), then in arrival order. A slot's ffmpeg sees only
  its GPU (``CUDA_VISIBLE_DEVICES``).
- **NVENC check**: ``ffmpeg -encoders`` lists ``h264_nvenc`` whether or not the GPU can run it
  (data-centre GPUs such as the H100/H200 have no NVENC unit), so each (GPU, encoder) is tried
  once on a 0.2 s test source; a failure sends jobs to the software encoder, with the reason in
  the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import structlog

from media.ffmpeg import encoders, run_ffmpeg
from media.store import Store, open_store
from streamproc import _gate  # the engine's priority gate (also the render pool's slot gate)
from streamproc.errors import ConfigError, StreamprocError
from streamproc.offload import detect_gpus

__all__ = ("MediaRuntime", "MediaSettings", "runtime", "use_settings")

log = structlog.get_logger("media")


class MediaSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: Where sources are read and outputs written: a folder or ``s3://bucket/prefix``.
    #: (Not "media": relative to the working directory, that is this package's folder.)
    store: str = "media-store"
    #: S3 endpoint (moto, MinIO); empty = AWS.
    s3_endpoint_url: str = ""
    s3_region: str = "us-east-1"
    #: Jobs' temporary folders; empty = ``<system temp>/streamproc-media``.
    work_dir: str = ""
    #: GPU indices for NVENC; None = detect (nvidia-smi); empty = none.
    gpus: tuple[int, ...] | None = None
    #: NVENC sessions run at once per GPU.
    nvenc_sessions_per_gpu: int = 2
    ffmpeg: str = "ffmpeg"
    ffprobe: str = "ffprobe"
    #: Time limit of one transcode attempt's ffmpeg run (the seed's 30 min).
    transcode_timeout_s: float = 1800.0
    #: Time limit of one preview attempt, all its ffmpeg runs together (the seed's 5 min).
    preview_timeout_s: float = 300.0
    #: Time limit of one caption attempt, audio and recognition together (the seed's 15 min).
    caption_timeout_s: float = 900.0
    #: Time limit of one render attempt's ffmpeg run (the seed's 1 h).
    render_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        if not 1 <= self.nvenc_sessions_per_gpu <= 64:
            raise ConfigError("MediaSettings.nvenc_sessions_per_gpu must be 1..64")
        for name in (
            "transcode_timeout_s",
            "preview_timeout_s",
            "caption_timeout_s",
            "render_timeout_s",
        ):
            if not 0 < getattr(self, name) <= 86_400:
                raise ConfigError(f"MediaSettings.{name} must be > 0 and <= 86400")
        if self.gpus is not None and any(not 0 <= g < 1024 for g in self.gpus):
            raise ConfigError(f"MediaSettings.gpus: GPU indices are 0..1023, got {self.gpus}")


class MediaRuntime:
    def __init__(self, settings: MediaSettings) -> None:
        self.settings = settings
        self.store: Store = open_store(
            settings.store, endpoint_url=settings.s3_endpoint_url, region=settings.s3_region
        )
        self.work_root = Path(settings.work_dir or Path(tempfile.gettempdir()) / "streamproc-media")
        self.active_dirs: set[Path] = set()
        self._gpus: tuple[int, ...] | None = settings.gpus
        self._gpu_gate: _gate.PriorityGate[int] | None = None
        self._gpu_lock = asyncio.Lock()
        self._nvenc_ok: dict[tuple[int, str], str] = {}  # "" = works, else why not

    async def gpus(self) -> tuple[int, ...]:
        async with self._gpu_lock:
            if self._gpus is None:
                self._gpus = await asyncio.to_thread(detect_gpus)
                log.info("media_gpus", gpus=list(self._gpus))
            if self._gpu_gate is None:
                self._gpu_gate = _gate.PriorityGate(
                    [g for g in self._gpus for _ in range(self.settings.nvenc_sessions_per_gpu)]
                )
        return self._gpus

    async def encoders(self) -> frozenset[str]:
        return await encoders(self.settings.ffmpeg)

    @contextlib.asynccontextmanager
    async def gpu_slot(self, priority: int) -> AsyncIterator[int]:
        """Hold an NVENC session slot on some GPU (its index); only when ``gpus()`` has one."""
        if not await self.gpus() or self._gpu_gate is None:
            raise StreamprocError("gpu_slot() on a host without GPUs")
        async with self._gpu_gate.hold(priority) as gpu:
            yield gpu

    async def nvenc_problem(self, gpu: int, encoder: str) -> str:
        """Why ``encoder`` cannot run on ``gpu`` ("" when it can): tried once, then cached."""
        key = (gpu, encoder)
        if key not in self._nvenc_ok:
            args = ["-f", "lavfi", "-i", "testsrc=size=256x144:rate=25:duration=0.2"]
            try:
                await run_ffmpeg(
                    [*args, "-c:v", encoder, "-f", "null", "-"],
                    duration_s=0.2,
                    timeout_s=30,
                    loglevel="error",
                    env={"CUDA_VISIBLE_DEVICES": str(gpu)},
                    ffmpeg=self.settings.ffmpeg,
                )
                self._nvenc_ok[key] = ""
            except StreamprocError as e:
                self._nvenc_ok[key] = str(e)[:300]
                log.warning("nvenc_unavailable", gpu=gpu, encoder=encoder, error=str(e))
        return self._nvenc_ok[key]

    @contextlib.asynccontextmanager
    async def job_dir(
        self, kind: str, job_id: str, attempt: int = 0, *, redis: Any = None, keys: Any = None
    ) -> AsyncIterator[Path]:
        """A fresh work folder for one job attempt, removed afterwards. With ``redis`` and
        ``keys`` it is held active (``media.cleanup.active``): cleanup never touches it."""
        from media import cleanup

        path = self.work_root / f"{kind}-{job_id}-{attempt}"
        await asyncio.to_thread(shutil.rmtree, path, True)  # a crashed attempt's leftovers
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        self.active_dirs.add(path)
        try:
            async with contextlib.AsyncExitStack() as held:
                if redis is not None and keys is not None:
                    await held.enter_async_context(cleanup.active(redis, keys, path))
                yield path
        finally:
            self.active_dirs.discard(path)
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, path, True))


_runtime: MediaRuntime | None = None


def runtime() -> MediaRuntime:
    """This process's media runtime (default settings unless configured before)."""
    global _runtime
    if _runtime is None:
        _runtime = MediaRuntime(MediaSettings())
    return _runtime


def use_settings(settings: MediaSettings) -> MediaRuntime:
    """Replace this process's media settings (jobs already running keep their runtime)."""
    global _runtime
    _runtime = MediaRuntime(settings)
    return _runtime
