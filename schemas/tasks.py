"""Task requests submitted through ``POST /v1/tasks`` (WORKLOADS.md §1, §4-5).

The request events are the engine's (``streamproc.tasks.events``): per queue one topic per
priority, the event id is the task id. ``QUEUES`` is this application's queue table — each
queue's concurrency across every runner process — and ``TASK_EVENTS`` the request events of all
of them, registered in ``schemas.REGISTRY``:

=============  ===========  ==========================================================
queue          concurrency  task types
=============  ===========  ==========================================================
``crawl``      2            ``crawl.session`` (seed 004: heavy crawls)
``tickets``    4            ``ticket.create`` (seed 004: the issue tracker)
``media``      8            ``screenshot.upload`` (seed 004: uploads)
``default``    2            anything else (seed 004: misc)
``optimizer``  5            ``optimizer.run`` (§1: 5 in parallel)
``video``      —            ``media.*`` (seed 002: each type has its own limit)
=============  ===========  ==========================================================
"""

from __future__ import annotations

from streamproc.tasks.events import (
    PRIORITIES,
    Priority,
    TaskCritical,
    TaskHigh,
    TaskLow,
    TaskNormal,
    TaskRequested,
    task_event_class,
    task_events,
)

__all__ = (
    "PRIORITIES",
    "QUEUES",
    "TASK_EVENTS",
    "Priority",
    "TaskCritical",
    "TaskHigh",
    "TaskLow",
    "TaskNormal",
    "TaskRequested",
    "task_event_class",
)

#: Queue → tasks of it running at once across every runner (None: the types' own limits).
QUEUES: dict[str, int | None] = {
    "crawl": 2,
    "tickets": 4,
    "media": 8,
    "default": 2,
    "optimizer": 5,
    "video": None,
}

TASK_EVENTS: tuple[type[TaskRequested], ...] = tuple(e for q in QUEUES for e in task_events(q))
