"""One module per concern (= one consumer group); ``CONCERNS`` lists them by group name."""

from __future__ import annotations

from collections.abc import Mapping

from consumers import cluster_events, renders, tasks
from streamproc.concern import Concern
from streamproc.config import settings_from_env
from streamproc.errors import ConfigError

__all__ = ("CONCERNS", "configure_from_env")

CONCERNS: dict[str, Concern] = {
    c.group: c for c in (cluster_events.CONCERN, *tasks.CONCERNS, renders.CONCERN)
}


def configure_from_env(env: Mapping[str, str]) -> None:
    """Settings of the concerns that have some: ``STREAMPROC_TASKS_*`` (see consumers.tasks),
    ``STREAMPROC_RENDER_*`` (see consumers.renders),
    ``STREAMPROC_NOTIFY_*`` (see notifications.settings) and ``STREAMPROC_WORKERS_*`` (see
    workers.settings)."""
    import notifications
    import spot
    import workers

    tasks.configure_from_env(env)
    notifications.configure_from_env(env)
    spot.configure_from_env(env)
    workers.configure_from_env(env)
    settings = settings_from_env(renders.RenderSettings, "STREAMPROC_RENDER_", env)
    try:
        renders.use_settings(settings)
    except ConfigError as e:  # the store could not be built from its location
        raise ConfigError(f"STREAMPROC_RENDER_STORE={settings.store!r}: {e}") from None
