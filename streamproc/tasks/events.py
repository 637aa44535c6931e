"""Task requests: the events ``POST /v1/tasks`` publishes and the task runners read.

Every task type belongs to a **queue** (``TaskType.queue``); every queue has its own consumer
group and one stream per priority, so a runner started for some queues
(``streamproc tasks --queues crawl,tickets``) never reads another queue's tasks:

====================  =====================  =============================================
queue                 group                  topics (most urgent first)
====================  =====================  =============================================
``default``           ``tasks``              ``tasks.critical`` … ``tasks.low``
``crawl`` (any other) ``tasks-crawl``        ``tasks.crawl.critical`` … ``tasks.crawl.low``
====================  =====================  =============================================

The event id is the task id; the task's status lives in a Redis hash (``Keys.task``, see
``streamproc.tasks.store``), not in the stream. The default queue's four event classes are
``TASK_EVENTS``; another queue's are made on first use by ``task_events(queue)`` (tags
``task.<queue>.<priority>``), and ``App`` adds those of its task types' queues to its registry.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from functools import cache
from typing import Annotated, Any, ClassVar, Literal

import msgspec

from streamproc.errors import ConfigError
from streamproc.event import Event
from streamproc.keys import check_name

__all__ = (
    "DEFAULT_QUEUE",
    "PRIORITIES",
    "TASK_EVENTS",
    "Priority",
    "TaskCritical",
    "TaskHigh",
    "TaskLow",
    "TaskNormal",
    "TaskRequested",
    "check_queue",
    "task_event_class",
    "task_events",
    "task_group",
)

Priority = Literal["low", "normal", "high", "critical"]
#: Most urgent first: the order the runner serves them.
PRIORITIES: tuple[Priority, ...] = ("critical", "high", "normal", "low")
#: The queue of a task type that names none.
DEFAULT_QUEUE = "default"


class TaskRequested(Event, frozen=True, kw_only=True):
    """A task to run: its type names the function, its payload that function's argument."""

    topic: ClassVar[str] = "tasks.normal"
    #: Tasks enter by the task API (``POST /v1/tasks``), which checks the submitter's task
    #: scopes and writes the task's status hash; never by ``/v1/events``.
    external: ClassVar[bool] = False
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


#: The default queue's event classes, one per priority, most urgent first.
TASK_EVENTS: tuple[type[TaskRequested], ...] = (TaskCritical, TaskHigh, TaskNormal, TaskLow)


def check_queue(name: str) -> str:
    """A queue name: lower-case letters, digits and ``-`` (it goes into tags and topics)."""
    if not isinstance(name, str) or not name or len(name) > 40:
        raise ConfigError(f"invalid task queue name {name!r}: 1-40 characters")
    if not all(c.islower() or c.isdigit() or c == "-" for c in name) or not name[0].isalnum():
        raise ConfigError(
            f"invalid task queue name {name!r}: lower-case letters, digits and '-', "
            "starting with a letter or digit"
        )
    return name


def task_group(queue: str) -> str:
    """The consumer group that runs ``queue``'s tasks."""
    return "tasks" if queue == DEFAULT_QUEUE else check_name("group", f"tasks-{check_queue(queue)}")


@cache
def task_events(queue: str = DEFAULT_QUEUE) -> tuple[type[TaskRequested], ...]:
    """``queue``'s request classes, one per priority, most urgent first (made once)."""
    if queue == DEFAULT_QUEUE:
        return TASK_EVENTS
    check_queue(queue)
    out: list[type[TaskRequested]] = []
    for p in PRIORITIES:
        topic = check_name("topic", f"tasks.{queue}.{p}")
        fill = _class_body({"topic": topic, "__module__": __name__})
        cls = types.new_class(
            f"Task_{queue.replace('-', '_')}_{p}",
            (TaskRequested,),
            {"frozen": True, "kw_only": True, "tag": f"task.{queue.replace('-', '_')}.{p}"},
            fill,
        )
        out.append(cls)
    return tuple(out)


def _class_body(attrs: dict[str, Any]) -> Callable[[dict[str, Any]], None]:
    def fill(namespace: dict[str, Any]) -> None:
        namespace.update(attrs)

    return fill


def task_event_class(priority: str, queue: str = DEFAULT_QUEUE) -> type[TaskRequested]:
    """The class a task of ``priority`` in ``queue`` is published as."""
    return task_events(queue)[PRIORITIES.index(priority)]
