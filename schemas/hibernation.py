"""Hibernation publishes no events of its own: what it does goes to the audit stream
(``<p>:state:audit``) and its savings to the daily metrics hashes (see spot/hibernation.py).
It consumes ``schemas.ticks.HibernationTick``."""

from __future__ import annotations

from typing import Any

__all__ = ("TYPES",)

#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = ()
