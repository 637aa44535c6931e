"""streamproc._aio.stop: helpers end even when one of them loses a cancellation."""

from __future__ import annotations

import asyncio

import pytest

from streamproc._aio import stop


async def test_stop_ends_a_task_that_swallowed_its_first_cancellation() -> None:
    """What hung a discovery scan in CI: a lease keeper that lost its cancellation inside a
    Redis call and renewed forever. A single cancel() and await would wait here for ever."""
    cancels = 0

    async def keeper() -> None:
        nonlocal cancels
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                cancels += 1
                if cancels == 1:
                    continue  # swallowed, as the Redis call did
                raise

    task = asyncio.create_task(keeper())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(stop(task, nudge_s=0.05), timeout=30)
    assert task.cancelled()
    assert cancels == 2


async def test_stop_raises_what_a_task_failed_with_and_ignores_finished_ones() -> None:
    async def fails() -> None:
        raise RuntimeError("renewal refused")

    async def sleeps() -> None:
        await asyncio.sleep(60)

    done = asyncio.create_task(asyncio.sleep(0))
    failed = asyncio.create_task(fails())
    sleeping = asyncio.create_task(sleeps())
    await asyncio.sleep(0.01)
    with pytest.raises(RuntimeError, match="renewal refused"):
        await stop(done, failed, sleeping)
    assert sleeping.cancelled()
