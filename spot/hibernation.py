"""Cluster hibernation (issue 13, WORKLOADS §1): weekly sleep schedules per cluster, the
``hibernation`` concern on ``tick.hibernation``, the audit stream, and what sleeping saved.

- ``spot._schedule``: the week matrix, its syntaxes and the sleep/wake decision (pure);
- ``spot.hibernation_store``: Redis keys, schedules, sleep records, the audit stream;
- ``spot.hibernation_concern``: the concern (scale node groups to 0 and back, savings);
- ``spot.hibernation_cli``: ``streamproc hibernation ...`` and ``streamproc audit``;
- ``spot.hibernation_api``: ``GET/PUT/DELETE /v1/clusters/{id}/hibernation``.

See docs/aws.md, "Hibernation".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from spot.aws import Aws, AwsSettings
from spot.hibernation_concern import CONCERN, HibernationSettings, Runtime, use
from streamproc.concern import Concern
from streamproc.config import settings_from_env

__all__ = ("CONCERNS", "add_routes", "configure_from_env", "register")

#: The consumer groups of this part.
CONCERNS: tuple[Concern, ...] = (CONCERN,)


def configure_from_env(env: Mapping[str, str]) -> None:
    """``STREAMPROC_AWS_*`` and ``STREAMPROC_HIBERNATION_*`` (the consuming roles call it)."""
    use(
        Runtime(
            Aws(settings_from_env(AwsSettings, "STREAMPROC_AWS_", env)),
            settings_from_env(HibernationSettings, "STREAMPROC_HIBERNATION_", env),
        )
    )


def register(sub: Any) -> None:
    """``streamproc hibernation set|show|list|remove`` and ``streamproc audit``."""
    from spot import hibernation_cli  # the CLI's imports only where a command line is built

    hibernation_cli.register(sub)


def add_routes(app: Any, ingest: Any) -> None:
    """``GET/PUT/DELETE /v1/clusters/{id}/hibernation`` (operator tokens)."""
    from spot import hibernation_api

    hibernation_api.add_routes(app, ingest)
