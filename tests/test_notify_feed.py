"""The live feed (SSE) over a real socket and a real Redis: order, resume, access, limits, ends."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis

from notifications import feed_keys
from notifications._feed_reader import _Info
from notifications.feed import FeedSettings, add_routes, gap, parse_id
from streamproc import Keys, Producer, RedisSettings, connect
from tests.tcpproxy import TcpProxy
from tests.test_ingest_support import Server, running_ingest

pytestmark = pytest.mark.timeout(60)

#: Bounds every read so a broken feed fails the test instead of hanging it (not a threshold).
_READ_S = 10.0


def routes(**settings: Any) -> list[Any]:
    return [functools.partial(add_routes, settings=FeedSettings(**settings))]


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, routes=routes()) as s:
        yield s


class Sse:
    """The client side of one open feed: reads message blocks off the socket."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def block(self) -> dict[str, Any] | None:
        """The next block: its fields (``data`` joined, ``comments`` listed); None at the end."""
        block: dict[str, Any] = {"comments": []}
        async with asyncio.timeout(_READ_S):
            while True:
                raw = await self.response.content.readline()
                if not raw:
                    return None
                line = raw.decode().rstrip("\r\n")
                if not line:
                    if len(block) > 1 or block["comments"]:
                        return block
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if not name:
                    block["comments"].append(value)
                elif name == "data":
                    block["data"] = block["data"] + "\n" + value if "data" in block else value
                else:
                    block[name] = value

    async def opening(self) -> dict[str, Any]:
        first = await self.block()
        assert first is not None
        assert first["retry"].isdigit()
        assert parse_id(first["id"]) is not None
        assert "event" not in first
        assert "data" not in first
        return first

    async def events(self, n: int) -> list[dict[str, Any]]:
        """The next ``n`` events (blocks with data), skipping heartbeats."""
        out: list[dict[str, Any]] = []
        while len(out) < n:
            block = await self.block()
            assert block is not None, f"the feed ended after {out}"
            if "data" in block:
                out.append(block)
        return out

    async def until_end(self) -> list[dict[str, Any]]:
        """Every block left; the body must end cleanly (a cut body raises here)."""
        rest = []
        while (block := await self.block()) is not None:
            rest.append(block)
        return rest


@contextlib.asynccontextmanager
async def open_feed(
    srv: Server,
    cluster_id: str,
    token: str,
    *,
    query: str = "",
    headers: dict[str, str] | None = None,
) -> AsyncIterator[Sse]:
    h = {"Authorization": f"Bearer {token}", **(headers or {})}
    async with srv.session.get(f"{srv.url}/clusters/{cluster_id}/feed{query}", headers=h) as r:
        assert r.status == 200, await r.text()
        assert r.headers["Content-Type"] == "text/event-stream"
        yield Sse(r)


async def get_status(
    srv: Server, path: str, token: str | None, headers: dict[str, str] | None = None
) -> tuple[int, Any, Any]:
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    async with srv.session.get(srv.url + path, headers=h) as r:
        body = await r.json(content_type=None) if r.status != 200 else None
        return r.status, body, r.headers


async def viewer(srv: Server, name: str, *clusters: str) -> str:
    _, token = await srv.agents.add(name, clusters=clusters)
    return token


async def append_n(
    client: aioredis.Redis, keys: Keys, cluster_id: str, n: int, start: int = 0
) -> list[str]:
    return [
        await feed_keys.append(client, keys, cluster_id, "notify.notification", {"n": i})
        for i in range(start, start + n)
    ]


def ids(events: list[dict[str, Any]]) -> list[str]:
    return [e["id"] for e in events]


# ---------------------------------------------------------------------- delivery and resume


async def test_entries_arrive_in_order_with_their_ids_types_and_data(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c1")
    async with open_feed(srv, "c1", token) as sse:
        await sse.opening()
        first = await feed_keys.append(client, keys, "c1", "notify.notification", {"n": 0})
        second = await feed_keys.append(client, keys, "c1", "task.progress", {"pct": 50})
        events = await sse.events(2)
    assert [(e["id"], e["event"], orjson.loads(e["data"])) for e in events] == [
        (first, "notify.notification", {"n": 0}),
        (second, "task.progress", {"pct": 50}),
    ]


async def test_from_now_skips_old_entries_and_from_start_sends_every_kept_one(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c1")
    old = await append_n(client, keys, "c1", 3)
    async with open_feed(srv, "c1", token) as sse:
        opening = await sse.opening()
        assert opening["id"] == old[-1]  # a reconnect before any entry resumes here
        new = await append_n(client, keys, "c1", 1, start=3)
        assert ids(await sse.events(1)) == new
    async with open_feed(srv, "c1", token, query="?from=start") as sse:
        assert (await sse.opening())["id"] == "0-0"
        assert ids(await sse.events(4)) == old + new


@pytest.mark.parametrize("how", ["header", "query"])
async def test_reconnect_gets_exactly_the_missed_entries(
    srv: Server, client: aioredis.Redis, keys: Keys, how: str
) -> None:
    """Disconnect, more entries, reconnect from the last id seen: none lost, none repeated."""
    token = await viewer(srv, "v", "c1")
    async with open_feed(srv, "c1", token) as sse:
        await sse.opening()
        seen = ids(await sse.events(len(await append_n(client, keys, "c1", 2))))
    missed = await append_n(client, keys, "c1", 3, start=2)
    resume = (
        {"headers": {"Last-Event-ID": seen[-1]}}
        if how == "header"
        else {"query": f"?last_event_id={seen[-1]}"}
    )
    async with open_feed(srv, "c1", token, **resume) as sse:
        assert (await sse.opening())["id"] == seen[-1]
        got = await sse.events(3)
        later = await append_n(client, keys, "c1", 1, start=5)
        got += await sse.events(1)
    assert ids(got) == missed + later
    assert [orjson.loads(e["data"])["n"] for e in got] == [2, 3, 4, 5]


async def test_the_last_event_id_header_wins_over_the_query(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """EventSource reconnects to the same URL with a newer Last-Event-ID header."""
    token = await viewer(srv, "v", "c1")
    entries = await append_n(client, keys, "c1", 4)
    async with open_feed(
        srv,
        "c1",
        token,
        query=f"?last_event_id={entries[0]}",
        headers={"Last-Event-ID": entries[2]},
    ) as sse:
        await sse.opening()
        assert ids(await sse.events(1)) == entries[3:]


async def test_entries_of_any_shape_are_sent_as_valid_events(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """No type → ``message``; a line break in the data → one data line each."""
    token = await viewer(srv, "v", "c1")
    key = feed_keys.feed_key(keys, "c1")
    async with open_feed(srv, "c1", token) as sse:
        await sse.opening()
        odd: Any = await client.xadd(key, {"data": b'{"a":\n1}'})
        bad_type: Any = await client.xadd(key, {"type": b"x\r\ny", "data": b"{}"})
        events = await sse.events(2)
    assert [(e["id"], e["event"], e["data"]) for e in events] == [
        (odd.decode(), "message", '{"a":\n1}'),
        (bad_type.decode(), "xy", "{}"),
    ]


# ---------------------------------------------------------------------- gaps


async def test_a_trimmed_position_gets_a_gap_event_then_the_oldest_kept_entries(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c1")
    entries = await append_n(client, keys, "c1", 10)
    await client.xtrim(feed_keys.feed_key(keys, "c1"), maxlen=5, approximate=False)
    async with open_feed(srv, "c1", token, headers={"Last-Event-ID": entries[2]}) as sse:
        await sse.opening()
        [gap_event, *kept] = await sse.events(6)
    ms, seq = parse_id(entries[5]) or (0, 0)
    before_first = f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2**64 - 1}"
    assert gap_event["event"] == "gap"
    assert orjson.loads(gap_event["data"]) == {
        "reason": "trimmed",
        "last_event_id": entries[2],
        "resume_id": before_first,
    }
    assert gap_event["id"] == before_first  # a reconnect after the gap does not repeat it
    assert ids(kept) == entries[5:]


async def test_an_old_position_on_a_feed_that_lost_nothing_gets_no_gap(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """A viewer that opened a quiet feed (position 0-0) and comes back after entries came."""
    token = await viewer(srv, "v", "c1")
    async with open_feed(srv, "c1", token) as sse:
        opening = await sse.opening()
    assert opening["id"] == "0-0"
    entries = await append_n(client, keys, "c1", 3)
    async with open_feed(srv, "c1", token, query=f"?last_event_id={opening['id']}") as sse:
        await sse.opening()
        got = await sse.events(3)
    assert ids(got) == entries
    assert {e["event"] for e in got} == {"notify.notification"}


async def test_an_emptied_feed_gives_a_gap_up_to_its_end(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c1")
    entries = await append_n(client, keys, "c1", 4)
    await client.xtrim(feed_keys.feed_key(keys, "c1"), maxlen=0, approximate=False)
    async with open_feed(srv, "c1", token, headers={"Last-Event-ID": entries[1]}) as sse:
        await sse.opening()
        [lost] = await sse.events(1)
        assert lost["event"] == "gap"
        assert orjson.loads(lost["data"])["resume_id"] == lost["id"] == entries[-1]
        new = await append_n(client, keys, "c1", 1, start=4)
        assert ids(await sse.events(1)) == new


async def test_an_id_beyond_the_stream_is_a_reset_gap_and_new_entries_follow(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c1")
    entries = await append_n(client, keys, "c1", 2)
    async with open_feed(srv, "c1", token, headers={"Last-Event-ID": f"{2**64 - 1}-0"}) as sse:
        await sse.opening()
        [reset] = await sse.events(1)
        assert reset["event"] == "gap"
        assert orjson.loads(reset["data"])["reason"] == "reset"
        assert reset["id"] == entries[-1]
        new = await append_n(client, keys, "c1", 1, start=2)
        assert ids(await sse.events(1)) == new


def test_gap_rules() -> None:
    """A gap: older than the oldest entry kept on a stream that lost entries, or beyond it."""
    trimmed = _Info(last_generated=(9, 0), first=(5, 0), removed=4)
    assert gap((2, 0), trimmed, None) == ("trimmed", (4, 2**64 - 1))
    assert gap((2, 0), trimmed, 1) == ("trimmed", (4, 2**64 - 1))
    assert gap((2, 0), trimmed, 4) is None  # nothing removed since this feed's last read
    assert gap((5, 3), _Info((9, 0), (5, 4), 1), None) == ("trimmed", (5, 3))
    assert gap((5, 0), trimmed, None) is None  # the oldest kept was seen
    assert gap((9, 0), trimmed, None) is None
    assert gap((10, 0), trimmed, 4) == ("reset", (9, 0))
    never_lost = _Info(last_generated=(9, 0), first=(5, 0), removed=0)
    assert gap((0, 0), never_lost, None) is None
    emptied = _Info(last_generated=(9, 0), first=None, removed=6)
    assert gap((3, 0), emptied, None) == ("trimmed", (9, 0))
    assert gap((9, 0), emptied, None) is None
    missing = _Info((0, 0), None, 0)
    assert gap((0, 0), missing, None) is None
    assert gap((3, 0), missing, None) == ("reset", (0, 0))


# ---------------------------------------------------------------------- who may read


async def test_no_token_is_401(srv: Server) -> None:
    status, body, headers = await get_status(srv, "/clusters/c1/feed", None)
    assert status == 401
    assert body["error"] == "unauthorized"
    assert headers["WWW-Authenticate"].startswith("Bearer")


async def test_a_tenant_never_reads_another_clusters_feed(srv: Server) -> None:
    token_a = await viewer(srv, "tenant-a", "cluster-a")
    status, body, _ = await get_status(srv, "/clusters/cluster-b/feed", token_a)
    assert status == 403
    assert body["error"] == "forbidden_cluster"
    # An agent speaks for (posts events of, reads the feeds of) its --clusters only.
    poster = await srv.token("poster", ["cluster.*"], clusters=["cluster-b"])
    assert (await get_status(srv, "/clusters/cluster-a/feed", poster))[0] == 403
    async with open_feed(srv, "cluster-a", token_a) as sse:
        await sse.opening()


async def test_an_operator_reads_every_feed_and_a_pattern_viewer_its_matches(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    operator = await srv.token("ops", (), operator=True)
    prod = await viewer(srv, "prod-viewer", "prod-*")
    for cluster_id, token in (("anything-1", operator), ("prod-1", prod)):
        async with open_feed(srv, cluster_id, token) as sse:
            await sse.opening()
            entry = await feed_keys.append(client, keys, cluster_id, "t", {})
            assert ids(await sse.events(1)) == [entry]
    assert (await get_status(srv, "/clusters/staging-1/feed", prod))[0] == 403


async def test_a_revoked_token_loses_its_feed_at_the_next_heartbeat(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    r = routes(heartbeat_s=0.05, check_s=0.05)
    async with running_ingest(client, keys, producer, routes=r) as srv:
        token = await viewer(srv, "v", "c1")
        async with open_feed(srv, "c1", token) as sse:
            await sse.opening()
            beat = await sse.block()
            assert beat == {"comments": ["keep-alive"]}
            await srv.agents.revoke("v")
            await sse.until_end()


# ---------------------------------------------------------------------- hostile input

_BAD_IDS = [
    "garbage",
    "1" * 3000,
    "-1-0",
    "1--1",
    "1-",
    "-0",
    "1-2-3",
    "1-0\n",
    "1.5-0",
    " 1-0",
    f"{2**64}-0",
    f"0-{2**64}",
    "\uff11-\uff10",  # fullwidth digits: Python's \d would take them, Redis would not
]


@pytest.mark.parametrize("bad", _BAD_IDS)
async def test_bad_last_event_ids_are_400_with_where_and_the_server_goes_on(
    srv: Server, client: aioredis.Redis, keys: Keys, bad: str
) -> None:
    token = await viewer(srv, "v", "c1")
    # What a header can carry at all (HTTP strips the spaces around a header's value).
    if bad.isascii() and bad.isprintable() and bad == bad.strip():
        status, body, _ = await get_status(srv, "/clusters/c1/feed", token, {"Last-Event-ID": bad})
        assert (status, body["error"], body["path"]) == (
            400,
            "bad_last_event_id",
            "header:Last-Event-ID",
        ), body
    status, body, _ = await get_status(
        srv, "/clusters/c1/feed?" + urllib.parse.urlencode({"last_event_id": bad}), token
    )
    assert (status, body["error"], body["path"]) == (
        400,
        "bad_last_event_id",
        "query:last_event_id",
    )
    async with open_feed(srv, "c1", token) as sse:
        await sse.opening()
        entry = await feed_keys.append(client, keys, "c1", "t", {})
        assert ids(await sse.events(1)) == [entry]


@pytest.mark.parametrize(
    "bad",
    [
        "a" * 254,
        "bad%20id",
        "-lead",
        ".hidden",
        "prod%2A",
        "%C3%A9t%C3%A9",
        "a%0Ab",
        "a%0A",
        "a%00b",
    ],
)
async def test_bad_cluster_ids_are_400(srv: Server, bad: str) -> None:
    operator = await srv.token("ops", (), operator=True)
    status, body, _ = await get_status(srv, f"/clusters/{bad}/feed", operator)
    assert (status, body["error"], body["path"]) == (400, "bad_cluster_id", "path:cluster_id")
    assert (await get_status(srv, "/healthz", None))[0] == 200


async def test_the_longest_cluster_id_is_read(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    operator = await srv.token("ops", (), operator=True)
    long_id = "c:" + "x" * 251
    async with open_feed(srv, long_id, operator) as sse:
        await sse.opening()
        entry = await feed_keys.append(client, keys, long_id, "t", {})
        assert ids(await sse.events(1)) == [entry]


async def test_an_unknown_from_is_400(srv: Server) -> None:
    token = await viewer(srv, "v", "c1")
    status, body, _ = await get_status(srv, "/clusters/c1/feed?from=yesterday", token)
    assert (status, body["error"], body["path"]) == (400, "bad_from", "query:from")


# ---------------------------------------------------------------------- limits


async def test_an_agent_past_its_feed_limit_gets_429_until_one_closes(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    r = routes(max_feeds_per_agent=2, check_s=0.05, retry_after_s=7)
    async with running_ingest(client, keys, producer, routes=r) as srv:
        token = await viewer(srv, "v", "c*")
        other = await viewer(srv, "w", "c*")
        async with open_feed(srv, "c1", token) as one:
            await one.opening()
            async with open_feed(srv, "c2", token) as two:
                await two.opening()
                status, body, headers = await get_status(srv, "/clusters/c3/feed", token)
                assert (status, body["error"], headers["Retry-After"]) == (
                    429,
                    "too_many_feeds_for_agent",
                    "7",
                )
                async with open_feed(srv, "c3", other) as theirs:  # another agent's own limit
                    await theirs.opening()
        # The server notices the closed feeds (within check_s) and frees their slots.
        for _ in range(400):
            status, body, _ = await get_status(srv, "/clusters/c3/feed?x=1", token)
            if status != 429:
                break
            await asyncio.sleep(0.05)
        assert status == 200, body


async def test_a_process_past_its_feed_limit_gets_503(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    async with running_ingest(client, keys, producer, routes=routes(max_feeds=1)) as srv:
        first, second = await viewer(srv, "v", "c1"), await viewer(srv, "w", "c1")
        async with open_feed(srv, "c1", first) as sse:
            await sse.opening()
            status, body, headers = await get_status(srv, "/clusters/c1/feed", second)
            assert (status, body["error"]) == (503, "too_many_feeds")
            assert headers["Retry-After"] == "5"


# ---------------------------------------------------------------------- ends


async def test_open_feeds_end_cleanly_when_the_ingest_drains(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    token = await viewer(srv, "v", "c*")
    async with open_feed(srv, "c1", token) as one, open_feed(srv, "c2", token) as two:
        await one.opening()
        await two.opening()
        entry = await feed_keys.append(client, keys, "c1", "t", {})
        assert ids(await one.events(1)) == [entry]
        assert await srv.ingest.drain(timeout_s=30)  # not held up by the open feeds
        assert await one.until_end() == []
        assert await two.until_end() == []
    status, body, headers = await get_status(srv, "/clusters/c1/feed", token)
    assert (status, body["error"]) == (503, "draining")
    assert headers["Retry-After"]


async def test_a_redis_failure_ends_the_feed_cleanly_and_a_reconnect_resumes(
    redis_url: str, client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """Cut the ingest's Redis connections: the body ends (no broken chunk, no 500)."""
    host, _, port = redis_url.removeprefix("redis://").partition("/")[0].rpartition(":")
    with TcpProxy(host, int(port)) as proxy:
        through = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix))
        try:
            async with running_ingest(through, keys, producer, routes=routes()) as srv:
                token = await viewer(srv, "v", "c1")
                async with open_feed(srv, "c1", token) as sse:
                    await sse.opening()
                    seen = ids(await sse.events(len(await append_n(client, keys, "c1", 1))))
                    proxy.cut()
                    await sse.until_end()
                missed = await append_n(client, keys, "c1", 2, start=1)
                # Pooled connections the cut killed fail once each: 503, as a client retries.
                resume = {"Last-Event-ID": seen[-1]}
                for _ in range(20):
                    status, body, headers = await get_status(
                        srv, "/clusters/c1/feed", token, resume
                    )
                    if status != 503:
                        break
                    assert (body["error"], headers["Retry-After"]) == ("redis_unavailable", "1")
                async with open_feed(srv, "c1", token, headers=resume) as s2:
                    await s2.opening()
                    assert ids(await s2.events(2)) == missed
        finally:
            await through.aclose()


async def test_a_feed_expires_a_week_after_its_last_entry(
    client: aioredis.Redis, keys: Keys
) -> None:
    """Cluster ids come from agents: no feed key lives forever (issue 17 item 5)."""
    await feed_keys.append(client, keys, "c-expiring", "notify.notification", {"n": 1})
    ttl = await client.ttl(feed_keys.feed_key(keys, "c-expiring"))
    assert 0 < ttl <= feed_keys.FEED_TTL_S == 7 * 24 * 3600
