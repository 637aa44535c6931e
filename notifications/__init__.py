"""Notifications that reach people: subscriptions, fan-out, delivery, the log and live feeds.

- ``subscriptions``: who gets what (per cluster, severity, type) by which channel;
- ``concern``: the ``notify-fanout`` and ``notify-deliver`` consumer groups;
- ``http_channels`` (signed webhooks, Slack) and ``email`` (SES) send;
- ``delivery_log``: every attempt, by notification;
- ``feed`` (``GET /clusters/{id}/feed``, SSE) and ``api`` (operator routes) on ingest;
- ``cli``: ``streamproc subscriptions ...`` and ``streamproc notifications ...``.

See docs/notifications.md.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from notifications import api
from notifications.concern import DELIVER, FANOUT, use_settings
from notifications.settings import NotifySettings
from streamproc.config import settings_from_env
from streamproc.ingest.app import Ingest

__all__ = ("COMMANDS", "CONCERNS", "add_routes", "configure_from_env", "settings_from")

CONCERNS = (FANOUT, DELIVER)
#: Modules adding ``streamproc`` subcommands.
COMMANDS = ("notifications.cli",)


def settings_from(env: Mapping[str, str]) -> NotifySettings:
    return settings_from_env(NotifySettings, "STREAMPROC_NOTIFY_", env)


def configure_from_env(env: Mapping[str, str]) -> None:
    use_settings(settings_from(env))


def add_routes(app: web.Application, ingest: Ingest) -> None:
    """The operator API and the live feeds (``App(routes=[add_routes])``)."""
    import os

    from notifications import feed

    api.add_routes(app, ingest, settings_from(os.environ))
    feed.add_routes(app, ingest)
