"""The ingest service (aiohttp): agents post events, operators submit and follow tasks.

The tasks themselves (types, runner, store) are ``streamproc.tasks``.
"""

from __future__ import annotations

from streamproc.ingest.app import Ingest, create_app
from streamproc.ingest.auth import Agent, AgentStore
from streamproc.ingest.settings import IngestSettings

__all__ = (
    "Agent",
    "AgentStore",
    "Ingest",
    "IngestSettings",
    "create_app",
)
