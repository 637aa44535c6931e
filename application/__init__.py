"""This repository's application: the App that ``streamproc`` runs by default.

``streamproc`` loads it as ``application:app`` unless told otherwise (``--app module:attr``
or ``STREAMPROC_APP``). It puts together the typed events (``schemas/``), one concern per
consumer group (``consumers/``), the ticker's table (``producers/schedules.py``) and the
delivery of notifications (``notifications/``: its concerns, CLI commands and ingest routes),
the media jobs (``media/``: ffmpeg transcode and preview task types, run by the task
runner), the QA agent's tasks and concerns (``qa/``: crawls, tickets, screenshots, cleanup)
and worker monitoring (``workers/``: its concern, CLI commands, startup hooks and the
dashboard's Workers panel).
"""

from __future__ import annotations

from collections.abc import Mapping

import media
import media.hosts_panel
import notifications
import qa
import spot
import workers
import workers.panel
from consumers import CONCERNS, configure_from_env
from consumers.tasks import TASK_TYPES
from producers.schedules import SCHEDULES
from schemas import REGISTRY
from streamproc.app import App
from streamproc.dashboard.consumers import CONSUMERS_PANEL
from streamproc.tasks.panel import TASKS_PANEL

__all__ = ("app",)


def _configure(env: Mapping[str, str]) -> None:
    """The consumers' settings, then the media jobs' (``STREAMPROC_MEDIA_*``,
    ``STREAMPROC_RESOURCES_*``, ``STREAMPROC_CLEANUP_*``) and the QA tasks'
    (``STREAMPROC_QA_*``)."""
    configure_from_env(env)
    media.configure_from_env(env)
    qa.configure_from_env(env)


app = App(
    registry=REGISTRY,
    concerns=[
        *CONCERNS.values(),
        *notifications.CONCERNS,
        *spot.CONCERNS,
        *workers.CONCERNS,
        *media.CONCERNS,
        *qa.CONCERNS,
    ],
    schedules=SCHEDULES,
    task_types=TASK_TYPES,
    commands=[*notifications.COMMANDS, *spot.COMMANDS, *workers.COMMANDS],
    routes=[notifications.add_routes, spot.add_routes, media.add_routes],
    panels=[CONSUMERS_PANEL, workers.panel.PANEL, media.hosts_panel.PANEL, TASKS_PANEL],
    on_startup=[*workers.ON_STARTUP, *media.ON_STARTUP],
    on_shutdown=[*workers.ON_SHUTDOWN, *media.ON_SHUTDOWN],
    configure=_configure,
)
