"""Tasks: typed requests run by consumer groups, with status, progress, priority and cancel.

An application declares its ``TaskType``s (each in a queue), adds ``task_concerns(types,
queues=...)`` to its concerns and the queues' request events (``task_events(queue)``) to its
registry; the ingest service's ``/v1/tasks`` routes submit them (``streamproc.ingest.tasks``).
Modules: ``events`` (the request events: a group per queue, a topic per priority), ``runner``
(the concerns), ``slots`` (concurrency and order across runners), ``store`` (the task hash),
``history`` (finished tasks, counts), ``runners`` (live runners, load shedding), ``process``
(blocking types in a child process), ``metrics``. docs/tasks.md tells the whole story.
"""

from __future__ import annotations

from streamproc.tasks.events import (
    DEFAULT_QUEUE,
    PRIORITIES,
    TASK_EVENTS,
    Priority,
    TaskCritical,
    TaskHigh,
    TaskLow,
    TaskNormal,
    TaskRequested,
    task_event_class,
    task_events,
    task_group,
)
from streamproc.tasks.history import TaskHistory, TypeStats
from streamproc.tasks.process import SoftTimeLimit
from streamproc.tasks.runner import (
    TASK_GROUP,
    TaskContext,
    TaskType,
    queue_of,
    task_concern,
    task_concerns,
)
from streamproc.tasks.runners import LoadLimits, RunnerInfo, RunnerRegistry
from streamproc.tasks.slots import PriorityGate, QueueSlots
from streamproc.tasks.store import TaskStatus, TaskStore, TaskView

__all__ = (
    "DEFAULT_QUEUE",
    "PRIORITIES",
    "TASK_EVENTS",
    "TASK_GROUP",
    "LoadLimits",
    "Priority",
    "PriorityGate",
    "QueueSlots",
    "RunnerInfo",
    "RunnerRegistry",
    "SoftTimeLimit",
    "TaskContext",
    "TaskCritical",
    "TaskHigh",
    "TaskHistory",
    "TaskLow",
    "TaskNormal",
    "TaskRequested",
    "TaskStatus",
    "TaskStore",
    "TaskType",
    "TaskView",
    "TypeStats",
    "queue_of",
    "task_concern",
    "task_concerns",
    "task_event_class",
    "task_events",
    "task_group",
)
