"""Placeholder: filled in by the hibernation work of issue 13."""

from __future__ import annotations

from typing import Any

from streamproc.concern import Concern

__all__ = ("CONCERNS", "add_routes", "register")

#: The consumer groups of this part.
CONCERNS: tuple[Concern, ...] = ()


def register(sub: Any) -> None:
    """Its ``streamproc`` subcommands (none yet)."""


def add_routes(app: Any, ingest: Any) -> None:
    """Its routes on the ingest service (none yet)."""
