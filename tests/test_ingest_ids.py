"""Producer dedup markers for ingested events: only for events whose sender gave the id.

An event posted without ``id`` gets one minted by the ingest, which no retry can repeat, so it
is published without a marker; an event posted with its own id (or under an Idempotency-Key)
keeps its marker, so a retry returns the first entry and adds nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import orjson
import pytest
import redis.asyncio as aioredis

from schemas import REGISTRY
from streamproc import Keys, Producer
from streamproc.ingest.app import agent_event_id, idem_marker
from streamproc.ingest.decode import EventDecoder
from streamproc.producer import find_record
from tests.helpers import dedup_records, digests
from tests.test_ingest_support import Server, cluster_event, running_ingest

DAY = 86_400_000

pytestmark = pytest.mark.timeout(60)

ID_A = "0190d0b6-0000-7000-8000-00000000000a"
ID_B = "0190d0b6-0000-7000-8000-00000000000b"
#: What the ingest stores for agent-1's ids: ids scoped to the agent (issue 17 item 2).
SA, SB = agent_event_id("agent-1", ID_A), agent_event_id("agent-1", ID_B)
NDJSON = {"Content-Type": "application/x-ndjson"}
MSGPACK = {"Content-Type": "application/msgpack"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, max_batch=50, rate_burst=1000) as s:
        yield s


@pytest.fixture
async def token(srv: Server) -> str:
    return await srv.token("agent-1", ["cluster.*"])


async def markers(client: aioredis.Redis, keys: Keys, topic: str = "cluster") -> set[bytes]:
    """The digests of the producer's dedup records of ``topic``."""
    return await dedup_records(client, keys, topic)


def ids(body: Any) -> list[str]:
    return [e["id"] for e in body["events"]]


def entry_ids(body: Any) -> list[str]:
    return [e["entry_id"] for e in body["events"]]


# ---------------------------------------------------------------------- over HTTP


async def test_an_event_posted_without_an_id_gets_no_marker(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    status, body, _ = await srv.post("/v1/events", cluster_event(), token=token)
    assert status == 202, body
    [minted] = ids(body)
    assert await find_record(client, keys, "cluster", minted, window_ms=DAY) is None
    assert await markers(client, keys) == set()
    rows: Any = await client.xrange(keys.stream("cluster"))
    assert [(r[0].decode(), r[1][b"id"].decode()) for r in rows] == [
        (body["events"][0]["entry_id"], minted)
    ]


async def test_an_event_with_its_own_id_is_marked_and_its_retry_adds_nothing(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    ev = cluster_event(id=ID_A)
    status, first, _ = await srv.post("/v1/events", ev, token=token)
    assert status == 202, first
    assert await markers(client, keys) == digests(SA)
    marker = await find_record(client, keys, "cluster", SA, window_ms=DAY)
    assert marker == first["events"][0]["entry_id"]
    status, again, _ = await srv.post("/v1/events", ev, token=token)
    assert status == 202, again
    assert again["events"] == first["events"] == [{"id": SA, "entry_id": entry_ids(first)[0]}]
    assert await client.xlen(keys.stream("cluster")) == 1


async def test_a_json_batch_marks_exactly_the_items_with_ids(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    batch = [cluster_event(id=ID_A), cluster_event(), cluster_event(id=ID_B), cluster_event()]
    status, first, _ = await srv.post("/v1/events", batch, token=token)
    assert status == 202, first
    assert await markers(client, keys) == digests(SA, SB)
    status, again, _ = await srv.post("/v1/events", batch, token=token)
    assert status == 202, again
    # the items with ids are duplicates of the first post; the others are new events
    assert entry_ids(again)[0] == entry_ids(first)[0]
    assert entry_ids(again)[2] == entry_ids(first)[2]
    assert not set(entry_ids(again)[1::2]) & set(entry_ids(first))
    assert await client.xlen(keys.stream("cluster")) == 6
    assert await markers(client, keys) == digests(SA, SB)


async def test_ndjson_marks_exactly_the_lines_with_ids(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    lines = [cluster_event(), cluster_event(id=ID_A), cluster_event(), cluster_event(id=ID_B)]
    data = b"\n".join(orjson.dumps(e) for e in lines[:2]) + b"\r\n\n  \n"
    data += b"\n".join(orjson.dumps(e) for e in lines[2:]) + b"\n"
    status, first, _ = await srv.post("/v1/events", data=data, token=token, headers=NDJSON)
    assert status == 202, first
    assert ids(first)[1::2] == [SA, SB]
    assert await markers(client, keys) == digests(SA, SB)
    status, again, _ = await srv.post("/v1/events", data=data, token=token, headers=NDJSON)
    assert status == 202, again
    assert entry_ids(again)[1::2] == entry_ids(first)[1::2]
    assert await client.xlen(keys.stream("cluster")) == 6


async def test_msgpack_marks_exactly_the_items_with_ids(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    batch = [cluster_event(id=ID_A), cluster_event(), cluster_event()]
    status, body, _ = await srv.post(
        "/v1/events", data=msgspec.msgpack.encode(batch), token=token, headers=MSGPACK
    )
    assert status == 202, body
    assert await markers(client, keys) == digests(SA)
    for single in (cluster_event(), cluster_event(id=ID_B)):
        status, body, _ = await srv.post(
            "/v1/events", data=msgspec.msgpack.encode(single), token=token, headers=MSGPACK
        )
        assert status == 202, body
    assert await markers(client, keys) == digests(SA, SB)
    assert await client.xlen(keys.stream("cluster")) == 5


async def test_an_id_key_written_with_an_escape_still_counts_as_given(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    data = orjson.dumps(cluster_event(id=ID_A)).replace(b'"id"', b'"\\u0069d"')
    assert b'"id"' not in data
    status, first, _ = await srv.post("/v1/events", data=data, token=token, headers=JSON)
    assert status == 202, first
    assert ids(first) == [SA]
    assert await markers(client, keys) == digests(SA)
    status, again, _ = await srv.post("/v1/events", data=data, token=token, headers=JSON)
    assert again["events"] == first["events"]
    assert await client.xlen(keys.stream("cluster")) == 1


async def test_the_text_id_in_a_value_or_an_escape_elsewhere_is_no_id(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    quoted = orjson.dumps([cluster_event(node_name='"id"'), cluster_event(instance_id="i-é")])
    escaped = orjson.dumps(cluster_event()).replace(b'"c1"', b'"c\\u0031"')
    for data in (quoted, escaped):
        status, body, _ = await srv.post("/v1/events", data=data, token=token, headers=JSON)
        assert status == 202, body
    assert await markers(client, keys) == set()
    assert await client.xlen(keys.stream("cluster")) == 3


async def test_the_cluster_route_and_idempotency_keys_keep_their_markers(
    srv: Server, token: str, client: aioredis.Redis, keys: Keys
) -> None:
    ev = cluster_event()
    del ev["cluster_id"]
    status, body, _ = await srv.post(
        "/clusters/prod-7/events", [ev, {**ev, "id": ID_A}], token=token
    )
    assert status == 202, body
    assert await markers(client, keys) == digests(SA)
    h = {"Idempotency-Key": "req-9"}
    status, body, _ = await srv.post(
        "/v1/events", [ev | {"cluster_id": "c"}] * 2, token=token, headers=h
    )
    assert status == 202, body
    assert await markers(client, keys) == digests(
        SA,
        idem_marker("agent-1", "req-9", 0),
        idem_marker("agent-1", "req-9", 1),
    )


# ---------------------------------------------------------------------- EventDecoder.ids_given


@pytest.fixture
def decoder() -> EventDecoder:
    return EventDecoder(list(REGISTRY.by_name.values()), max_batch=50)


def _ndjson(*items: dict[str, Any]) -> bytes:
    return b"\n\n".join(orjson.dumps(e) for e in items) + b"\r\n \n"


@pytest.mark.parametrize(
    ("body", "fmt", "given"),
    [
        pytest.param(orjson.dumps(cluster_event()), "json", [False], id="json-one-without"),
        pytest.param(orjson.dumps(cluster_event(id=ID_A)), "json", [True], id="json-one-with"),
        pytest.param(
            b'{ "type" : "cluster.spot_interruption", "id" : "x", "cluster_id": "c",'
            b' "instance_id": "i", "instance_type": "t", "availability_zone": "z" }',
            "json",
            [True],
            id="json-spaced",
        ),
        pytest.param(
            orjson.dumps([cluster_event(id=ID_A), cluster_event(), cluster_event(id=ID_B)]),
            "json",
            [True, False, True],
            id="json-batch",
        ),
        pytest.param(
            orjson.dumps([cluster_event(), cluster_event(id=ID_A)]).replace(b'"id"', b'"\\u0069d"'),
            "json",
            [False, True],
            id="json-escaped-key",
        ),
        pytest.param(
            orjson.dumps([cluster_event(node_name='"id"'), cluster_event()]),
            "json",
            [False, False],
            id="json-id-as-value",
        ),
        pytest.param(
            _ndjson(cluster_event(), cluster_event(id=ID_A), cluster_event()),
            "ndjson",
            [False, True, False],
            id="ndjson",
        ),
        pytest.param(_ndjson(cluster_event(id=ID_A)), "ndjson", [True], id="ndjson-one"),
        pytest.param(msgspec.msgpack.encode(cluster_event()), "msgpack", [False], id="mp-one"),
        pytest.param(
            msgspec.msgpack.encode(cluster_event(id=ID_A)), "msgpack", [True], id="mp-one-with"
        ),
        pytest.param(
            msgspec.msgpack.encode([cluster_event(), cluster_event(id=ID_A), cluster_event()]),
            "msgpack",
            [False, True, False],
            id="mp-batch",
        ),
    ],
)
def test_ids_given_says_per_item_whether_the_sender_gave_the_id(
    decoder: EventDecoder, body: bytes, fmt: str, given: list[bool]
) -> None:
    events, _ = decoder.decode(body, fmt)  # a body the ingest accepts
    assert decoder.ids_given(body, fmt, len(events)) == given
    assert [e.id == ID_A or e.id == ID_B or e.id == "x" for e in events] == given
