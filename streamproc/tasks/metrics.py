"""Prometheus metrics of the task API and the task runner."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ("TASKS_FINISHED", "TASKS_SUBMITTED", "TASK_SECONDS")

TASKS_SUBMITTED = Counter(
    "streamproc_tasks_submitted", "Tasks submitted through the API", ["type", "priority"]
)
TASKS_FINISHED = Counter(
    "streamproc_tasks_finished", "Tasks that reached an end state", ["type", "status"]
)
TASK_SECONDS = Histogram(
    "streamproc_task_duration_seconds",
    "Run time of tasks (one attempt)",
    ["type"],
    buckets=(0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 1800, 3600),
)
