"""asyncio helpers that keep cancellation intact."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ("stop", "wait_event")


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until ``event`` is set or ``timeout_s`` passed; True if it is set.

    Not ``wait_for`` + ``suppress(TimeoutError)``: on Python 3.11, a task cancelled just as
    that timeout fired could lose the cancellation and loop on (a consumer's shutdown hung on
    it). ``asyncio.timeout`` turns only its own expiry into TimeoutError.
    """
    try:
        async with asyncio.timeout(max(timeout_s, 0.0)):
            await event.wait()
    except TimeoutError:
        return event.is_set()
    return True


async def stop(*tasks: asyncio.Future[Any], nudge_s: float = 1.0) -> None:
    """Cancel ``tasks`` and return once every one has finished; the first exception one of
    them ended with (other than its cancellation) is raised, as awaiting it would have.

    Cancelled again every ``nudge_s`` while one is still running. A single ``cancel()`` and
    ``await`` hung a discovery scan in CI for two minutes: its lease keeper lost the
    cancellation inside a Redis call (on Python 3.11, a cancellation landing while a
    command's connection wait times out can be swallowed) and renewed the lease forever.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for t in pending:
            t.cancel()
        _, pending = await asyncio.wait(pending, timeout=nudge_s)
    failed = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if failed:
        raise failed[0]
