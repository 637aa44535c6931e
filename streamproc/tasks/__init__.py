"""Tasks: typed requests run by a consumer group, with status, progress, priority and cancel.

An application declares its ``TaskType``s and adds ``task_concern(types)`` to its concerns and
``TASK_EVENTS`` to its registry; the ingest service's ``/v1/tasks`` routes submit them
(``streamproc.ingest.tasks``). Modules: ``events`` (the request events, one topic per
priority), ``runner`` (the concern), ``slots`` (per-type concurrency), ``store`` (the task
hash), ``metrics``.
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
from streamproc.tasks.runner import TASK_GROUP, TaskContext, TaskType, task_concern
from streamproc.tasks.slots import GlobalSlots, PriorityGate
from streamproc.tasks.store import TaskStatus, TaskStore, TaskView

__all__ = (
    "PRIORITIES",
    "TASK_EVENTS",
    "TASK_GROUP",
    "GlobalSlots",
    "Priority",
    "PriorityGate",
    "TaskContext",
    "TaskCritical",
    "TaskHigh",
    "TaskLow",
    "TaskNormal",
    "TaskRequested",
    "TaskStatus",
    "TaskStore",
    "TaskType",
    "TaskView",
    "task_concern",
    "task_event_class",
)
