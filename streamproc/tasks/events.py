"""Task requests: the events ``POST /v1/tasks`` publishes and the task runner reads.

One topic per priority (``tasks.critical`` … ``tasks.low``), so the runner reads the most
urgent first. The event id is the task id; the task's status lives in a Redis hash
(``Keys.task``, see ``streamproc.tasks.store``), not in the stream. An application that runs
tasks registers ``TASK_EVENTS`` in its registry.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from streamproc.event import Event

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

Priority = Literal["low", "normal", "high", "critical"]
#: Most urgent first: the order the runner serves them.
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "normal", "low")


class TaskRequested(Event, frozen=True, kw_only=True):
    """A task to run: its type names the function, its payload that function's argument."""

    topic: ClassVar[str] = "tasks.normal"
    task_type: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: Priority = "normal"


class TaskCritical(TaskRequested, frozen=True, kw_only=True, tag="task.critical"):
    topic: ClassVar[str] = "tasks.critical"


class TaskHigh(TaskRequested, frozen=True, kw_only=True, tag="task.high"):
    topic: ClassVar[str] = "tasks.high"


class TaskNormal(TaskRequested, frozen=True, kw_only=True, tag="task.normal"):
    topic: ClassVar[str] = "tasks.normal"


class TaskLow(TaskRequested, frozen=True, kw_only=True, tag="task.low"):
    topic: ClassVar[str] = "tasks.low"


#: One event class per priority, most urgent first.
TASK_EVENTS: tuple[type[TaskRequested], ...] = (TaskCritical, TaskHigh, TaskNormal, TaskLow)

_BY_PRIORITY: dict[str, type[TaskRequested]] = {
    "critical": TaskCritical,
    "high": TaskHigh,
    "normal": TaskNormal,
    "low": TaskLow,
}


def task_event_class(priority: str) -> type[TaskRequested]:
    return _BY_PRIORITY[priority]
