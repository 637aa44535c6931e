"""Placeholder: the hibernation events of issue 13 go here."""

from __future__ import annotations

from typing import Any

__all__ = ("TYPES",)

#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = ()
