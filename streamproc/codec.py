"""The wire format: one event = one stream entry with flat, readable fields.

``type``  the event type (e.g. ``cluster.spot_interruption``)
``id``    the event id (UUIDv7)
``ts``    when it happened: ISO-8601 UTC with milliseconds, e.g. ``2026-11-23T10:15:00.123Z``
``key``   ordering / partition key
``v``     schema version
``data``  the whole event as JSON (its fields; ``type`` included)

``id``, ``ts`` and ``key`` copy fields of ``data`` so an operator can read them in
``redis-cli XRANGE`` and the engine can dedup and route without decoding the body. ``data``
is authoritative; an entry whose ``id`` disagrees with its ``data`` is rejected.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC
from typing import Any, Generic, TypeVar

import msgspec

from streamproc.errors import ConfigError, DecodeError
from streamproc.event import Event
from streamproc.keys import check_name

__all__ = ("WIRE_FIELDS", "Codec", "Registry")

E = TypeVar("E", bound=Event)

TYPE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
WIRE_FIELDS = (b"type", b"id", b"ts", b"key", b"v", b"data")
#: Bodies larger than this are refused by ``Codec.decode`` (protects consumers from huge entries).
MAX_DATA_BYTES = 1 << 20


class Registry(Generic[E]):
    """All event types an application knows, by wire type name."""

    def __init__(self, types: Iterable[type[E]]) -> None:
        self.by_name: dict[str, type[E]] = {}
        for t in types:
            name = t.type_name()
            if not TYPE_NAME_RE.match(name):
                raise ConfigError(
                    f"{t.__name__}: event type {name!r} must be a lower-case dotted name such as "
                    "'cluster.spot_interruption' (declare it with tag=...)"
                )
            if name in self.by_name:
                raise ConfigError(f"event type {name!r} is registered twice")
            check_name("topic", t.topic)
            self.by_name[name] = t
        if not self.by_name:
            raise ConfigError("a registry needs at least one event type")

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def names(self) -> list[str]:
        return sorted(self.by_name)

    def topics(self) -> list[str]:
        return sorted({t.topic for t in self.by_name.values()})

    def get(self, name: str) -> type[E]:
        try:
            return self.by_name[name]
        except KeyError:
            raise DecodeError(
                "unknown_type", f"unknown event type {name!r}; known: {', '.join(self.names())}"
            ) from None

    def union(self) -> Any:
        """The tagged union of all types (for decoding bodies whose ``type`` picks the class)."""
        union: Any = None
        for t in self.by_name.values():
            union = t if union is None else union | t
        return union


class Codec(Generic[E]):
    """Encodes events to entry fields and decodes entries back; decoders are built once."""

    def __init__(self, registry: Registry[E]) -> None:
        self.registry = registry
        self._encoder = msgspec.json.Encoder()
        self._decoders = {
            name.encode(): msgspec.json.Decoder(t) for name, t in registry.by_name.items()
        }

    def encode(self, event: Event) -> dict[bytes, bytes]:
        occurred = event.occurred_at.astimezone(UTC)
        return {
            b"type": event.type_name().encode(),
            b"id": event.id.encode(),
            b"ts": occurred.strftime("%Y-%m-%dT%H:%M:%S.").encode()
            + b"%03dZ" % (occurred.microsecond // 1000),
            b"key": event.key.encode(),
            b"v": b"%d" % event.version,
            b"data": self._encoder.encode(event),
        }

    def decode(self, fields: Mapping[bytes, bytes]) -> E:
        """Decode entry fields; raises DecodeError with a reason code on any problem."""
        type_name = fields.get(b"type")
        data = fields.get(b"data")
        if type_name is None or data is None:
            missing = [f.decode() for f in (b"type", b"data") if fields.get(f) is None]
            raise DecodeError("missing_field", f"entry lacks field(s): {', '.join(missing)}")
        decoder = self._decoders.get(type_name)
        if decoder is None:
            shown = type_name[:100].decode(errors="replace")
            self.registry.get(shown)  # raises unknown_type with the known types
            raise DecodeError("unknown_type", f"unknown event type {shown!r}")
        if len(data) > MAX_DATA_BYTES:
            raise DecodeError("too_large", f"data is {len(data)} bytes, over {MAX_DATA_BYTES}")
        try:
            event = decoder.decode(data)
        except msgspec.ValidationError as e:
            raise DecodeError("invalid", str(e)) from None
        except msgspec.DecodeError as e:
            raise DecodeError("bad_json", str(e)) from None
        entry_id = fields.get(b"id")
        if entry_id is not None and entry_id != event.id.encode():
            raise DecodeError("id_mismatch", "field 'id' differs from data.id")
        return event
