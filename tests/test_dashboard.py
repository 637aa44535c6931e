"""The dashboard's snapshot, sessions and routes, over the real ingest app and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import urlparse

import aiohttp
import msgspec
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from structlog.testing import capture_logs

from schemas import REGISTRY, SpotInterruption
from schemas.workers import WorkerCreated, WorkerPollTick
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Permanent, Producer
from streamproc.connection import connect
from streamproc.consumer import LATENCY_BUCKETS_S
from streamproc.dashboard import COOKIE, DASHBOARD, Panel, PanelData, build_snapshot
from streamproc.dashboard.panels import MAX_ROWS, PanelReader
from streamproc.dashboard.session import session_key
from streamproc.dashboard.snapshot import LATENCY_NOTE, histogram_percentile, percentile
from streamproc.groups import ensure_declared_groups
from streamproc.ingest import Ingest, IngestSettings, create_app
from streamproc.inspect import limits_of
from streamproc.scheduler import Scheduler
from streamproc.settings import RedisSettings
from streamproc.tasks import TaskContext, TaskType, task_concern
from tests.helpers import MakeConsumer, entries, spot
from tests.tcpproxy import TcpProxy
from tests.test_ingest_support import Server, running_ingest
from workers.panel import PANEL as WORKERS_PANEL
from workers.panel import read_workers
from workers.registry import WorkerStore

BOUNDS_MS = [b * 1000 for b in LATENCY_BUCKETS_S]

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer) as s:
        yield s


@pytest.fixture
async def browser(srv: Server) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that keeps cookies for 127.0.0.1 (aiohttp's default jar ignores IP hosts)."""
    async with aiohttp.ClientSession(
        base_url=srv.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
    ) as s:
        yield s


async def login(browser: aiohttp.ClientSession, token: str) -> aiohttp.ClientResponse:
    async with browser.post("/dashboard/login", data={"token": token}, allow_redirects=False) as r:
        await r.read()
        return r


async def csrf_of(browser: aiohttp.ClientSession) -> str:
    async with browser.get("/dashboard") as r:
        page = await r.text()
    marker = '<meta name="csrf-token" content="'
    return page.split(marker, 1)[1].split('"', 1)[0]


# ---------------------------------------------------------------------- snapshot


def test_histogram_percentile_gives_the_bucket_bound() -> None:
    bounds = [1.0, 2.0, 5.0]
    assert histogram_percentile([0, 0, 0, 0], bounds, 50) is None
    assert histogram_percentile([10, 0, 0, 0], bounds, 99) == 1.0
    assert histogram_percentile([50, 49, 1, 0], bounds, 50) == 1.0
    assert histogram_percentile([50, 49, 1, 0], bounds, 99) == 2.0
    assert histogram_percentile([50, 49, 0, 1], bounds, 100) == 5.0  # above every bound


async def test_latency_window_sums_consumers_and_survives_restarts_and_junk(
    client: aioredis.Redis, keys: Keys, producer: Producer, make_consumer: MakeConsumer
) -> None:
    async def handle(event: SpotInterruption, ctx: Any) -> None:
        return None

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    key = keys.latency("g")
    now = await client.time()
    at = int(now[0]) * 1000

    def hist(counts: list[int], when: int = at) -> bytes:
        bounds = BOUNDS_MS
        full = counts + [0] * (len(bounds) + 1 - len(counts))
        return msgspec.json.encode({"at": when, "bounds_ms": bounds, "counts": full})

    await client.hset(key, mapping={"a": hist([5]), "b": hist([0, 0, 0, 9])})
    _, counts = await build_snapshot(client, keys)
    await client.hset(
        key,
        mapping={
            "a": hist([6, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),  # +1 at 1 ms, +1 in the 12th
            "b": hist([0, 2]),  # restarted: counts from zero again, 2 at 2 ms
            "c": b"not json",  # someone else's field: ignored
            "e": hist([-1000, 5]),  # negative counts: ignored
            "f": msgspec.json.encode({"at": at, "bounds_ms": [1.0] * 5000, "counts": [1] * 5001}),
            "d": hist([0] * 16 + [9], when=at - 120_000),  # silent for 2 min: ignored
        },
    )
    second, _ = await build_snapshot(client, keys, previous=counts)
    [g] = second.groups
    # the window: a +1 (1 ms) and +1 (bound 12), b 2 (2 ms): 4 events
    assert g.latency_p50_ms == 2.0
    assert g.latency_p99_ms == BOUNDS_MS[12]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0


async def test_snapshot_has_groups_rates_pending_ages_dlq_and_ticker(
    client: aioredis.Redis, keys: Keys, producer: Producer, make_consumer: MakeConsumer
) -> None:
    """Rates and ack latency come from two samples (latency from the consumer's histogram)."""

    async def handle(event: SpotInterruption, ctx: Any) -> None:
        if event.instance_id == "i-99":
            raise Permanent("bad instance")

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    await client.set(keys.ticker_lease(), "node-a/7", px=5000)
    await client.hset(keys.ticker_last(), "discovery", "1795000000000")
    await producer.publish_many([spot(i) for i in range(5)])
    first, counts = await build_snapshot(client, keys)
    [g] = first.groups
    assert (g.topic, g.group, g.lag, g.pending, g.done_per_s, g.done_total) == (
        "cluster",
        "g",
        5,
        0,
        None,
        0,
    )
    await consumer.report_stats()  # nothing acked yet: an empty histogram
    await producer.publish_many([spot(99)])
    while await consumer.process_once():
        pass
    await consumer.report_stats()
    second, _ = await build_snapshot(client, keys, previous=counts)
    [g] = second.groups
    assert (g.lag, g.pending, g.done_total, g.dlq) == (0, 0, 6, 1)
    assert g.done_per_s is not None
    assert g.done_per_s > 0
    # 5 events acked (the 6th was dead-lettered), each within seconds of its XADD: bucket bounds
    assert consumer.stats.acked == 5
    assert g.latency_p50_ms is not None
    assert g.latency_p99_ms is not None
    assert g.latency_p50_ms in BOUNDS_MS
    assert 0 < g.latency_p50_ms <= g.latency_p99_ms <= 60_000
    assert second.latency_note == LATENCY_NOTE
    assert first.groups[0].latency_p50_ms is None  # one sample: no window yet
    assert second.dlq_total == 1
    [t] = second.topics
    assert t.length == 6
    assert t.added_per_s is not None
    assert second.ticker is not None
    assert second.ticker.leader == "node-a/7"
    [sched] = second.ticker.schedules
    assert (sched.name, sched.last) == ("discovery", "2026-11-18T11:06:40Z")


async def test_pending_ages_come_from_unacked_entries(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    await client.xgroup_create(keys.stream("cluster"), "slow", id="0", mkstream=True)
    await producer.publish_many([spot(i) for i in range(3)])
    await client.xreadgroup("slow", "c1", {keys.stream("cluster"): ">"}, count=3)
    snap, _ = await build_snapshot(client, keys)
    [g] = snap.groups
    assert g.pending == 3
    assert g.pending_age_p50_s is not None
    assert g.pending_age_p99_s is not None
    assert 0 <= g.pending_age_p50_s <= g.pending_age_p99_s


async def test_render_groups_are_shown_as_the_render_pool(
    client: aioredis.Redis, keys: Keys
) -> None:
    # as every role creates its groups: the topic goes into the registry set (no SCAN)
    await ensure_declared_groups(client, keys, {"renders": ["renders"]})
    snap, _ = await build_snapshot(client, keys)
    [r] = snap.renders
    assert (r.topic, r.group, r.in_flight, r.waiting) == ("renders", "renders", 0, 0)


# ---------------------------------------------------------------------- sessions


async def test_page_without_a_session_is_the_login_form(
    srv: Server, browser: aiohttp.ClientSession
) -> None:
    async with browser.get("/dashboard") as r:
        body = await r.text()
        assert r.status == 200
        assert r.headers["Cache-Control"] == "no-store"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert 'action="/dashboard/login"' in body
    assert "csrf-token" not in body
    async with browser.get("/dashboard/api/snapshot") as r:
        assert r.status == 401
    async with browser.get("/dashboard/events") as r:
        assert r.status == 401


async def test_only_operator_tokens_log_in(srv: Server, browser: aiohttp.ClientSession) -> None:
    """An agent's valid token without operator rights is told it lacks --operator (its holder
    knows it is valid: the API takes it); a wrong token gets the generic refusal only."""
    agent = await srv.token("agent-1", ["cluster.*"])
    async with browser.post("/dashboard/login", data={"token": agent}) as r:
        assert r.status == 403
        page = await r.text()
    assert "agent &#x27;agent-1&#x27; lacks --operator" in page
    assert "streamproc agents add NAME --operator" in page
    async with browser.post("/dashboard/login", data={"token": "spk_not-a-token"}) as r:
        assert r.status == 401
        page = await r.text()
    assert "Unknown or revoked token." in page
    assert "operator" not in page.split('role="alert"')[1].split("</p>")[0]
    assert not [c for c in browser.cookie_jar if c.key == COOKIE]


async def test_login_sets_an_httponly_strict_cookie_stored_hashed(
    srv: Server, browser: aiohttp.ClientSession, client: aioredis.Redis, keys: Keys
) -> None:
    token = await srv.token("admin", (), operator=True)
    r = await login(browser, token)
    assert r.status == 303
    assert r.headers["Location"] == "/dashboard"
    cookie = r.cookies[COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/dashboard"
    sid = cookie.value
    stored: dict[bytes, bytes] = await client.hgetall(  # type: ignore[assignment]
        session_key(keys, hashlib.sha256(sid.encode()).hexdigest())
    )
    assert stored[b"agent"] == b"admin"
    assert sid.encode() not in b"".join([*stored.keys(), *stored.values()])
    assert await client.pttl(session_key(keys, hashlib.sha256(sid.encode()).hexdigest())) > 0
    async with browser.get("/dashboard") as page:
        assert 'name="csrf-token"' in await page.text()
    async with browser.get("/dashboard/api/snapshot") as snap:
        assert snap.status == 200
        assert (await snap.json())["prefix"] == keys.prefix


async def test_revoking_the_agent_ends_its_sessions_at_once(
    srv: Server, browser: aiohttp.ClientSession
) -> None:
    token = await srv.token("admin", (), operator=True)
    await login(browser, token)
    await srv.agents.revoke("admin")
    async with browser.get("/dashboard/api/snapshot") as r:
        assert r.status == 401


async def test_sse_pushes_snapshots(srv: Server, browser: aiohttp.ClientSession) -> None:
    await login(browser, await srv.token("admin", (), operator=True))
    async with browser.get("/dashboard/events") as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        lines: list[bytes] = []
        async for line in r.content:
            lines.append(line)
            if line.startswith(b"data: {"):
                break
    assert b"event: snapshot\n" in lines
    snap = msgspec.json.decode(lines[-1][len(b"data: ") :])
    assert {"groups", "topics", "dlq_total", "ticker", "renders"} <= snap.keys()


async def test_replay_needs_csrf_header_and_same_origin(
    srv: Server,
    browser: aiohttp.ClientSession,
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    await login(browser, await srv.token("admin", (), operator=True))
    dlq_id: bytes = await client.xadd(  # type: ignore[assignment]
        keys.dlq("cluster", "g"), {"type": "x.y", "id": "e1", "dlq_reason": "unknown_type"}
    )
    body = {"topic": "cluster", "group": "g", "ids": [dlq_id.decode()]}
    async with browser.post("/dashboard/api/dlq/replay", json=body) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "csrf"
    csrf = await csrf_of(browser)
    async with browser.post(
        "/dashboard/api/dlq/replay",
        json=body,
        headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"},
    ) as r:
        assert r.status == 403
        assert (await r.json())["error"] == "cross_origin"
    async with browser.get("/dashboard/api/dlq", params={"topic": "cluster", "group": "g"}) as r:
        listed = await r.json()
    assert listed["total"] == 1
    assert listed["entries"][0]["reason"] == "unknown_type"
    async with browser.post(
        "/dashboard/api/dlq/replay", json=body, headers={"X-CSRF-Token": csrf}
    ) as r:
        assert r.status == 200
        assert (await r.json())["replayed"] == 1
    assert await client.xlen(keys.dlq("cluster", "g")) == 0
    [(_, fields)] = await entries(client, keys.retry_stream("cluster", "g"))
    assert fields[b"type"] == b"x.y"
    assert await client.hget(keys.replays("cluster", "g"), "dlq_replayed") == b"1"  # counted
    async with browser.post(
        "/dashboard/api/dlq/replay",
        json={"topic": "cluster", "group": "bad name", "ids": ["1-0"]},
        headers={"X-CSRF-Token": csrf},
    ) as r:
        assert r.status == 400


async def test_dlq_api_filters_by_reason_and_carries_payload_and_full_error(
    srv: Server,
    browser: aiohttp.ClientSession,
    client: aioredis.Redis,
    keys: Keys,
) -> None:
    """What the DLQ view's expand shows: the payload indented, the whole error, the age,
    consumer and deliveries; a reason filter says how many match of how many in all."""
    await login(browser, await srv.token("admin", (), operator=True))
    error = "first line\n" + "x" * 900
    await client.xadd(
        keys.dlq("cluster", "g"),
        {
            "type": "x.y",
            "id": "e1",
            "data": '{"a":{"b":1}}',
            "dlq_reason": "permanent",
            "dlq_error_type": "ValueError",
            "dlq_error": error,
            "dlq_consumer": "host-a-1",
            "dlq_deliveries": "3",
        },
    )
    await client.xadd(
        keys.dlq("cluster", "g"),
        {"type": "x.y", "id": "e2", "data": "{nope", "dlq_reason": "bad_json"},
    )
    params = {"topic": "cluster", "group": "g", "reason": "permanent"}
    async with browser.get("/dashboard/api/dlq", params=params) as r:
        body = await r.json()
    assert (body["total"], body["matching"], body["replayed"]) == (2, 1, 0)
    assert "bad_json" in body["reasons"]
    [d] = body["entries"]
    assert d["payload"] == '{\n  "a": {\n    "b": 1\n  }\n}'
    assert d["error"] == error  # whole, not clipped
    assert (d["consumer"], d["deliveries"], d["undecodable"]) == ("host-a-1", "3", False)
    assert 0 <= d["age_s"] < 3600
    async with browser.get("/dashboard/api/dlq", params={**params, "reason": "bad_json"}) as r:
        [bad] = (await r.json())["entries"]
    assert (bad["payload"], bad["undecodable"]) == ("{nope", True)


async def test_logout_deletes_the_session(
    srv: Server, browser: aiohttp.ClientSession, client: aioredis.Redis, keys: Keys
) -> None:
    await login(browser, await srv.token("admin", (), operator=True))
    csrf = await csrf_of(browser)
    async with browser.post("/dashboard/logout") as r:
        assert r.status == 403  # no CSRF header
    async with browser.post("/dashboard/logout", headers={"X-CSRF-Token": csrf}) as r:
        assert r.status == 200
    assert [k async for k in client.scan_iter(match=f"{keys.prefix}:dashboard:*")] == []


# ---------------------------------------------------------------------- application panels

HOSTILE = "<img src=x onerror=alert(1)>"


@contextlib.asynccontextmanager
async def serving_panels(
    client: aioredis.Redis, keys: Keys, producer: Producer, panels: Sequence[Panel]
) -> AsyncIterator[Server]:
    """The ingest app with ``panels`` on its dashboard (as ``streamproc ingest`` passes
    ``App.panels``), on 127.0.0.1."""
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(auth_cache_s=0.0),
    )
    server = TestServer(create_app(ingest, panels=panels), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()


async def add_worker(
    client: aioredis.Redis, keys: Keys, worker_id: str, n: int, name: str = "", **polled: Any
) -> None:
    """A registered worker; ``polled``: the record fields a poll would write."""
    store = WorkerStore(client, keys)
    spec = WorkerCreated(
        worker_id=worker_id, name=name, instance_id=f"i-{n:08x}", region="eu-west-1"
    )
    assert await store.register(spec, interval_s=300, now_ms=n, now_iso="2026-01-01T00:00:00Z")
    if polled:
        assert await store.polled(worker_id, True, polled) == 0


async def broken_read(client: aioredis.Redis, keys: Keys) -> PanelData:
    raise RuntimeError("lookup failed <b>")


async def test_the_snapshot_carries_the_workers_panel_and_a_failing_panel_shows_its_error(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """Over HTTP: the workers panel lists the workers (alerting first), the panel that
    raises shows its error, and the rest of the snapshot is there, runtime schedules too."""
    await add_worker(client, keys, "w-a", 1, name=HOSTILE, status="running", cpu=12.34)
    await add_worker(
        client,
        keys,
        "w-z",
        2,
        status="running",
        cpu=97.0,
        memory=40.0,
        alert_cpu="alert",
        last_polled_at="2026-01-01T00:05:00Z",
    )
    await WorkerStore(client, keys).polled("w-a", False, {"last_error": "x" * 400})
    await Scheduler(client, keys).add("worker.w-a", every="5 min", event=WorkerPollTick)
    panels = [WORKERS_PANEL, Panel("broken", "Broken", broken_read)]
    async with (
        serving_panels(client, keys, producer, panels) as srv,
        aiohttp.ClientSession(base_url=srv.url, cookie_jar=aiohttp.CookieJar(unsafe=True)) as b,
    ):
        await login(b, await srv.token("admin", (), operator=True))
        async with b.get("/dashboard/api/snapshot") as r:
            assert r.status == 200
            snap = await r.json()
    assert snap["prefix"] == keys.prefix
    assert snap["ticker"]["runtime_schedules"] == 1
    workers, broken = snap["panels"]
    assert (workers["name"], workers["title"], workers["error"]) == ("workers", "Workers", None)
    assert workers["columns"][:3] == ["id", "name", "status"]
    assert workers["total"] == 2
    hot, cool = workers["rows"]
    assert hot == ["w-z", "", "running", 97.0, 40.0, "cpu", "2026-01-01T00:05:00Z", 0, None]
    assert cool[:6] == ["w-a", HOSTILE, "running", 12.3, None, "ok"]
    assert cool[7] == 1  # one failed poll since
    assert len(cool[8]) == 120  # the last error, cut
    assert broken == {
        "name": "broken",
        "title": "Broken",
        "columns": [],
        "rows": [],
        "total": 0,
        "note": "",
        "error": "RuntimeError: lookup failed <b>",
    }


async def test_the_workers_panel_shows_200_rows_alerting_first_and_the_total(
    client: aioredis.Redis, keys: Keys
) -> None:
    for n in range(MAX_ROWS + 5):
        await add_worker(client, keys, f"w-{n:03d}", n + 1)
    await WorkerStore(client, keys).polled("w-204", True, {"alert_memory": "alert"})
    data = await read_workers(client, keys)
    assert (len(data.rows), data.total) == (MAX_ROWS, MAX_ROWS + 5)
    assert [r[0] for r in data.rows[:3]] == ["w-204", "w-000", "w-001"]
    assert data.rows[0][5] == "memory"
    assert data.note.startswith("The first 200 of 205")


async def test_a_panel_is_bounded_checked_and_timed_out_and_its_failures_logged_once(
    client: aioredis.Redis, keys: Keys
) -> None:
    async def many(c: aioredis.Redis, k: Keys) -> PanelData:
        return PanelData(columns=["n", "text"], rows=[[i, "y" * 5000] for i in range(500)], total=7)

    async def crooked(c: aioredis.Redis, k: Keys) -> PanelData:
        return PanelData(columns=["a", "b"], rows=[["only one"]], total=1)

    async def not_data(c: aioredis.Redis, k: Keys) -> Any:
        return {"columns": ["a"]}

    async def hangs(c: aioredis.Redis, k: Keys) -> PanelData:
        await asyncio.sleep(10)
        raise AssertionError("not reached")

    reader = PanelReader(
        [
            Panel("many", "Many", many),
            Panel("crooked", "Crooked", crooked),
            Panel("not-data", "Not data", not_data),
            Panel("hangs", "Hangs", hangs),
        ],
        timeout_s=0.05,
    )
    with capture_logs() as logs:
        big, crooked_view, not_data_view, hung = await reader.read(client, keys)
        await reader.read(client, keys)  # the same failures again: not logged again
    assert (len(big.rows), big.total, big.error) == (MAX_ROWS, MAX_ROWS, None)
    assert len(str(big.rows[0][1])) == 1000
    assert crooked_view.error == "ValueError: row 0 does not have one cell per column (2)"
    assert not_data_view.error == "TypeError: read returned dict, not PanelData"
    assert hung.error == "no answer within 0.05 s"
    failed = [e["panel"] for e in logs if e["event"] == "dashboard_panel_failed"]
    assert sorted(failed) == ["crooked", "hangs", "not-data"]


# ---------------------------------------------------------------------- states, windows, flags


async def test_a_group_is_busy_while_its_old_entry_is_renewed_and_stuck_when_nobody_does(
    client: aioredis.Redis, keys: Keys
) -> None:
    """The snapshot colours a group with inspect's own judgement: idle time, not age."""
    stream = keys.stream("cluster")
    entry_id = await client.xadd(stream, {"type": "t"}, id="1000-0")  # stamped 1970: very old
    await ensure_declared_groups(client, keys, {"cluster": ["g"]})
    await client.xreadgroup("g", "c1", {stream: ">"})  # delivered now: idle ~0
    limits = limits_of(stuck_after_s=60)
    snap, _ = await build_snapshot(client, keys, limits=limits)
    [g] = snap.groups
    assert (g.state, g.stuck_pending) == ("busy", 0)
    [h] = snap.health
    assert (h.group, h.state) == ("g", "busy")
    await client.xclaim(stream, "g", "c1", 0, [entry_id], idle=120_000)  # nobody renewed it
    snap, _ = await build_snapshot(client, keys, limits=limits)
    [g] = snap.groups
    assert (g.state, g.stuck_pending) == ("stuck", 1)
    assert g.longest_idle_s is not None
    assert g.longest_idle_s >= 120
    assert "not renewed" in snap.health[0].reasons[0]


async def test_failed_per_s_counts_dead_letters_written_between_samples(
    client: aioredis.Redis, keys: Keys
) -> None:
    await ensure_declared_groups(client, keys, {"cluster": ["g"]})
    await client.xadd(keys.dlq("cluster", "g"), {"type": "x", "dlq_reason": "permanent"})
    first, counts = await build_snapshot(client, keys)
    assert first.groups[0].failed_per_s is None  # one sample: no rate yet
    for _ in range(3):
        await client.xadd(keys.dlq("cluster", "g"), {"type": "x", "dlq_reason": "permanent"})
    await client.xtrim(keys.dlq("cluster", "g"), maxlen=1)  # a purge does not make it negative
    second, _ = await build_snapshot(client, keys, previous=counts)
    [g] = second.groups
    assert g.failed_per_s is not None
    assert g.failed_per_s > 0
    assert g.done_per_s is not None


async def test_a_topic_written_to_and_read_by_no_group_is_flagged(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    await ensure_declared_groups(client, keys, {"cluster": ["g"]})
    await client.sadd(keys.topics(), "notify")
    await client.xadd(keys.stream("notify"), {"type": "notify.x"})
    snap, _ = await build_snapshot(client, keys)
    topics = {t.topic: t for t in snap.topics}
    assert (topics["notify"].unread, topics["notify"].groups) == (True, 0)
    assert (topics["cluster"].unread, topics["cluster"].groups) == (False, 1)


async def test_latency_covers_the_window_not_just_the_last_sample(
    client: aioredis.Redis, keys: Keys, producer: Producer, make_consumer: MakeConsumer
) -> None:
    """Consumers write their histograms every 5 s: between two 1 s samples most show no acks.
    Against the window's first sample the percentiles stay."""

    async def handle(event: SpotInterruption, ctx: Any) -> None:
        return None

    consumer = make_consumer({SpotInterruption: handle})
    await consumer.ensure_groups()
    await consumer.report_stats()
    _, base = await build_snapshot(client, keys)
    await producer.publish_many([spot(i) for i in range(3)])
    while await consumer.process_once():
        pass
    await consumer.report_stats()
    second, counts = await build_snapshot(client, keys, previous=base)
    assert second.groups[0].latency_p50_ms is not None
    # no new acks since: against the previous sample alone, nothing ...
    third, _ = await build_snapshot(client, keys, previous=counts)
    assert third.groups[0].latency_p50_ms is None
    # ... against the window's first sample, the same figures
    held, _ = await build_snapshot(client, keys, previous=counts, latency_base=base)
    assert held.groups[0].latency_p50_ms == second.groups[0].latency_p50_ms
    assert held.latency_window_s >= 0


# ---------------------------------------------------------------------- the Tasks view


class _Job(msgspec.Struct):
    label: str


class _Blocker:
    def __init__(self) -> None:
        self.running = asyncio.Event()
        self.release = asyncio.Event()

    async def run(self, p: _Job, ctx: TaskContext) -> dict[str, Any]:
        await ctx.progress(0.25, step="one")
        self.running.set()
        await self.release.wait()
        return {"label": p.label}

    def types(self) -> dict[str, TaskType]:
        return {"test.block": TaskType(name="test.block", run=self.run, payload_type=_Job)}


async def _tasks(browser: aiohttp.ClientSession, **query: str) -> dict[str, Any]:
    async with browser.get("/dashboard/api/tasks", params=query) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _cancel(
    browser: aiohttp.ClientSession, task_id: str, csrf: str
) -> aiohttp.ClientResponse:
    async with browser.post(
        "/dashboard/api/tasks/cancel", json={"id": task_id}, headers={"X-CSRF-Token": csrf}
    ) as r:
        await r.read()
        return r


async def test_the_tasks_view_lists_payload_runner_runtime_and_cancels_with_csrf(
    client: aioredis.Redis, keys: Keys, producer: Producer, codec: Codec[Any]
) -> None:
    blocker = _Blocker()
    async with running_ingest(client, keys, producer, task_types=blocker.types()) as srv:
        op = await srv.token("ops", [], operator=True)
        async with aiohttp.ClientSession(
            base_url=srv.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
        ) as browser:
            await login(browser, op)
            csrf = await csrf_of(browser)
            queued = await _submit(srv, op, "queued-one", "low")
            listed = await _tasks(browser)
            [row] = listed["tasks"]
            assert row["task"]["id"] == queued
            assert (row["task"]["status"], row["task"]["priority"]) == ("queued", "low")
            assert row["payload"] == {"label": "queued-one"}  # from its request entry
            assert (row["runner"], row["runtime_s"]) == (None, None)
            assert listed["active"] == 1

            # state changes need the CSRF header
            async with browser.post("/dashboard/api/tasks/cancel", json={"id": queued}) as r:
                assert r.status == 403
            r = await _cancel(browser, queued, csrf)
            assert r.status == 200
            [row] = (await _tasks(browser, status="cancelled"))["tasks"]
            assert row["task"]["status"] == "cancelled"
            assert row["task"]["cancelled_by"] == "ops"
            assert (await _tasks(browser, status="queued"))["tasks"] == []
            assert (await _cancel(browser, "no-such-task", csrf)).status == 404

            # a running task: its runner (the consumer holding its entry) and its runtime
            running = await _submit(srv, op, "running-one", "high")
            runner = Consumer(
                task_concern(blocker.types()),
                client=client,
                codec=codec,
                keys=keys,
                producer=producer,
                settings=ConsumerSettings(consumer="runner-1", block_ms=50),
            )
            run = asyncio.create_task(runner.run())
            try:
                await blocker.running.wait()
                [row] = (await _tasks(browser, status="running"))["tasks"]
                assert row["task"]["id"] == running
                assert row["runner"] == "runner-1"
                assert row["runtime_s"] is not None
                assert row["task"]["progress"] == 0.25
                assert row["payload"] == {"label": "running-one"}
                r = await _cancel(browser, running, csrf)
                assert r.status == 202  # asked to stop: it ends cancelled
                while not await _ended(browser, running):  # noqa: ASYNC110
                    await asyncio.sleep(0.05)  # polling is what the page does
            finally:
                blocker.release.set()
                runner.stop()
                await run


async def _ended(browser: aiohttp.ClientSession, task_id: str) -> bool:
    done = (await _tasks(browser, status="cancelled"))["tasks"]
    return any(row["task"]["id"] == task_id for row in done)


async def _submit(srv: Server, op: str, label: str, priority: str) -> str:
    body = {"type": "test.block", "payload": {"label": label}, "priority": priority}
    status, answer, _ = await srv.post("/v1/tasks", body, token=op)
    assert status == 202, answer
    return str(answer["id"])


# ---------------------------------------------------------------------- a Redis outage


@pytest.fixture
def proxy(redis_url: str) -> Iterator[TcpProxy]:
    url = urlparse(redis_url)
    with TcpProxy(url.hostname or "127.0.0.1", url.port or 6379) as p:
        yield p


async def test_a_reload_during_a_redis_outage_serves_a_page_not_json(
    proxy: TcpProxy, keys: Keys, client: aioredis.Redis, codec: Codec[Any]
) -> None:
    through = connect(RedisSettings(url=proxy.url, key_prefix=keys.prefix, socket_timeout_s=1))
    producer = Producer(through, codec, keys)
    try:
        async with running_ingest(through, keys, producer) as srv:
            op = await srv.token("ops", [], operator=True)
            async with aiohttp.ClientSession(
                base_url=srv.url, cookie_jar=aiohttp.CookieJar(unsafe=True)
            ) as browser:
                await login(browser, op)
                async with browser.get("/dashboard/api/snapshot") as r:
                    assert r.status == 200  # Redis last answered now
                proxy.refuse(True)
                proxy.cut()
                async with browser.get("/dashboard") as r:
                    body = await r.text()
                    assert r.status == 503
                    assert r.headers["Content-Type"].startswith("text/html")
                    assert r.headers["Retry-After"] == "5"
                assert "does not answer" in body
                assert re.search(r"figures as of \d\d:\d\d:\d\d UTC", body), body
                assert '<meta http-equiv="refresh" content="5">' in body
                assert "csrf-token" not in body
                proxy.refuse(False)
                while True:  # Redis is back: the page again
                    async with browser.get("/dashboard") as r:
                        if r.status == 200:
                            assert 'name="csrf-token"' in await r.text()
                            break
                    await asyncio.sleep(0.2)
    finally:
        await through.aclose()


async def test_create_app_hands_the_groups_limits_to_the_dashboard(
    client: aioredis.Redis, keys: Keys, producer: Producer
) -> None:
    """The limits ``streamproc ingest`` passes (``limits_of(app.concerns)``) are the ones
    the page's states use: an entry idle 2 min is stuck by default, not under a 1 h limit."""
    stream = keys.stream("cluster")
    entry_id = await client.xadd(stream, {"type": "t"})
    await ensure_declared_groups(client, keys, {"cluster": ["g"]})
    await client.xreadgroup("g", "c1", {stream: ">"})
    await client.xclaim(stream, "g", "c1", 0, [entry_id], idle=120_000)
    states = []
    for limits in (None, limits_of(stuck_after_s=3600)):
        ingest = Ingest(client=client, registry=REGISTRY, keys=keys, producer=producer)
        app = create_app(ingest, limits=limits)
        snap = await app[DASHBOARD].sampler.snapshot()
        states.append(snap.groups[0].state)
    assert states == ["stuck", "ok"]
