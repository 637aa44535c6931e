"""A loop every ``consume`` process runs in the background (the per-host work of the resource
monitor and the cleanup): started by an App startup hook, cancelled by its shutdown hook."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import structlog

from streamproc.app import AppContext, Hook

__all__ = ("background_loop",)

log = structlog.get_logger("media")


def background_loop(
    name: str,
    step: Callable[[AppContext], Awaitable[None]],
    *,
    every_s: Callable[[], float],
    enabled: Callable[[], bool],
    failed: str,
) -> tuple[Hook, Hook]:
    """``(on_startup, on_shutdown)`` hooks that run ``step`` every ``every_s()`` seconds in
    ``consume`` processes while ``enabled()``. A failing step is logged as ``failed`` (Redis
    away, a disk gone) and the next one runs on time."""

    async def loop(ctx: AppContext) -> None:
        while True:
            try:
                await step(ctx)
            except Exception as e:
                log.warning(failed, error_type=type(e).__name__, error=str(e)[:300])
            await asyncio.sleep(every_s())

    async def on_startup(ctx: AppContext) -> None:
        if ctx.role == "consume" and enabled():
            ctx.state[name] = asyncio.create_task(loop(ctx), name=name)

    async def on_shutdown(ctx: AppContext) -> None:
        task = ctx.state.pop(name, None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return on_startup, on_shutdown
