"""Issue 17 item 2: one agent cannot make another agent's events vanish through dedup.

Before: producer markers were ``pub:`` + event id or ``<agent>:<Idempotency-Key>``, one
namespace for all agents, with ``:`` allowed in ids; agent B's id ``a1:order-42`` ate agent
a1's request under ``Idempotency-Key: order-42``, and any agent could post another's event id
first (the consumers' ``seen:`` marks would drop the other's event too)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from streamproc import Keys, Producer
from tests.helpers import dedup_records
from tests.test_ingest_support import Server, cluster_event, running_ingest

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer) as s:
        yield s


async def stored_ids(client: aioredis.Redis, keys: Keys) -> list[str]:
    rows: Any = await client.xrange(keys.stream("cluster"))
    return [fields[b"id"].decode() for _, fields in rows]


async def test_an_id_that_looks_like_another_agents_idempotency_key_takes_nothing(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    a1, b = await srv.token("a1", ["cluster.*"]), await srv.token("b", ["cluster.*"])
    status, first, _ = await srv.post("/v1/events", cluster_event(id="a1:order-42"), token=b)
    assert status == 202, first
    status, second, _ = await srv.post(
        "/v1/events", cluster_event(), token=a1, headers={"Idempotency-Key": "order-42"}
    )
    assert status == 202, second
    assert second["events"][0]["entry_id"] != first["events"][0]["entry_id"]
    assert len(await stored_ids(client, keys)) == 2  # a1's event was written


async def test_two_agents_choosing_the_same_id_make_two_events(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    a, b = await srv.token("a", ["cluster.*"]), await srv.token("b", ["cluster.*"])
    answers = []
    for token in (b, a, a):  # b first, as an attacker would; a's own retry is still one event
        status, body, _ = await srv.post("/v1/events", cluster_event(id="order-42"), token=token)
        assert status == 202, body
        answers.append(body["events"][0])
    assert answers[1] == answers[2]  # the same agent's same id: idempotent
    assert answers[0]["id"] != answers[1]["id"]  # another agent's same id: another event
    ids = await stored_ids(client, keys)
    assert len(ids) == len(set(ids)) == 2  # distinct ids: no consumer drops one as seen


async def test_no_text_an_agent_chose_goes_into_a_key_name(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await srv.token("a", ["cluster.*"])
    long_id, long_key = "i" * 128, "k" * 200
    for headers, ev in (
        ({}, cluster_event(id=long_id)),
        ({"Idempotency-Key": long_key}, cluster_event()),
    ):
        status, body, _ = await srv.post("/v1/events", ev, token=token, headers=headers)
        assert status == 202, body
    prefix = keys.published_prefix("cluster")
    names = [k.decode().removeprefix(prefix) async for k in client.scan_iter(match=prefix + "*")]
    assert all(long_id not in n and long_key not in n for n in names)
    # the records are fields of a generation's shard hashes, each a fixed 8-byte digest
    records = await dedup_records(client, keys)
    assert len(records) == 2
    assert {len(r) for r in records} == {8}
    assert all(re.fullmatch(r"meta|seq:[0-9a-f]{32}|\d+:\d+", n) for n in names), names
