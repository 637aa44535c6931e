"""Tasks the QA tasks and concerns submit themselves (a screenshot's upload, a bug's ticket).

The same two steps as ``POST /v1/tasks`` (``streamproc.ingest.tasks``): the task's hash, then
its request on the type's queue, with the task id as the event id. The ids are derived from
what the task is for, so submitting twice (a retried crawl, a redelivered bug) names the same
task: the hash exists already and the producer's dedup drops the second request.
"""

from __future__ import annotations

from typing import Any, Protocol

import msgspec
import redis.asyncio as aioredis

from streamproc.event import derived_id
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.tasks import TaskStore, task_event_class

__all__ = ("Submitter", "derived_task_id", "submit")


class Submitter(Protocol):
    """What submitting needs: a task context or a concern's context."""

    @property
    def redis(self) -> aioredis.Redis: ...
    @property
    def keys(self) -> Keys: ...
    @property
    def producer(self) -> Producer: ...


def derived_task_id(cause: str, what: str) -> str:
    return derived_id(f"qa-task:{cause}", what)


async def submit(ctx: Submitter, type_name: str, payload: Any, *, task_id: str) -> bool:
    """Submit a task of one of the QA types; False when it was submitted before."""
    from qa import TASK_TYPES  # the types are declared in the package's __init__

    tt = TASK_TYPES[type_name]
    created = await TaskStore(ctx.redis, ctx.keys).create(
        task_id, type=tt.name, priority="normal", submitted_by="qa"
    )
    event = task_event_class("normal", tt.queue)(
        id=task_id,
        key=tt.name,
        source="qa",
        task_type=tt.name,
        payload=msgspec.to_builtins(payload),
    )
    await ctx.producer.publish(event)
    return created
