"""Task requests submitted through ``POST /v1/tasks`` (WORKLOADS.md §4-5).

The request events are the engine's (``streamproc.tasks.events``): one topic per priority, the
event id is the task id. Re-exported here beside the application's other events.
"""

from __future__ import annotations

from streamproc.tasks.events import (
    PRIORITIES,
    TASK_EVENTS,
    Priority,
    TaskCritical,
    TaskHigh,
    TaskLow,
    TaskNormal,
    TaskRequested,
    task_event_class,
)

__all__ = (
    "PRIORITIES",
    "TASK_EVENTS",
    "Priority",
    "TaskCritical",
    "TaskHigh",
    "TaskLow",
    "TaskNormal",
    "TaskRequested",
    "task_event_class",
)
