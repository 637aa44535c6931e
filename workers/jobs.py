"""A worker's monitoring job: the runtime schedule ``worker.<id>`` firing ``tick.worker_poll``
(``key`` = the worker id) every ``interval_s``, spread within the interval by the scheduler."""

from __future__ import annotations

from datetime import datetime

import redis.asyncio as aioredis

from schemas.workers import WorkerPollTick
from streamproc.keys import Keys
from streamproc.scheduler import Scheduler

__all__ = ("next_poll", "schedule_name", "start", "stop")


def schedule_name(worker_id: str) -> str:
    return f"worker.{worker_id}"


async def start(client: aioredis.Redis, keys: Keys, worker_id: str, interval_s: int) -> bool:
    """Add (or change) the job; True when it was created or changed. A missed poll after
    downtime is polled once (``missed="latest"``): older measurements are not wanted."""
    return await Scheduler(client, keys).add(
        schedule_name(worker_id),
        every=float(interval_s),
        event=WorkerPollTick,
        key=worker_id,
        missed="latest",
    )


async def stop(client: aioredis.Redis, keys: Keys, worker_id: str) -> bool:
    """Remove the job; True when it existed."""
    return await Scheduler(client, keys).remove(schedule_name(worker_id))


async def next_poll(client: aioredis.Redis, keys: Keys, worker_id: str) -> datetime | None:
    info = await Scheduler(client, keys).get(schedule_name(worker_id))
    return info.next_at if info is not None else None
