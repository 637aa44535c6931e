"""A bug found again by a later crawl session is not ticketed again (docs/qa.md, "One issue
per bug across sessions"): the issue of its fingerprint is answered and the sighting counted,
for ``ticket_dedup_days`` after the last one; then a new issue is filed. Against the fake
Linear GraphQL server the ticket tests use, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from qa import _keys, tickets
from qa.crawl import CrawlRequest, crawl_session
from streamproc import Codec, Keys, Producer
from streamproc.tasks import TaskStore, TaskView
from tests.qa_support import FakeLinear, Site, run_until_settled, runners, serve
from tests.test_qa_tickets import bug_consumer, ctx_for, ticket_task_ids, tracker

pytestmark = pytest.mark.timeout(90)

_DAY_S = 86_400


@pytest.fixture
async def linear() -> AsyncIterator[tuple[FakeLinear, str]]:
    fake = FakeLinear()
    async with serve(fake.app) as url:
        yield fake, f"{url}/graphql"


async def crawl_and_ticket(
    session_id: str,
    site_url: str,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> list[TaskView]:
    """One crawl session of the site, its bugs through ``qa-tickets``, its ticket tasks run."""
    crawl = CrawlRequest(session_id=session_id, base_url=site_url, max_depth=1)
    found = await crawl_session(crawl, ctx_for(client, keys, producer, f"crawl-{session_id}"))
    assert found["bugs_found"] >= 2
    before = await ticket_task_ids(client, keys)
    await bug_consumer(client, keys, producer, codec).process_once()
    ids = [i for i in await ticket_task_ids(client, keys) if i not in before]
    assert len(ids) == found["bugs_found"]
    run = runners(client, keys, producer, codec)
    views = await run_until_settled(run["tickets"], TaskStore(client, keys), ids)
    assert [v.status for v in views] == ["completed"] * len(ids), [v.error for v in views]
    return views


async def bug_records(client: aioredis.Redis, keys: Keys) -> dict[str, Any]:
    out: dict[str, Any] = {}
    async for k in client.scan_iter(match=f"{keys.prefix}:state:qa:bug:*"):
        out[k.decode()] = await client.hgetall(k)
    return out


async def test_a_daily_crawl_files_each_bug_once_and_counts_the_later_sightings(
    linear: tuple[FakeLinear, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    fake, url = linear
    async with serve(Site().app) as site_url, contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracker(url))
        first = await crawl_and_ticket("day-1", site_url, client, keys, producer, codec)
        n = len(first)
        assert (len(fake.issues), fake.creates, fake.lookups) == (n, n, 0)
        assert all(v.result["created"] for v in first)
        issue_of = {v.result["fingerprint"]: v.result["url"] for v in first}
        assert len(issue_of) == n  # the session's bugs are distinct problems
        records = await bug_records(client, keys)
        assert len(records) == n
        for name in records:  # no page text in key names: a fixed-length hash
            assert re.fullmatch(rf"{re.escape(keys.prefix)}:state:qa:bug:[0-9a-f]{{32}}", name)
            await client.expire(name, 100)  # as if the sighting were long ago

        # The next day's session: the same bugs under new bug ids; no new issue, no call.
        second = await crawl_and_ticket("day-2", site_url, client, keys, producer, codec)
        assert (len(fake.issues), fake.creates, fake.lookups) == (n, n, 0)
        assert len(second) == n
        for v in second:
            assert v.result["created"] is False
            assert v.result["seen_again"] is True
            assert v.result["sightings"] == 2
            assert v.result["url"] == issue_of[v.result["fingerprint"]]
            assert v.result["bug_id"] not in {f.result["bug_id"] for f in first}
        for name, record in (await bug_records(client, keys)).items():
            assert record[b"sightings"] == b"2"
            assert record[b"last_session"] == b"day-2"
            assert record[b"state"] == b"filed"
            ttl = await client.ttl(name)
            assert 29 * _DAY_S < ttl <= 30 * _DAY_S  # pushed back to the full window

        # The same sighting again (a retried task, a redelivered event): counted once.
        events: Any = await client.xrange(keys.stream("qa"))
        bugs = [codec.decode(fields) for _, fields in events]
        seen = next(b for b in bugs if b.id == second[0].result["bug_id"])
        again = tickets.ticket_request(seen)
        answer = await tickets.create_ticket(again, ctx_for(client, keys, producer, "re", 1))
        assert answer["created"] is False
        assert answer["url"] == second[0].result["url"]
        assert {r[b"sightings"] for r in (await bug_records(client, keys)).values()} == {b"2"}

        # The window passed without a sighting (the records expired): filed anew.
        for name in await bug_records(client, keys):
            await client.delete(name)
        third = await crawl_and_ticket("day-40", site_url, client, keys, producer, codec)
        assert all(v.result["created"] for v in third)
        assert (len(fake.issues), fake.creates) == (2 * n, 2 * n)
        assert {r[b"sightings"] for r in (await bug_records(client, keys)).values()} == {b"1"}


async def test_two_sessions_racing_on_one_bug_make_one_issue(
    linear: tuple[FakeLinear, str], client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """Two sessions' tickets for one problem at once: the first to claim the fingerprint names
    the issue id for both, so the tracker refuses a second issue (the loser looks it up) or
    the loser finds it filed; either way one issue and two sightings."""
    fake, url = linear
    base: dict[str, Any] = {
        "kind": "broken_link",
        "url": "http://127.0.0.1:9/missing",
        "title": "Broken link",
    }
    a = tickets.TicketRequest(bug_id="bug-a", session_id="s-a", **base)
    b = tickets.TicketRequest(bug_id="bug-b", session_id="s-b", **base)
    assert tickets.fingerprint(a) == tickets.fingerprint(b)
    with tracker(url):
        made_a, made_b = await asyncio.gather(
            tickets.create_ticket(a, ctx_for(client, keys, producer, "ta")),
            tickets.create_ticket(b, ctx_for(client, keys, producer, "tb")),
        )
    assert len(fake.issues) == 1
    assert fake.creates - fake.refused == 1
    assert made_a["issue_id"] == made_b["issue_id"]
    assert made_a["url"] == made_b["url"]
    assert [made_a["created"], made_b["created"]].count(True) == 1
    key = _keys.bug(keys, tickets.fingerprint(a))
    assert await client.hget(key, "sightings") == b"2"


def test_the_fingerprint_is_the_problem_not_the_session_or_the_changing_numbers() -> None:
    def req(**kw: Any) -> tickets.TicketRequest:
        fields: dict[str, Any] = {
            "bug_id": "b1",
            "session_id": "s1",
            "kind": "console_error",
            "url": "https://shop.example/checkout",
            "title": "/checkout: 1 console error",
            "detail": "TypeError: x is undefined at main.3fa9c1.js:45:12\nsecond error",
            **kw,
        }
        return tickets.TicketRequest(**fields)

    fp = tickets.fingerprint(req())
    assert re.fullmatch(r"[0-9a-f]{32}", fp)
    same = [
        req(bug_id="b2", session_id="s2", title="other title"),
        req(detail="TypeError:  x is undefined at main.77e0b2.js:46:3"),  # a new build
        req(url="https://shop.example/checkout#top"),
    ]
    assert {tickets.fingerprint(r) for r in same} == {fp}
    other = [
        req(detail="ReferenceError: y is not defined"),
        req(url="https://shop.example/cart"),
        req(url="https://staging.shop.example/checkout"),  # another origin
        req(kind="http_error"),
    ]
    assert len({fp, *(tickets.fingerprint(r) for r in other)}) == 1 + len(other)
