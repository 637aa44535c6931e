"""``crawl.session`` (docs/qa.md) against a site the test serves on 127.0.0.1: the bugs it
has are found, each reported once, and nothing outside the crawl's bounds is fetched."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis

import qa
from qa import _keys
from qa.crawl import CrawlRequest, crawl_session
from qa.crawler import Crawl, HostLimiter, Robots
from schemas.qa import BugFound, bug_id
from streamproc import Codec, Keys, Producer
from streamproc.errors import Permanent
from streamproc.outbound import CallTransient
from streamproc.tasks import TaskContext, TaskStore
from tests.helpers import free_port
from tests.qa_support import Site, qa_settings, run_until_settled, runners, serve, submit

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def site() -> AsyncIterator[tuple[Site, str]]:
    s = Site(slow_s=5.0)
    async with serve(s.app) as url:
        yield s, url


def task_ctx(
    client: aioredis.Redis, keys: Keys, producer: Producer, task_id: str, attempt: int = 0
) -> TaskContext:
    """The runner's TaskContext for calling a task function directly (a task hash exists)."""
    return TaskContext(
        task_id=task_id,
        task_type="crawl.session",
        attempt=attempt,
        store=TaskStore(client, keys),
        redis=client,
        keys=keys,
        producer=producer,
    )


async def bug_events(client: aioredis.Redis, keys: Keys, codec: Codec[Any]) -> list[BugFound]:
    rows: Any = await client.xrange(keys.stream("qa"))
    return [codec.decode(fields) for _, fields in rows]


async def test_a_crawl_finds_the_sites_bugs_within_its_bounds(
    site: tuple[Site, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    s, url = site
    with qa_settings():
        crawl = runners(client, keys, producer, codec)["crawl"]
        payload = {"session_id": "s1", "base_url": url + "/", "max_pages": 50, "max_depth": 3}
        await submit(client, keys, producer, "crawl.session", "crawl-1", payload)
        [view] = await run_until_settled(crawl, TaskStore(client, keys), ["crawl-1"])
    assert view.status == "completed", view.error
    result = view.result
    assert result["status"] == "completed"
    bugs = {(b["kind"], b["url"].removeprefix(url), b["status"]) for b in result["bugs"]}
    assert bugs == {("broken_link", "/missing", 404), ("http_error", "/error", 500)}
    # robots.txt: /private/ is never fetched; depth 3: /deep/3 is the last page fetched.
    assert s.saw("/robots.txt")
    assert not s.saw("/private/secret")
    assert s.saw("/deep/3")
    assert not s.saw("/deep/4")
    assert result["skipped"]["robots"] == 1
    assert result["skipped"]["beyond_depth"] == 1
    assert result["skipped"]["off_site"] >= 1  # elsewhere.invalid: counted, never asked
    assert result["browser"] == "off"
    # A same-origin redirect leads to its target (fetched once); an off-site one nowhere.
    pages = {p["url"].removeprefix(url): p for p in result["pages"]}
    assert pages["/old"]["status"] == 302
    assert s.fetched.count("/about") == 1
    assert pages["/away"]["status"] == 302
    assert "off-site" in pages["/away"]["error"]
    assert pages["/about"]["status"] == 200
    assert pages["/about"]["load_ms"] >= 0
    assert pages["/missing"]["problems"] == ["broken_link"]
    assert pages["/"]["depth"] == 0
    assert result["pages_crawled"] == len(s.fetched) - 1  # every request but robots.txt
    assert len(set(s.fetched)) == len(s.fetched)  # nothing fetched twice
    # The task's progress and the session's state in Redis.
    assert view.detail == {"pages_crawled": result["pages_crawled"], "bugs_found": 2}
    state = await qa.SessionStore.get(client, keys, "s1")
    assert state is not None
    assert state["status"] == "completed"
    assert state["pages_crawled"] == result["pages_crawled"]
    assert state["bugs_found"] == 2
    assert state["task_id"] == "crawl-1"
    assert 0 < await client.ttl(_keys.session(keys, "s1")) <= 24 * 3600
    # One qa.bug_found event per bug, with its deterministic id.
    events = await bug_events(client, keys, codec)
    assert sorted(e.id for e in events) == sorted(
        [bug_id("s1", url + "/missing", "broken_link"), bug_id("s1", url + "/error", "http_error")]
    )
    missing = next(e for e in events if e.kind == "broken_link")
    assert missing.linked_from == [url + "/"]
    assert missing.session_id == "s1"
    assert missing.key == "s1"
    assert missing.task_id == "crawl-1"


async def test_a_retried_crawl_reports_no_bug_twice(
    site: tuple[Site, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    _, url = site
    p = CrawlRequest(session_id="s2", base_url=url, max_pages=20, max_depth=1)
    with qa_settings():
        first = await crawl_session(p, task_ctx(client, keys, producer, "t2"))
        again = await crawl_session(p, task_ctx(client, keys, producer, "t2", attempt=1))
    assert first["bugs_found"] == again["bugs_found"] == 2
    assert [b["id"] for b in first["bugs"]] == [b["id"] for b in again["bugs"]]
    assert await client.xlen(keys.stream("qa")) == 2
    state = await qa.SessionStore.get(client, keys, "s2")
    assert state is not None
    assert (state["status"], state["attempt"], state["bugs_found"]) == ("completed", 1, 2)


async def test_max_pages_bounds_the_crawl(
    site: tuple[Site, str], client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    s, url = site
    p = CrawlRequest(session_id="s3", base_url=url, max_pages=3, max_depth=5)
    with qa_settings():
        result = await crawl_session(p, task_ctx(client, keys, producer, "t3"))
    assert result["pages_crawled"] == 3
    assert len(s.fetched) == 4  # robots.txt and three pages
    assert result["skipped"]["beyond_max_pages"] > 0


async def test_an_unreachable_site_is_a_transient_error(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    p = CrawlRequest(session_id="s4", base_url=f"http://127.0.0.1:{free_port()}/")
    with qa_settings(), pytest.raises(CallTransient, match="does not answer"):
        await crawl_session(p, task_ctx(client, keys, producer, "t4"))
    state = await qa.SessionStore.get(client, keys, "s4")
    assert state is not None
    assert state["status"] == "retrying"  # attempt 1 of 4: the runner retries it
    assert "does not answer" in state["errors"][0]


async def test_the_soft_time_limit_returns_what_was_found(
    site: tuple[Site, str],
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
) -> None:
    """The soft limit comes while the slow pages load: the crawl stops and its task
    completes with the pages it had, ``partial``."""
    s, url = site
    with qa_settings():
        crawl = runners(
            client, keys, producer, codec,
            crawl_session={"soft_time_limit_s": 0.5, "time_limit_s": 30.0},
        )["crawl"]  # fmt: skip
        payload = {
            "session_id": "s5",
            "base_url": url + "/contact",
            "start_urls": [f"{url}/slow/{n}" for n in range(1, 4)],
            "max_pages": 10,
        }
        await submit(client, keys, producer, "crawl.session", "crawl-5", payload)
        [view] = await run_until_settled(crawl, TaskStore(client, keys), ["crawl-5"])
    assert view.status == "completed", view.error
    assert view.result["status"] == "partial"
    assert "soft time limit" in view.result["reason"]
    state = await qa.SessionStore.get(client, keys, "s5")
    assert state is not None
    assert state["status"] == "partial"
    assert view.result["pages_crawled"] >= 1  # /contact, before the slow pages
    assert s.saw("/slow/1")


GOOD = {"session_id": "s", "base_url": "https://shop.example/"}
HOSTILE = [
    ({"base_url": "file:///etc/passwd"}, "matching regex '^https?://' - at `$.base_url`"),
    ({"base_url": "javascript:alert(1)"}, "matching regex '^https?://' - at `$.base_url`"),
    ({"base_url": "ftp://shop.example/"}, "matching regex '^https?://' - at `$.base_url`"),
    ({"base_url": "http://"}, "length >= 8 - at `$.base_url`"),
    ({"base_url": "http:///nohost"}, "base_url: not an http(s) URL with a host"),
    ({"base_url": "https://user:pw@shop.example/"}, "user names and passwords"),
    ({"base_url": "https://shop.example/" + "a" * 3000}, "length <= 2048 - at `$.base_url`"),
    ({"max_pages": 10**9}, "Expected `int` <= 10000 - at `$.max_pages`"),
    ({"max_pages": 0}, "Expected `int` >= 1 - at `$.max_pages`"),
    ({"max_depth": 21}, "Expected `int` <= 20 - at `$.max_depth`"),
    ({"max_depth": -1}, "Expected `int` >= 0 - at `$.max_depth`"),
    ({"max_pages": "50"}, "Expected `int`, got `str` - at `$.max_pages`"),
    (
        {"start_urls": ["https://evil.example/"]},
        "start_urls[0]: 'https://evil.example/' is not on the origin of base_url "
        "(https://shop.example:443)",
    ),
    (
        {"start_urls": ["http://shop.example/"]},  # another scheme is another origin
        "start_urls[0]: 'http://shop.example/' is not on the origin",
    ),
    ({"start_urls": ["file:///etc/passwd"]}, "- at `$.start_urls[0]`"),
    ({"start_urls": ["https://shop.example/"] * 101}, "length <= 100 - at `$.start_urls`"),
    ({"session_id": "../../etc"}, "- at `$.session_id`"),
    ({"session_id": "a:b"}, "- at `$.session_id`"),
    ({"session_id": "x" * 65}, "- at `$.session_id`"),
    ({"time_budget_s": 0}, "Expected `float` > 0.0 - at `$.time_budget_s`"),
    ({"follow_external": True}, "Object contains unknown field `follow_external`"),
]


@pytest.mark.parametrize(("change", "error"), HOSTILE)
def test_hostile_payloads_are_refused_saying_what_is_wrong(
    change: dict[str, Any], error: str
) -> None:
    """What ``POST /v1/tasks`` and the runner check (``msgspec.convert`` with the type)."""
    with pytest.raises(msgspec.ValidationError) as e:
        msgspec.convert({**GOOD, **change}, CrawlRequest)
    assert error in str(e.value)


def test_a_good_payload_passes() -> None:
    p = msgspec.convert(
        {**GOOD, "start_urls": ["https://SHOP.example:443/sale"], "max_pages": 10_000},
        CrawlRequest,
    )
    assert p.max_depth == 3


async def test_the_operators_limits_fail_the_task_at_once(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    p = CrawlRequest(session_id="s6", base_url="http://127.0.0.1:9/", max_pages=5000)
    with qa_settings(max_pages_limit=500), pytest.raises(Permanent, match="at most 500 pages"):
        await crawl_session(p, task_ctx(client, keys, producer, "t6"))
    assert await client.exists(_keys.session(keys, "s6")) == 0  # refused before it started


@pytest.mark.parametrize(
    "base_url",
    [
        "http://127.0.0.1:8080/",
        "http://169.254.169.254/latest/",
        "http://[::1]/",
        "http://10.1.2.3/",
    ],
)
async def test_private_addresses_are_refused_unless_allowed(
    base_url: str, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """The cloud's metadata service, loopback, an intranet: not crawled by default."""
    p = CrawlRequest(session_id="s7", base_url=base_url)
    with qa_settings(allow_private_networks=False), pytest.raises(Permanent) as e:
        await crawl_session(p, task_ctx(client, keys, producer, "t7"))
    assert "not a public address (STREAMPROC_QA_ALLOW_PRIVATE_NETWORKS=1" in str(e.value)


async def test_per_host_concurrency_and_crawl_delay_hold() -> None:
    """At most ``per_host_concurrency`` requests in flight; robots.txt's Crawl-delay slows
    the host's pace (never speeds it up)."""
    s = Site(slow_s=0.1)
    s.crawl_delay_s = 2
    async with serve(s.app) as url, aiohttp.ClientSession() as http:
        with qa_settings(per_host_rate_per_s=100.0) as settings:
            limiter = HostLimiter(2, settings.per_host_rate_per_s)
            robots = await Robots.load(http, url, settings, limiter)
    assert robots.crawl_delay_s() == 2.0
    assert limiter.interval_s == 0.01
    limiter.slow_to(robots.crawl_delay_s())  # what the crawl does with it
    assert limiter.interval_s == 2.0
    limiter.slow_to(0.5)
    assert limiter.interval_s == 2.0
    s2 = Site(slow_s=0.1)
    async with serve(s2.app) as url:
        with qa_settings(per_host_concurrency=2) as settings:
            crawl = Crawl(
                [f"{url}/slow/{n}" for n in range(6)], max_pages=6, max_depth=0, s=settings
            )
            pages = await crawl.run()
    assert len(pages) == 6
    assert s2.most_in_flight == 2


async def test_submitting_a_hostile_crawl_through_the_api_says_where(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    from consumers.tasks import TASK_TYPES
    from tests.test_ingest_support import running_ingest

    async with running_ingest(client, keys, producer, task_types=TASK_TYPES) as srv:
        op = await srv.token("ops", [], operator=True)
        body = {"type": "crawl.session", "payload": {**GOOD, "base_url": "file:///etc/passwd"}}
        status, answer, _ = await srv.post("/v1/tasks", body, token=op)
        assert status == 422
        assert answer["path"] == "$.payload.base_url"
        body = {"type": "crawl.session", "payload": GOOD}
        status, answer, _ = await srv.post("/v1/tasks", body, token=op)
        assert status == 202
    assert await client.xlen(keys.stream("tasks.crawl.normal")) == 1


def test_settings_come_from_the_environment_and_bad_ones_name_their_variable() -> None:
    from streamproc.errors import ConfigError

    try:
        qa.configure_from_env(
            {"STREAMPROC_QA_LINEAR_TEAM_ID": "t", "STREAMPROC_QA_LINEAR_API_KEY": "k",
             "STREAMPROC_QA_RETENTION_DAYS": "3", "STREAMPROC_QA_ALLOW_PRIVATE_NETWORKS": "1"}
        )  # fmt: skip
        s = qa.settings()
        assert (s.tracker_configured, s.retention_days, s.allow_private_networks) == (
            True,
            3.0,
            True,
        )
        with pytest.raises(ConfigError, match="STREAMPROC_QA_BROWSER='maybe': expected one of"):
            qa.configure_from_env({"STREAMPROC_QA_BROWSER": "maybe"})
        with pytest.raises(ConfigError, match="STREAMPROC_QA_PER_HOST_CONCURRENCY='0'"):
            qa.configure_from_env({"STREAMPROC_QA_PER_HOST_CONCURRENCY": "0"})
        with pytest.raises(ConfigError, match="STREAMPROC_QA_NO_SUCH"):
            qa.configure_from_env({"STREAMPROC_QA_NO_SUCH": "1"})
    finally:
        qa.use_settings(None)
