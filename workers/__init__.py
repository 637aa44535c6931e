"""Worker monitoring (seed 001, issue 14; docs/workers.md): each EC2-hosted worker polled by
its own runtime schedule.

- ``schemas.workers``: the events (``worker.created|imported|terminated``, ``worker.metrics``,
  ``worker.status_changed``, ``tick.worker_poll``);
- ``registry``: worker records in Redis; ``jobs``: a worker's schedule;
- ``monitor``: the ``worker-monitor`` concern; ``discover``: startup auto-discovery;
- ``cli``: ``streamproc workers``; ``settings``: ``STREAMPROC_WORKERS_*``.
"""

from __future__ import annotations

from workers._runtime import Runtime, configure_from_env, runtime, use
from workers.discover import on_shutdown, on_startup
from workers.monitor import CONCERN, CONCERNS
from workers.settings import WorkerSettings

__all__ = (
    "COMMANDS",
    "CONCERN",
    "CONCERNS",
    "ON_SHUTDOWN",
    "ON_STARTUP",
    "Runtime",
    "WorkerSettings",
    "configure_from_env",
    "runtime",
    "use",
)

#: Modules adding ``streamproc`` subcommands.
COMMANDS: tuple[str, ...] = ("workers.cli",)
#: App hooks: startup discovery and schedule resync (``consume`` role), and its cancellation.
ON_STARTUP = (on_startup,)
ON_SHUTDOWN = (on_shutdown,)
