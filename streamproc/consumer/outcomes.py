"""Entries a consumer holds, and the typed outcome of each: what its settle must do.

One entry ends in exactly one outcome. ``Acked`` carries the handler's effects; the settle
script decides, per entry, whether they apply (see ``streamproc.consumer._scripts``) and
reports it in ``status``, which the settler sets and ``after_settle`` hooks read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = (
    "Acked",
    "DeadLettered",
    "Empty",
    "Entry",
    "Outcome",
    "RetryLater",
    "Settled",
    "Skipped",
)


class Entry:
    """One stream entry this consumer read and holds until it is settled."""

    __slots__ = ("attempt", "deliveries", "entry_id", "fields", "origin", "stream", "topic")

    def __init__(
        self,
        stream: str,
        topic: str,
        entry_id: bytes,
        fields: Mapping[bytes, bytes] | None,
        deliveries: int = 1,
    ) -> None:
        self.stream, self.topic, self.entry_id = stream, topic, entry_id
        self.fields: Mapping[bytes, bytes] = fields or {}
        self.deliveries = deliveries
        attempt = self.fields.get(b"attempt", b"")
        self.attempt = int(attempt) if attempt.isdigit() and len(attempt) < 6 else 0
        self.origin = self.fields.get(b"origin", entry_id)

    def text(self, name: bytes) -> str | None:
        """A field as text, or None when missing or not UTF-8 (entries come from anyone)."""
        raw = self.fields.get(name)
        if raw is None:
            return None
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return None

    def __repr__(self) -> str:
        return f"Entry({self.stream!r}, {self.entry_id!r}, deliveries={self.deliveries})"


class Settled(Enum):
    """What the settle script reported for an entry."""

    PENDING = "pending"  # not settled yet
    ACKED = "acked"
    REFUSED = "refused"  # no longer pending: another settle acked it (and applied its effects)
    REDELIVER = "redeliver"  # no longer pending, not yet delivered again by the group
    SCHEDULED = "scheduled"  # retry or dead letter written
    ALREADY_SCHEDULED = "already_scheduled"


@dataclass(slots=True, eq=False)
class _Base:
    entry: Entry
    status: Settled = field(default=Settled.PENDING, init=False)


@dataclass(slots=True, eq=False)
class Acked(_Base):
    """The handler succeeded: ack, and apply its effects if the ack removed the entry from
    the pending list (a settle that finds it gone applies nothing: another one did)."""

    event_id: bytes = b""
    effects: list[tuple[Any, ...]] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class Empty(_Base):
    """The payload was trimmed away: ack, never decode."""


@dataclass(slots=True, eq=False)
class Skipped(_Base):
    """No handler for the event type in this group: ack unread."""


@dataclass(slots=True, eq=False)
class RetryLater(_Base):
    """Try again after ``delay_ms`` (Redis' clock), as attempt ``entry.attempt + 1``, or as the
    same attempt when ``counts`` is False (a deferral)."""

    delay_ms: int = 0
    error_type: str = ""
    detail: str = ""
    counts: bool = True


@dataclass(slots=True, eq=False)
class DeadLettered(_Base):
    """Move to the group's dead-letter stream with the reason."""

    reason: str = ""
    error_type: str = ""
    detail: str = ""


Outcome = Acked | Empty | Skipped | RetryLater | DeadLettered
