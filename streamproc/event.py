"""The event envelope every typed event inherits.

Concrete events live in ``schemas/``: a subclass names its wire type with ``tag=`` and its
topic with a ``topic`` class variable::

    class SpotInterruption(Event, tag="cluster.spot_interruption"):
        topic: ClassVar[str] = "cluster"
        instance_id: str
        ...

Every field added to an existing event must have a default, so entries written by an older
version still decode (new fields) and newer entries decode in older code (unknown fields are
ignored).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import msgspec
import uuid_utils

from streamproc.printable import NO_CONTROL_PATTERN

__all__ = ("DERIVED_ID_NS", "Event", "derived_id", "new_event_id", "postable_types", "utcnow")

#: The default namespace of ``derived_id``.
DERIVED_ID_NS = uuid.UUID("6f1c3a52-8d7e-4c1b-9a53-2d0c7f1e9b11")


def new_event_id() -> str:
    """A UUIDv7 as text: unique and ordered by creation time."""
    return str(uuid_utils.uuid7())


def derived_id(cause_id: str, what: str, *, namespace: uuid.UUID = DERIVED_ID_NS) -> str:
    """A deterministic id for an event caused by another: the same cause gives the same id.

    A handler that runs again (a retry, a crash before its ack) publishes the same event id,
    and the producer's and consumers' dedup drop the copy. ``what`` tells apart the events
    one cause leads to (``"notify"``, ``"report"``); ``namespace`` keeps ids already stored
    under another namespace stable.
    """
    return str(uuid.uuid5(namespace, f"{cause_id}/{what}"))


def utcnow() -> datetime:
    return datetime.now(UTC)


#: Ids, sources and keys are shown to people (``streamproc tail``, ``dlq``, the dashboard) and
#: go into key names: no control characters (``streamproc.printable``), refused at decode.
_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=NO_CONTROL_PATTERN)]
_Text256 = Annotated[str, msgspec.Meta(max_length=256, pattern=NO_CONTROL_PATTERN)]


class Event(
    msgspec.Struct,
    kw_only=True,
    frozen=True,
    tag_field="type",
    gc=False,
    forbid_unknown_fields=False,
):
    """Common envelope: identity, time, origin and ordering key."""

    #: Time-ordered event id (UUIDv7). The same event published twice keeps its id.
    id: _Id = msgspec.field(default_factory=new_event_id)
    #: When it happened, timezone-aware (UTC on the wire).
    occurred_at: Annotated[datetime, msgspec.Meta(tz=True)] = msgspec.field(default_factory=utcnow)
    #: Who reported it (ingest sets the authenticated agent's name).
    source: _Text256 = ""
    #: Ordering / partition key (e.g. the cluster id).
    key: _Text256 = ""
    #: When the ingest service accepted it (set by the server; None when not from ingest).
    received_at: datetime | None = None

    #: The stream this event type is published to.
    topic: ClassVar[str] = "events"
    #: Schema version, written as ``v``; raise it when the meaning of a field changes.
    version: ClassVar[int] = 1
    #: May agents post it through the ingest service? False for events only the
    #: application itself publishes (e.g. one delivery of a notification to one destination).
    external: ClassVar[bool] = True

    @classmethod
    def type_name(cls) -> str:
        tag = cls.__struct_config__.tag
        if not isinstance(tag, str):
            raise TypeError(f"{cls.__name__} has no tag: declare it with class X(Event, tag=...)")
        return tag


def postable_types(types: Iterable[Any]) -> list[type[Event]]:
    """The event types agents may post through the ingest service, in the given order: those
    marked ``external``. A token's ``--types`` patterns (``*`` included) choose among these
    only; the application's own events are refused whatever the patterns say."""
    return [t for t in types if isinstance(t, type) and issubclass(t, Event) and t.external]
