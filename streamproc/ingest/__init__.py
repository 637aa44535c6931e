"""The ingest service (aiohttp): agents post events, operators submit and follow tasks."""

from __future__ import annotations

from streamproc.ingest.app import Ingest, create_app
from streamproc.ingest.auth import Agent, AgentStore
from streamproc.ingest.settings import IngestSettings
from streamproc.ingest.taskrun import PriorityGate, TaskContext, TaskType, task_concern
from streamproc.ingest.taskstore import TaskStore, TaskView

__all__ = (
    "Agent",
    "AgentStore",
    "Ingest",
    "IngestSettings",
    "PriorityGate",
    "TaskContext",
    "TaskStore",
    "TaskType",
    "TaskView",
    "create_app",
    "task_concern",
)
