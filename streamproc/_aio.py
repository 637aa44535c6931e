"""asyncio helpers that keep cancellation intact."""

from __future__ import annotations

import asyncio

__all__ = ("wait_event",)


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
