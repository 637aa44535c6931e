"""``ticket.create`` and the ``qa-tickets`` concern (docs/qa.md) against a fake Linear GraphQL
endpoint the test serves on 127.0.0.1: each bug a crawl finds is filed exactly once, also
when the tracker's first answer is lost or it asks to slow down."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

import qa
from qa import _keys, tickets
from qa.crawl import CrawlRequest, crawl_session
from schemas.qa import BugFound
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.tasks import TaskContext, TaskStore
from tests.qa_support import FakeLinear, Site, qa_settings, run_until_settled, runners, serve

pytestmark = pytest.mark.timeout(60)

TEAM = "team-qa"


@pytest.fixture
async def linear() -> AsyncIterator[tuple[FakeLinear, str]]:
    fake = FakeLinear()
    async with serve(fake.app) as url:
        yield fake, f"{url}/graphql"


def tracker(url: str, **kw: Any) -> Any:
    return qa_settings(
        linear_url=url,
        linear_api_key=kw.pop("api_key", FakeLinear.API_KEY),
        linear_team_id=TEAM,
        tracker_read_timeout_s=2.0,  # well above a loaded machine's answer times
        **kw,
    )


def ctx_for(
    client: aioredis.Redis, keys: Keys, producer: Producer, task_id: str, attempt: int = 0
) -> TaskContext:
    return TaskContext(
        task_id=task_id,
        task_type="ticket.create",
        attempt=attempt,
        store=TaskStore(client, keys),
        redis=client,
        keys=keys,
        producer=producer,
    )


def bug(n: int = 1, **kw: Any) -> BugFound:
    return BugFound(
        id=qa.bug_id("sx", f"http://127.0.0.1/p{n}", "http_error"),
        session_id="sx",
        kind="http_error",
        url=f"http://127.0.0.1/p{n}",
        status=500,
        title=f"/p{n} answers HTTP 500",
        **kw,
    )


def bug_consumer(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> Consumer:
    return Consumer(
        tickets.CONCERN,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="qa-tickets-1", block_ms=20),
    )


async def ticket_task_ids(client: aioredis.Redis, keys: Keys) -> list[str]:
    rows: Any = await client.xrange(keys.stream("tasks.tickets.normal"))
    return [f[b"id"].decode() for _, f in rows]


async def test_a_crawls_bugs_are_filed_once_each_though_the_first_answer_is_lost(
    linear: tuple[FakeLinear, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    fake, url = linear
    fake.lose = 1  # the first issueCreate goes through, its answer never arrives
    site = Site()
    async with serve(site.app) as site_url, contextlib.AsyncExitStack() as stack:
        stack.enter_context(tracker(url))
        crawl = CrawlRequest(session_id="t1", base_url=site_url, max_depth=1)
        found = await crawl_session(crawl, ctx_for(client, keys, producer, "crawl-t1"))
        assert found["bugs_found"] == 2
        assert await bug_consumer(client, keys, producer, codec).process_once() == 2
        ids = await ticket_task_ids(client, keys)
        assert len(ids) == 2
        run = runners(client, keys, producer, codec, ticket_create={"retry_base_s": 0.01})
        views = await run_until_settled(run["tickets"], TaskStore(client, keys), ids)
        assert [v.status for v in views] == ["completed", "completed"], [v.error for v in views]
        assert len(fake.issues) == 2
        # One create per bug, plus the lost one's retry: which looked first, and found it.
        assert (fake.creates, fake.lookups, fake.refused) == (2, 1, 0)
        lost = next(v for v in views if v.attempts == 2)
        assert lost.result["created"] is False  # found by the lookup, not created again
        by_url = {v.result["url"]: v.result for v in views}
        assert set(by_url) == {i["url"] for i in fake.issues.values()}
        for issue in fake.issues.values():
            assert issue["teamId"] == TEAM
            assert "found by QA session `t1`" in issue["description"]
        missing = next(i for i in fake.issues.values() if "/missing" in i["title"])
        assert missing["title"] == "Broken link: /missing answers HTTP 404"
        assert f"- <{site_url}/>" in missing["description"]  # linked from the home page
        for b in found["bugs"]:
            record: Any = await client.hgetall(_keys.ticket(keys, b["id"]))
            assert record[b"state"] == b"filed"
            assert record[b"issue_id"].decode() == tickets.issue_uuid(b["id"])
            assert record[b"url"].decode() in by_url

        # The same bugs again (a crawl run again, a redelivered event): no new task or issue.
        again = await crawl_session(crawl, ctx_for(client, keys, producer, "crawl-t1", 1))
        assert again["bugs_found"] == 2
        assert await client.xlen(keys.stream("qa")) == 2  # the producer dropped the copies
        events: Any = await client.xrange(keys.stream("qa"))
        for _, fields in events:
            await tickets.on_bug(codec.decode(fields), ctx_for(client, keys, producer, "x"))
        assert await ticket_task_ids(client, keys) == ids
        assert await run["tickets"].process_once() == 0
        # ticket.create run twice for one bug: the second answers from Redis, no call.
        request = tickets.ticket_request(bug())
        direct = [
            await tickets.create_ticket(request, ctx_for(client, keys, producer, "d", n))
            for n in range(2)
        ]
    assert direct[0]["created"] is True
    assert direct[1]["created"] is False
    assert direct[0]["url"] == direct[1]["url"]
    assert (len(fake.issues), fake.creates, fake.lookups) == (3, 3, 1)


async def test_rate_limits_are_waited_out_without_a_second_issue(
    linear: tuple[FakeLinear, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    """A 429 with Retry-After, then Linear's own RATELIMITED answer: the task waits (no
    attempt used) and the breaker holds the tracker meanwhile; then the issue is filed."""
    fake, url = linear
    fake.limited, fake.linear_limited = 1, 1
    with tracker(url):
        ctx = ctx_for(client, keys, producer, "bug-ctx")
        await tickets.on_bug(bug(7), ctx)
        ids = await ticket_task_ids(client, keys)
        run = runners(client, keys, producer, codec)
        [view] = await run_until_settled(run["tickets"], TaskStore(client, keys), ids)
    assert view.status == "completed", view.error
    assert len(fake.issues) == 1
    assert fake.creates == 1
    assert (fake.limited, fake.linear_limited) == (0, 0)
    breaker: Any = await client.hgetall(keys.breaker("linear"))
    assert float(breaker[b"hold_until"]) > 0  # the tracker was held for its Retry-After
    assert b"rate limit" in breaker[b"hold_reason"]


async def test_a_refused_api_key_fails_the_ticket_at_once(
    linear: tuple[FakeLinear, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    fake, url = linear
    with tracker(url, api_key="lin_api_wrong"):
        await tickets.on_bug(bug(), ctx_for(client, keys, producer, "c"))
        ids = await ticket_task_ids(client, keys)
        run = runners(client, keys, producer, codec)
        [view] = await run_until_settled(run["tickets"], TaskStore(client, keys), ids)
    assert view.status == "failed"
    assert view.attempts == 1
    assert "refused the API key" in (view.error or "")
    assert fake.issues == {}


async def test_without_a_tracker_bugs_are_not_ticketed(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    await producer.publish(bug())
    with qa_settings():
        assert await bug_consumer(client, keys, producer, codec).process_once() == 1
    assert await client.exists(keys.stream("tasks.tickets.normal")) == 0


def test_issue_ids_are_uuid4_shaped_and_derived_from_the_bug() -> None:
    a, b = tickets.issue_uuid("bug-a"), tickets.issue_uuid("bug-b")
    assert a == tickets.issue_uuid("bug-a")
    assert a != b
    assert uuid.UUID(a).version == 4


def test_linears_reset_header_says_how_long_to_wait() -> None:
    reset_ms = int((time.time() + 42) * 1000)
    wait = tickets._rate_wait_s({"X-RateLimit-Requests-Reset": str(reset_ms)})
    assert 40 < wait <= 42
    assert tickets._rate_wait_s({"Retry-After": "7"}) == 7
    assert tickets._rate_wait_s({}) == tickets.DEFAULT_RATE_WAIT_S
