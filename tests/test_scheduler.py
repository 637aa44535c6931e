"""Runtime schedules against a real Redis: add/change/remove, firing under the lease with
compare-and-set, fencing, missed-tick policies, O(due) steps, and real ticker processes
SIGKILLed and restarted while 1,000 entity schedules run."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from streamproc import Codec, Keys, Producer
from streamproc.codec import Registry
from streamproc.errors import ConfigError
from streamproc.event import Event
from streamproc.ingest import Ingest, IngestSettings, create_app
from streamproc.schedule import Tick, tick_id
from streamproc.scheduler import Scheduler
from streamproc.ticker import Ticker, TickerSettings
from tests.helpers import cli_in_process, entries
from tests.test_ingest_support import Server

pytestmark = pytest.mark.timeout(120)


class PollTick(Tick, frozen=True, kw_only=True, tag="tick.test_poll"):
    """An entity's tick on a topic of its own."""

    topic: ClassVar[str] = "entity-ticks"


class NotATick(Event, frozen=True, kw_only=True, tag="test.not_a_tick"):
    pass


@pytest.fixture
def tick_codec() -> Codec[Any]:
    return Codec(Registry([Tick, PollTick]))


def leader(client: aioredis.Redis, codec: Codec[Any], keys: Keys, node: str = "a") -> Ticker:
    return Ticker(
        (),
        client=client,
        producer=Producer(client, codec, keys),
        keys=keys,
        settings=TickerSettings(node=node, lease_ttl_ms=2000),
    )


async def polls(client: aioredis.Redis, keys: Keys, codec: Codec[Any]) -> list[PollTick]:
    return [codec.decode(f) for _, f in await entries(client, keys.stream("entity-ticks"))]


def ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


# ---------------------------------------------------------------------- the store


async def test_add_is_an_idempotent_upsert_and_remove_forgets(
    client: aioredis.Redis, keys: Keys
) -> None:
    s = Scheduler(client, keys)
    assert await s.add("worker.w1", every="5 min", event=PollTick, key="w1")
    first = await s.get("worker.w1")
    assert first is not None
    assert first.key == "w1"
    assert first.event == "tick.test_poll"
    assert first.next_at is not None
    assert first.next_at > datetime.now(UTC)
    # Spread: the offset is a hash of the name, the same in every process.
    assert (ms(first.next_at) % 300_000) == (ms(first.next_at) % 300_000)
    await client.zadd(keys.ticker_due(), {"worker.w1": 1})  # overdue (being fired, say)
    assert not await s.add("worker.w1", every=300, event=PollTick, key="w1")  # same definition
    assert (await client.zscore(keys.ticker_due(), "worker.w1")) == 1  # next time kept
    assert await s.add("worker.w1", every="1 min", event=PollTick, key="w1")  # changed
    changed = await s.get("worker.w1")
    assert changed is not None
    assert changed.trigger.startswith("every 60s")
    assert changed.next_at is not None
    assert changed.next_at > datetime.now(UTC)
    assert await s.count() == 1
    assert await s.remove("worker.w1")
    assert not await s.remove("worker.w1")
    assert await s.get("worker.w1") is None
    assert await s.count() == 0


async def test_spread_puts_entities_all_over_the_interval(
    client: aioredis.Redis, keys: Keys
) -> None:
    s = Scheduler(client, keys)
    for i in range(200):
        await s.add(f"e.{i}", every=60, event=PollTick)
    raw: Any = await client.zrange(keys.ticker_due(), 0, -1, withscores=True)
    seconds = {int(score / 1000) % 60 for _, score in raw}
    assert len(seconds) > 40  # 200 names over 60 one-second buckets, not all at :00
    await s.add("aligned", every=60, event=PollTick, spread=False)
    aligned = await s.get("aligned")
    assert aligned is not None
    assert aligned.next_at is not None
    assert ms(aligned.next_at) % 60_000 == 0


async def test_list_pages_through_every_schedule(client: aioredis.Redis, keys: Keys) -> None:
    s = Scheduler(client, keys)
    for i in range(250):
        await s.add(f"worker.{i:03}", every=60, event=PollTick)
    await s.add("other.x", cron="Mon 09:00", tz="Europe/Berlin", event=PollTick)
    seen: list[str] = []
    cursor = 0
    while True:
        page, cursor = await s.list(prefix="worker.", limit=100, cursor=cursor)
        seen += [i.name for i in page]
        if not cursor:
            break
    assert sorted(seen) == [f"worker.{i:03}" for i in range(250)]
    (berlin,), _ = await s.list(prefix="other.")
    assert berlin.trigger == "cron '0 9 * * 1' Europe/Berlin"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": ""}, "schedule name ''"),
        ({"name": "x" * 129}, "schedule name"),
        ({"name": "a b"}, "schedule name 'a b'"),
        ({"name": "{tag}"}, "schedule name"),
        ({"every": None}, "every / cron: give exactly one"),
        ({"cron": "0 9 * * 1"}, "every / cron: give exactly one"),
        ({"every": "soon"}, "bad interval 'soon'"),
        ({"every": 0.001}, "interval must be >= 10 ms"),
        ({"every": 10**9}, "every: at most 366 days"),
        ({"every": None, "cron": "61 * * * *"}, "invalid cron expression"),
        ({"every": None, "cron": "0 9 * * 1", "tz": "Mars/Olympus"}, "unknown time zone"),
        ({"event": NotATick}, "is not a Tick subclass"),
        ({"event": "tick.test_poll"}, "is not a Tick subclass"),
        ({"key": "k" * 10_000}, "key: at most 256"),
        ({"missed": "never"}, "missed: 'never'"),
        ({"catch_up_max": 0}, "catch_up_max: 1 to 1000"),
        ({"grace_s": -1}, "grace_s: 0 to 86400"),
    ],
)
async def test_bad_definitions_are_refused_with_the_field(
    client: aioredis.Redis, keys: Keys, kwargs: dict[str, Any], message: str
) -> None:
    args: dict[str, Any] = {"name": "ok", "every": 60, "event": PollTick, **kwargs}
    name = args.pop("name")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        await Scheduler(client, keys).add(name, **args)
    assert await client.exists(keys.ticker_defs(), keys.ticker_due()) == 0


# ---------------------------------------------------------------------- firing


async def test_the_leader_fires_a_due_schedule_once_and_moves_it_on(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    s = Scheduler(client, keys)
    await s.add("worker.w1", every=10, event=PollTick, key="w1")
    info = await s.get("worker.w1")
    assert info is not None
    assert info.next_at is not None
    due = info.next_at
    t = leader(client, tick_codec, keys)
    assert await t.lease.acquire()
    assert await t.fire_runtime(due - timedelta(milliseconds=1)) == 0  # not yet
    assert await t.fire_runtime(due) == 1
    assert await t.fire_runtime(due) == 0  # moved on: the same time never fires twice
    (tick,) = await polls(client, keys, tick_codec)
    assert tick.id == tick_id("worker.w1", due)
    assert (tick.key, tick.schedule, tick.scheduled_for) == ("w1", "worker.w1", due)
    assert tick.fence == t.lease.fence
    assert tick.source == "ticker:a"
    assert not tick.catch_up
    after = await s.get("worker.w1")
    assert after is not None
    assert after.next_at == due + timedelta(seconds=10)
    # The static table's stream is untouched: these ticks have their own topic.
    assert await client.exists(keys.stream("ticks")) == 0


@pytest.mark.parametrize(("policy", "fired"), [("latest", 1), ("catch_up", 5), ("skip", 0)])
async def test_missed_policies_after_downtime(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any], policy: Any, fired: int
) -> None:
    """Due 10 s ago, every 2 s: times t0, t0+2 … t0+10 passed (6)."""
    s = Scheduler(client, keys)
    await s.add("e.1", every=2, event=PollTick, missed=policy, catch_up_max=5, grace_s=1,
                spread=False)  # fmt: skip
    now = datetime.now(UTC).replace(microsecond=0)
    now -= timedelta(seconds=now.second % 2)
    t0 = now - timedelta(seconds=10)
    await client.zadd(keys.ticker_due(), {"e.1": ms(t0)})
    t = leader(client, tick_codec, keys)
    assert await t.lease.acquire()
    later = now + timedelta(seconds=1.5)  # the latest (now) is 1.5 s late: past skip's grace
    assert await t.fire_runtime(later) == fired
    got = await polls(client, keys, tick_codec)
    if fired:
        assert got[-1].scheduled_for == now
        assert got[-1].missed == 6 - fired
        assert [g.scheduled_for for g in got] == [now - timedelta(seconds=2 * i)
                                                 for i in reversed(range(fired))]  # fmt: skip
    assert t.stats.skipped == 6 - fired
    assert (await client.zscore(keys.ticker_due(), "e.1")) == ms(now) + 2000


async def test_a_stale_leader_is_fenced_off_and_writes_nothing(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    await Scheduler(client, keys).add("e.1", every=1, event=PollTick)
    a = leader(client, tick_codec, keys, "a")
    assert await a.lease.acquire()
    await client.delete(keys.ticker_lease())  # a's lease ran out while it was paused
    b = leader(client, tick_codec, keys, "b")
    assert await b.lease.acquire()
    assert await a.fire_runtime(datetime.now(UTC) + timedelta(seconds=2)) == 0
    assert not a.lease.held()  # it stepped down
    assert await polls(client, keys, tick_codec) == []
    assert await b.fire_runtime(datetime.now(UTC) + timedelta(seconds=2)) == 1


async def test_a_schedule_changed_or_removed_mid_step_is_left_alone(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    """Between the read and the fire script another process moved the score: no tick."""
    s = Scheduler(client, keys)
    await s.add("e.changed", every=1, event=PollTick)
    await s.add("e.removed", every=1, event=PollTick)
    t = leader(client, tick_codec, keys)
    assert await t.lease.acquire()
    assert t.runtime is not None
    real_fire = t.runtime._fire

    async def meddle(raw: Any, now: datetime, out: Any) -> bool:
        # Only the key changes: the next time is the same, the definition is not.
        await s.add("e.changed", every=1, event=PollTick, key="new-key")
        await s.remove("e.removed")
        return await real_fire(raw, now, out)

    t.runtime._fire = meddle  # type: ignore[method-assign]
    assert await t.fire_runtime(datetime.now(UTC) + timedelta(seconds=2)) == 0
    assert await polls(client, keys, tick_codec) == []
    changed = await s.get("e.changed")
    assert changed is not None
    assert changed.key == "new-key"
    assert await s.get("e.removed") is None
    assert await client.zscore(keys.ticker_due(), "e.removed") is None  # not re-added


async def test_an_unknown_tick_type_is_moved_aside_and_the_others_fire(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    s = Scheduler(client, keys)
    await s.add("e.good", every=1, event=PollTick)
    await s.add("e.gone", every=1, event=PollTick)
    await client.hset(keys.ticker_defs(), "e.gone", b'["tick.removed_type","",1000]')
    await client.hset(keys.ticker_defs(), "e.garbage", b"\xff not json")
    await client.zadd(keys.ticker_due(), {"e.garbage": 1})
    t = leader(client, tick_codec, keys)
    assert await t.lease.acquire()
    now = datetime.now(UTC) + timedelta(seconds=2)
    assert await t.fire_runtime(now) == 1
    assert [p.schedule for p in await polls(client, keys, tick_codec)] == ["e.good"]
    for name in ("e.gone", "e.garbage"):  # a day on: they no longer come up every step
        score: Any = await client.zscore(keys.ticker_due(), name)
        assert score > ms(now) + 3600_000
    garbage = await s.get("e.garbage")
    assert garbage is not None
    assert garbage.trigger == "(unreadable)"


async def test_a_step_reads_only_what_is_due(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    """10,000 schedules, 3 due: the step claims 3 (O(due), not O(all))."""
    s = Scheduler(client, keys)
    for i in range(3):
        await s.add(f"due.{i}", every=3600, event=PollTick)
    far = ms(datetime.now(UTC)) + 3_000_000
    defs = await client.hget(keys.ticker_defs(), "due.0")
    async with client.pipeline(transaction=False) as p:
        for i in range(10_000):
            p.hset(keys.ticker_defs(), f"later.{i}", defs or b"")
            p.zadd(keys.ticker_due(), {f"later.{i}": far + i})
        await p.execute()
    await client.zadd(keys.ticker_due(), {f"due.{i}": 1000 + i for i in range(3)})
    t = leader(client, tick_codec, keys)
    assert await t.lease.acquire()
    assert t.runtime is not None
    result = await t.runtime.fire_due(datetime.now(UTC))
    assert (result.due, result.fired) == (3, 3)


async def test_batches_drain_a_large_backlog_in_one_step(
    client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]
) -> None:
    s = Scheduler(client, keys)
    for i in range(1_200):
        await s.add(f"e.{i}", every=3600, event=PollTick, key=str(i))
    await client.zadd(keys.ticker_due(), {f"e.{i}": 1000 for i in range(1_200)})
    t = Ticker(
        (),
        client=client,
        producer=Producer(client, tick_codec, keys),
        keys=keys,
        settings=TickerSettings(node="a", lease_ttl_ms=5000, runtime_batch=500),
    )
    assert await t.lease.acquire()
    assert await t.fire_runtime() == 1_200
    assert len({p.key for p in await polls(client, keys, tick_codec)}) == 1_200


# ---------------------------------------------------------------------- real processes

APP_MODULE = """
from typing import ClassVar

from streamproc.app import App
from streamproc.codec import Registry
from streamproc.schedule import Tick


class PollTick(Tick, frozen=True, kw_only=True, tag="tick.test_poll"):
    topic: ClassVar[str] = "entity-ticks"


app = App(registry=Registry([Tick, PollTick]))
"""


def start_ticker(
    node: str, redis_url: str, keys: Keys, repo_root: Path, tmp_path: Path
) -> subprocess.Popen[bytes]:
    (tmp_path / "entity_ticker_app.py").write_text(textwrap.dedent(APP_MODULE))
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "STREAMPROC_PREFIX": keys.prefix,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), str(repo_root)]),
        "STREAMPROC_LOG_JSON": "1",
    }
    cmd = [sys.executable, "-m", "streamproc", "--app", "entity_ticker_app:app", "ticker",
           "--node", node, "--lease-ttl-ms", "1000"]  # fmt: skip
    with (tmp_path / f"{node}.log").open("ab") as log:
        return subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def wait_until(cond: Any, timeout_s: float = 90.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if got := await cond():
            return got
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


@pytest.mark.slow
@pytest.mark.serial  # SIGKILL and lease failover of processes: not beside other workers
@pytest.mark.timeout(400)  # process starts are slow on a loaded 2-core machine
async def test_sigkilled_leaders_and_a_full_restart_fire_every_scheduled_time_once(
    redis_url: str,
    client: aioredis.Redis,
    keys: Keys,
    tick_codec: Codec[Any],
    repo_root: Path,
    tmp_path: Path,
) -> None:
    """1,000 entity schedules every second (catch-up): kill the leader twice, then stop every
    ticker and start a new one. Each schedule's times are contiguous and none is twice."""
    s = Scheduler(client, keys)
    for i in range(1_000):
        await s.add(f"entity.{i}", every=1, event=PollTick, key=str(i), missed="catch_up",
                    catch_up_max=1000)  # fmt: skip
    stream = keys.stream("entity-ticks")
    procs = {n: start_ticker(n, redis_url, keys, repo_root, tmp_path) for n in ("n0", "n1", "n2")}
    killed: list[str] = []

    async def length() -> int:
        return int(await client.xlen(stream))

    async def leader_node() -> str | None:
        raw: Any = await client.get(keys.ticker_lease())
        node = raw.decode().split("/")[0] if raw else None
        return node if node and node not in killed else None

    try:
        for _ in range(2):
            node = await wait_until(leader_node)
            start = await length()
            await wait_until(lambda s0=start: _more(length, s0 + 2_000))
            procs[node].send_signal(signal.SIGKILL)
            procs[node].wait()
            killed.append(node)
        await wait_until(leader_node)
        start = await length()
        await wait_until(lambda: _more(length, start + 2_000))
        for p in procs.values():  # a restart of every process
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = {n: p.wait(timeout=15) for n, p in procs.items()}
        assert all(codes[n] == 0 for n in procs if n not in killed), codes
        await asyncio.sleep(2.5)  # nobody fires: two seconds are missed by everyone
        assert await s.count() == 1_000  # the schedules outlive every process
        before = await length()
        procs["n3"] = start_ticker("n3", redis_url, keys, repo_root, tmp_path)
        await wait_until(lambda: _more(length, before + 4_000))
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=15)
    times: dict[str, list[datetime]] = defaultdict(list)
    sources: set[str] = set()
    for tick in await polls(client, keys, tick_codec):
        times[tick.schedule].append(tick.scheduled_for)
        sources.add(tick.source)
    assert len(times) == 1_000
    for name, ts in times.items():
        assert len(set(ts)) == len(ts), f"{name}: a scheduled time fired twice"
        assert ts == sorted(ts), name
        gaps = {(b - a).total_seconds() for a, b in itertools.pairwise(ts)}
        assert gaps == {1.0}, f"{name}: a scheduled time is missing ({sorted(gaps)})"
    assert {f"ticker:{n}" for n in (*killed, "n3")} <= sources


async def _more(length: Any, target: int) -> bool:
    return bool(await length() >= target)


# ---------------------------------------------------------------------- operator API and CLI


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, tick_codec: Codec[Any]) -> AsyncIterator[Server]:
    ingest = Ingest(
        client=client,
        registry=tick_codec.registry,
        keys=keys,
        producer=Producer(client, tick_codec, keys),
        settings=IngestSettings(auth_cache_s=0.0, max_body_bytes=16 * 1024),
    )
    server = TestServer(create_app(ingest), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()


async def test_api_puts_lists_gets_and_deletes(srv: Server) -> None:
    op = await srv.token("op", (), operator=True)
    path = "/v1/schedules/worker.w1"
    body = {"event": "tick.test_poll", "every": "5 min", "key": "w1"}
    status, out, _ = await srv.post(path, body, token=op, method="PUT")
    assert status == 201, out
    assert out["changed"] is True
    assert out["schedule"]["key"] == "w1"
    assert out["schedule"]["next_at"]
    status, out, _ = await srv.post(path, body, token=op, method="PUT")
    assert (status, out["changed"]) == (200, False)
    status, out, _ = await srv.post(path, {**body, "every": 60}, token=op, method="PUT")
    assert (status, out["changed"]) == (200, True)
    assert out["schedule"]["trigger"].startswith("every 60s")
    status, out, _ = await srv.post("/v1/schedules?prefix=worker.", token=op, method="GET")
    assert status == 200
    assert [s["name"] for s in out["schedules"]] == ["worker.w1"]
    assert (out["cursor"], out["total"]) == (0, 1)
    status, out, _ = await srv.post(path, token=op, method="GET")
    assert (status, out["schedule"]["event"]) == (200, "tick.test_poll")
    assert (await srv.post(path, token=op, method="DELETE"))[0] == 204
    assert (await srv.post(path, token=op, method="DELETE"))[0] == 404
    assert (await srv.post(path, token=op, method="GET"))[0] == 404


@pytest.mark.parametrize(
    ("body", "path", "reason"),
    [
        ({"every": 60}, "$", "missing required field `event`"),
        ({"event": "tick.nope", "every": 60}, "$.event", "not a tick type"),
        ({"event": "test.not_a_tick", "every": 60}, "$.event", "not a tick type"),
        ({"event": "tick.test_poll"}, "$", "give exactly one of them"),
        ({"event": "tick.test_poll", "every": 60, "cron": "* * * * *"}, "$", "exactly one"),
        ({"event": "tick.test_poll", "every": "x" * 33}, "$.every", "length <= 32"),
        ({"event": "tick.test_poll", "every": "soon"}, "$.every", "bad interval"),
        ({"event": "tick.test_poll", "every": -5}, "$.every", "interval must be >= 10 ms"),
        ({"event": "tick.test_poll", "cron": "99 * * * *"}, "$.cron", "invalid cron"),
        ({"event": "tick.test_poll", "cron": "0 9 * * 1", "tz": "No/Where"}, "$.tz", "time zone"),
        ({"event": "tick.test_poll", "every": 60, "key": "k" * 257}, "$.key", "length <= 256"),
        ({"event": "tick.test_poll", "every": 60, "missed": "never"}, "$.missed", "Invalid enum"),
        ({"event": "tick.test_poll", "every": 60, "grace_s": 1e9}, "$.grace_s", "<= 86400"),
        ({"event": "tick.test_poll", "every": 60, "owner": "x"}, "$", "unknown field"),
        ([1, 2], "$", "Expected `object`"),
    ],
)
async def test_api_refuses_broken_definitions_naming_the_field(
    srv: Server, body: Any, path: str, reason: str
) -> None:
    op = await srv.token("op", (), operator=True)
    status, out, _ = await srv.post("/v1/schedules/e.1", body, token=op, method="PUT")
    assert status == 400, out
    assert out["path"] == path
    assert reason in out["detail"]
    assert await srv.ingest.schedules.scheduler.count() == 0


async def test_api_refuses_hostile_requests(srv: Server) -> None:
    op = await srv.token("op", (), operator=True)
    agent = await srv.token("agent", ("*",))
    body = {"event": "tick.test_poll", "every": 60}
    assert (await srv.post("/v1/schedules/e.1", body, method="PUT"))[0] == 401
    assert (await srv.post("/v1/schedules/e.1", body, token=agent, method="PUT"))[0] == 403
    assert (await srv.post("/v1/schedules", token=agent, method="GET"))[0] == 403
    assert (await srv.post("/v1/schedules/e.1", token=agent, method="DELETE"))[0] == 403
    status, out, _ = await srv.post("/v1/schedules/a%20b", body, token=op, method="PUT")
    assert (status, out.get("path")) == (400, "name"), out
    assert (await srv.post("/v1/schedules/%7Bx%7D", body, token=op, method="PUT"))[0] == 404
    huge = {"event": "tick.test_poll", "every": 60, "key": "k" * 100_000}
    assert (await srv.post("/v1/schedules/e.1", huge, token=op, method="PUT"))[0] == 413
    status, out, _ = await srv.post(
        "/v1/schedules/e.1", data=b"{oops", token=op, method="PUT",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    assert (status, out["error"]) == (400, "malformed")
    for query in ("limit=0", "limit=5000", "limit=x", "cursor=-1", "prefix=a%20b"):
        status, out, _ = await srv.post(f"/v1/schedules?{query}", token=op, method="GET")
        assert status == 400, (query, out)
    assert await srv.ingest.schedules.scheduler.count() == 0


def test_cli_adds_lists_shows_and_removes(
    redis_url: str, keys: Keys, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """In-process (``streamproc.cli.main``) with the repository's application."""
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}

    def main(argv: list[str]) -> tuple[int, str, str]:
        run = cli_in_process(monkeypatch, capsys, env, *argv)
        return run.returncode, run.stdout, run.stderr

    add = ["schedules", "add", "probe.1", "--event", "tick.discovery", "--every", "30s"]
    code, out, _ = main(add)
    assert (code, "set probe.1: next " in out) == (0, True)
    code, out, _ = main(add)
    assert (code, "unchanged probe.1" in out) == (0, True)
    code, out, _ = main(["schedules", "list", "--prefix", "probe."])
    assert code == 0
    assert "probe.1" in out
    assert "1 of 1 runtime schedule(s)" in out
    code, out, _ = main(["schedules", "show", "probe.1"])
    assert (code, '"event": "tick.discovery"' in out) == (0, True)
    assert main(["schedules", "remove", "probe.1"])[0] == 0
    code, _, err = main(["schedules", "remove", "probe.1"])
    assert (code, "no runtime schedule 'probe.1'" in err) == (1, True)
    bad = [
        (["schedules", "add", "a b", "--event", "tick.discovery", "--every", "1m"], "a b"),
        (["schedules", "add", "x", "--event", "cluster.oom_killed", "--every", "1m"],
         "not a tick type"),
        (["schedules", "add", "x", "--event", "tick.discovery"], "exactly one of --every"),
        (["schedules", "add", "x", "--event", "tick.discovery", "--every", "1 fortnight"],
         "bad interval"),
        (["schedules", "add", "x", "--event", "tick.discovery", "--cron", "Mon 25:00"],
         "bad time"),
        (["schedules", "show", "x" * 200], "schedule name"),
        (["schedules", "list", "--limit", "0"], "limit: 1 to 1000"),
    ]  # fmt: skip
    for argv, message in bad:
        code, _, err = main(argv)
        assert code == 2, argv
        assert message in err, argv
