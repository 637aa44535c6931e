"""The record formats the consumer writes: retry records and dead letters (one owner each).

Both are binary safe: an entry's fields are copied as bytes, whatever they hold.
"""

from __future__ import annotations

import struct
from datetime import UTC, datetime
from typing import Any

from streamproc.consumer.outcomes import DeadLettered, Entry, RetryLater

__all__ = ("dead_letter_fields", "retry_record")


def _msgpack_strings(items: list[bytes]) -> bytes:
    """A msgpack array of raw strings. Redis' Lua cmsgpack reads the str types (any bytes)
    but not the newer bin types that msgpack libraries use for bytes."""
    n = len(items)
    out = [bytes([0x90 | n]) if n < 16 else struct.pack(">BI", 0xDD, n)]
    for b in items:
        size = len(b)
        if size < 32:
            out.append(bytes([0xA0 | size]))
        elif size < 256:
            out.append(struct.pack(">BB", 0xD9, size))
        else:
            out.append(struct.pack(">BI", 0xDB, size))
        out.append(b)
    return b"".join(out)


def retry_record(o: RetryLater) -> bytes:
    """The delayed-zset member of a retry: msgpack ``[field, value, ...]`` of the entry with
    ``attempt`` and ``origin`` set (the PUMP script XADDs it to the group's retry stream)."""
    e = o.entry
    flat: list[bytes] = []
    for k, v in e.fields.items():
        if k not in (b"attempt", b"origin"):
            flat += (k, v)
    attempt = e.attempt + 1 if o.counts else e.attempt
    flat += (b"attempt", str(attempt).encode(), b"origin", e.origin)
    return _msgpack_strings(flat)


def dead_letter_fields(o: DeadLettered, consumer: str, group: str) -> list[Any]:
    """The DLQ entry: ``dlq_*`` fields that tell the story, then the original fields."""
    e: Entry = o.entry
    meta: list[Any] = [
        "dlq_reason",
        o.reason,
        "dlq_error_type",
        o.error_type,
        "dlq_error",
        o.detail,
        "dlq_attempts",
        e.attempt + 1,
        "dlq_deliveries",
        e.deliveries,
        "dlq_consumer",
        consumer,
        "dlq_group",
        group,
        "dlq_topic",
        e.topic,
        "dlq_entry_id",
        e.entry_id,
        "dlq_origin_id",
        e.origin,
        "dlq_at",
        datetime.now(UTC).isoformat(timespec="milliseconds"),
    ]
    for k, v in e.fields.items():
        if not k.startswith(b"dlq_"):
            meta += (k, v)
    return meta
