"""The wire format: flat readable fields, old entries still decode, broken ones fail precisely."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import pytest

from schemas import REGISTRY, OOMKilled, SpotInterruption
from streamproc import Codec, ConfigError, DecodeError, Event, Registry

SPOT = SpotInterruption(
    cluster_id="prod-eu",
    key="prod-eu",
    instance_id="i-1",
    instance_type="m5.large",
    availability_zone="eu-west-1a",
    occurred_at=datetime(2026, 11, 23, 10, 15, 0, 123456, tzinfo=UTC),
)


def test_entry_has_the_documented_flat_fields(codec: Codec[Any]) -> None:
    fields = codec.encode(SPOT)
    assert list(fields) == [b"type", b"id", b"ts", b"key", b"v", b"data"]
    assert fields[b"type"] == b"cluster.spot_interruption"
    assert fields[b"id"] == SPOT.id.encode()
    assert fields[b"ts"] == b"2026-11-23T10:15:00.123Z"
    assert fields[b"key"] == b"prod-eu"
    assert fields[b"v"] == b"1"
    assert json.loads(fields[b"data"])["instance_type"] == "m5.large"


def test_round_trip_keeps_every_field(codec: Codec[Any]) -> None:
    assert codec.decode(codec.encode(SPOT)) == SPOT


def test_ids_are_time_ordered_uuid7() -> None:
    ids = [
        SpotInterruption(
            cluster_id="c", instance_id="i", instance_type="t", availability_zone="z"
        ).id
        for _ in range(50)
    ]
    assert ids == sorted(ids)
    assert all(i[14] == "7" for i in ids)  # UUID version nibble


def test_entry_written_by_an_older_schema_still_decodes(codec: Codec[Any]) -> None:
    stored = json.loads((Path(__file__).parent / "data/old_spot_interruption_v1.json").read_text())
    fields = {k.encode(): v.encode() for k, v in stored["fields"].items()}
    event = codec.decode(fields)
    assert isinstance(event, SpotInterruption)
    assert event.instance_type == "m5.xlarge"
    assert event.node_name == ""  # added later, with a default
    assert event.action == "terminate"


def test_entry_from_a_newer_schema_with_unknown_fields_decodes(codec: Codec[Any]) -> None:
    fields = codec.encode(SPOT)
    data = json.loads(fields[b"data"])
    data["added_in_v9"] = {"x": 1}
    fields[b"data"] = json.dumps(data).encode()
    assert codec.decode(fields) == SPOT


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda f: f.pop(b"type"), "missing_field"),
        (lambda f: f.pop(b"data"), "missing_field"),
        (lambda f: f.update({b"type": b"cluster.nope"}), "unknown_type"),
        (lambda f: f.update({b"type": b"\xff\xfe" * 1000}), "unknown_type"),
        (lambda f: f.update({b"data": b"{not json"}), "bad_json"),
        (lambda f: f.update({b"data": b"\xff\xfe"}), "bad_json"),
        (lambda f: f.update({b"data": b'{"cluster_id": 5}'}), "invalid"),
        (lambda f: f.update({b"data": b"[" * 100_000}), "invalid"),
        (lambda f: f.update({b"data": b'{"cluster_id":' + b"[" * 100_000}), "invalid"),
        (lambda f: f.update({b"data": b'{"a":"' + b"x" * (2 << 20) + b'"}'}), "too_large"),
        (lambda f: f.update({b"id": b"another-id"}), "id_mismatch"),
    ],
)
def test_broken_entries_fail_with_a_reason(codec: Codec[Any], mutate: Any, reason: str) -> None:
    fields = codec.encode(SPOT)
    mutate(fields)
    with pytest.raises(DecodeError) as e:
        codec.decode(fields)
    assert e.value.reason == reason


def test_validation_error_names_the_field_path(codec: Codec[Any]) -> None:
    fields = codec.encode(
        OOMKilled(cluster_id="c", namespace="n", pod="p", container="c", memory_limit_bytes=1)
    )
    fields[b"data"] = fields[b"data"].replace(b'"memory_limit_bytes":1', b'"memory_limit_bytes":-1')
    with pytest.raises(DecodeError, match=r"\$\.memory_limit_bytes"):
        codec.decode(fields)


def test_unknown_type_error_lists_known_types() -> None:
    with pytest.raises(DecodeError, match=r"cluster\.spot_interruption"):
        REGISTRY.get("cluster.nope")


def test_registry_refuses_duplicates_and_untagged_types() -> None:
    class Untagged(Event, frozen=True, kw_only=True):
        topic: ClassVar[str] = "x"

    with pytest.raises(ConfigError, match="twice"):
        Registry([SpotInterruption, SpotInterruption])
    with pytest.raises(ConfigError, match="lower-case dotted name"):
        Registry([Untagged])


def test_naive_timestamps_are_refused() -> None:
    body = msgspec.json.encode(SPOT).replace(b'.123456Z"', b'.123456"')
    with pytest.raises(msgspec.ValidationError, match="occurred_at"):
        msgspec.json.decode(body, type=SpotInterruption)
