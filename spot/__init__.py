"""The spot optimizer's work on AWS (WORKLOADS §1): accounts, discovery, hibernation, the
optimizer and agent-metrics routes. See docs/aws.md.

- ``aws``: the account registry and every AWS call (assumed roles, timeouts, breakers);
- ``discovery``: the ``discovery`` concern on ``tick.discovery`` and ``streamproc accounts``;
- ``hibernation``: the ``hibernation`` concern on ``tick.hibernation``, schedules and audit;
- ``optimizer``: ``POST /clusters/{id}/optimize`` and ``POST /clusters/{id}/metrics``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from spot import discovery, hibernation, optimizer
from spot.aws import AwsSettings
from streamproc.concern import Concern
from streamproc.config import settings_from_env

__all__ = ("COMMANDS", "CONCERNS", "add_routes", "aws_settings", "configure_from_env")

_PARTS = (discovery, hibernation, optimizer)
CONCERNS: tuple[Concern, ...] = tuple(c for part in _PARTS for c in part.CONCERNS)
#: Modules adding ``streamproc`` subcommands.
COMMANDS: tuple[str, ...] = tuple(part.__name__ for part in _PARTS)


def aws_settings(env: Mapping[str, str] | None = None) -> AwsSettings:
    return settings_from_env(AwsSettings, "STREAMPROC_AWS_", os.environ if env is None else env)


def configure_from_env(env: Mapping[str, str]) -> None:
    """Each part's settings from the environment (the roles that consume call it)."""
    for part in _PARTS:
        configure = getattr(part, "configure_from_env", None)
        if configure is not None:
            configure(env)


def add_routes(app: Any, ingest: Any) -> None:
    """Every part's routes on the ingest service (``App(routes=[add_routes])``)."""
    for part in _PARTS:
        part.add_routes(app, ingest)
