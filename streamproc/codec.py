"""The wire format: one event = one stream entry with flat, readable fields.

``type``  the event type (e.g. ``cluster.spot_interruption``)
``id``    the event id (UUIDv7)
``ts``    when it happened: ISO-8601 UTC with milliseconds, e.g. ``2026-11-23T10:15:00.123Z``
``key``   ordering / partition key
``v``     schema version
``data``  the whole event as JSON (its fields; ``type`` included)

Optional, written by the producer only while tracing is on (``streamproc.tracing``):

``traceparent``  the W3C trace context of the span that published the event
``tracestate``   its W3C vendor state, when it has one

Decoding reads ``type``, ``data`` and ``id`` only: other fields (the trace context, a retry's
``attempt``, a replay's ``origin``) are the engine's business, never part of the event.

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
_RESP = (
    b"$4\r\ntype\r\n$%d\r\n%b\r\n$2\r\nid\r\n$%d\r\n%b\r\n$2\r\nts\r\n$24\r\n%b\r\n"
    b"$3\r\nkey\r\n$%d\r\n%b\r\n$1\r\nv\r\n$%d\r\n%b\r\n$4\r\ndata\r\n$%d\r\n%b\r\n"
)
#: Bodies larger than this are refused by ``Codec.decode`` (protects consumers from huge entries).
MAX_DATA_BYTES = 1 << 20


class Registry(Generic[E]):
    """All event types an application knows, by wire type name."""

    def __init__(self, types: Iterable[type[E]]) -> None:
        self.by_name: dict[str, type[E]] = {}
        for t in types:
            name = t.type_name()
            if not TYPE_NAME_RE.fullmatch(name):
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
        self._type_names: dict[type[Event], bytes] = {}
        self._decoders = {
            name.encode(): msgspec.json.Decoder(t) for name, t in registry.by_name.items()
        }

    def encode(self, event: Event) -> dict[bytes, bytes]:
        """The entry's fields (as XADD takes them)."""
        return dict(zip(WIRE_FIELDS, self._values(event), strict=True))

    def encode_flat(self, event: Event) -> list[bytes]:
        """The same fields as ``encode`` as one list: field, value, field, value ..."""
        t, i, ts, k, v, d = self._values(event)
        return [b"type", t, b"id", i, b"ts", ts, b"key", k, b"v", v, b"data", d]

    def encode_resp(self, event: Event) -> bytes:
        """The same fields as ``encode``, packed as the RESP arguments field, value, ...

        One formatting step for the 12 arguments: the producer's hot path (``_resp``).
        """
        t, i, ts, k, v, d = self._values(event)
        return _RESP % (len(t), t, len(i), i, ts, len(k), k, len(v), v, len(d), d)

    def _values(self, event: Event) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
        cls = type(event)
        type_name = self._type_names.get(cls)
        if type_name is None:
            type_name = self._type_names[cls] = cls.type_name().encode()
        occurred = event.occurred_at
        if occurred.tzinfo is not UTC:
            occurred = occurred.astimezone(UTC)
        # msgspec writes a UTC datetime as "YYYY-MM-DDTHH:MM:SS[.ffffff]Z" 10x faster than
        # strftime; cut it to milliseconds.
        iso = self._encoder.encode(occurred)
        ts = iso[1:24] + b"Z" if len(iso) == 29 else iso[1:20] + b".000Z"
        return (
            type_name,
            event.id.encode(),
            ts,
            event.key.encode(),
            b"%d" % event.version,
            self._encoder.encode(event),
        )

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
