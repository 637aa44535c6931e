"""Periodic tick events emitted by the ticker."""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

from streamproc.event import Event

__all__ = ("Tick",)


class Tick(Event, frozen=True, kw_only=True, tag="tick"):
    """A schedule fired. ``id`` is deterministic: schedule name + scheduled time."""

    topic: ClassVar[str] = "ticks"
    schedule: str
    scheduled_for: datetime
    #: The leader's fencing token when it fired.
    fence: int = 0
