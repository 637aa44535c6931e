"""Every role of the application as a process on the local Redis Cluster (issue 18, "done
when"): ``streamproc agents add``, ``streamproc consume --all`` and ``streamproc ticker`` with
``REDIS_URL=redis+cluster://…`` and ``STREAMPROC_PARTITIONS=cluster=3``. Cluster events (from
an agent, as the ingest stamps them) are handled: their follow-ups on the notify stream, their
per-cluster marks in their partition's slot, the day's figures once; agent metrics add the
day's figures from another slot; ticks fire and the hibernation concern handles them; no dead
letter and no CROSSSLOT in any role's log.

``streamproc ingest`` and ``notify-fanout`` run on the cluster too: every feed key shares the
``{feed}`` tag (one blocking XREAD serves them all), and the fanout appends to the feed at once
there (effects stay in the event's slot).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import orjson
import pytest
import redis.asyncio as aioredis

from consumers.cluster_events import interrupted_key, not_ready_key
from notifications.feed_keys import feed_key
from schemas import (
    REGISTRY,
    NodeNotReady,
    Notification,
    OOMKilled,
    PodPending,
    PodPendingClassified,
    RightSizingRecommendation,
    SpotInterruption,
)
from schemas.metrics import (
    ClusterMetrics,
    MetricSample,
    cluster_daily_key,
    daily_key,
    day_of,
    pool_interruptions_key,
)
from spot.hibernation_store import HibernationKeys
from streamproc import Codec, Keys, Producer
from streamproc.embedded import free_port
from streamproc.groups import group_infos

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = [f"c{i}" for i in range(6)]
#: What no role's log may contain.
BAD = ("CROSSSLOT", "effect_failed", "Traceback", '"event": "dead_lettered"')


class Roles:
    """The role processes, each logging to its own file."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        self.env, self.tmp = env, tmp
        self.procs: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, *args: str) -> asyncio.subprocess.Process:
        log = (self.tmp / f"{name}.log").open("wb")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streamproc", *args, cwd=ROOT, env=self.env,
                stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.procs)

    def exited(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.returncode is not None]

    async def stop(self) -> dict[str, int | None]:
        for p in self.procs.values():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                await asyncio.wait_for(p.wait(), 30)
            except TimeoutError:
                p.kill()
                await p.wait()
        return {n: p.returncode for n, p in self.procs.items()}


@pytest.fixture
async def roles(redis_cluster_url: str, cluster_keys: Keys, tmp_path: Path) -> AsyncIterator[Roles]:
    env = {
        **os.environ,
        "REDIS_URL": redis_cluster_url,
        "STREAMPROC_PREFIX": cluster_keys.prefix,
        "STREAMPROC_PARTITIONS": "cluster=3",
        "STREAMPROC_LOG_LEVEL": "info",
        "STREAMPROC_CONSUMER": "roles-1",
    }
    r = Roles(env, tmp_path)
    try:
        yield r
    finally:
        await r.stop()


def events(source: str) -> list[Any]:
    """Per cluster: a spot interruption of node n-1, an OOM kill and a pending pod."""
    out: list[Any] = []
    for c in CLUSTERS:
        out += [
            SpotInterruption(cluster_id=c, source=source, instance_id=f"i-{c}",
                             instance_type="m5.large", availability_zone="eu-west-1a",
                             node_name="n-1"),
            OOMKilled(cluster_id=c, source=source, namespace="ns", pod="p", container="app",
                      memory_limit_bytes=1 << 28),
            PodPending(cluster_id=c, source=source, namespace="ns", pod="q",
                       message="0/3 nodes: Insufficient cpu"),
        ]  # fmt: skip
    return out


def body(event: Any) -> dict[str, Any]:
    """The JSON an agent posts for ``event``."""
    out: dict[str, Any] = msgspec.to_builtins(event)
    out.pop("source", None)
    return {**out, "type": event.type_name()}


async def notify_entries(client: aioredis.Redis, keys: Keys) -> list[Any]:
    codec = Codec(REGISTRY)
    rows: Any = await client.xrange(keys.stream("notify"))
    return [codec.decode(f) for _, f in rows]


async def add_agent(roles: Roles) -> str:
    """``streamproc agents add`` on the cluster; its token."""
    add = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", "agents", "add", "roles-agent",
        "--types", "cluster.*", "--clusters", "*",
        cwd=ROOT, env=roles.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(add.communicate(), 60)
    assert add.returncode == 0, err.decode(errors="replace")
    return out.decode().splitlines()[0].strip()


async def cli(roles: Roles, *args: str) -> tuple[int | None, str]:
    """A one-shot ``streamproc`` command on the cluster: its exit code and output."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streamproc", *args, cwd=ROOT, env=roles.env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode(errors="replace")


async def wait_for_causes(
    roles: Roles, client: aioredis.Redis, keys: Keys, causes: set[str], tick_key: str = ""
) -> list[Any]:
    """The notify stream once every id of ``causes`` has a follow-up there (and the tick key
    is set), or a role exited, or ~60 s passed."""
    notes: list[Any] = []
    for _ in range(600):
        notes = await notify_entries(client, keys)
        ticked = not tick_key or await client.get(tick_key)
        if (causes <= {getattr(n, "cause_id", "") for n in notes} and ticked) or roles.exited():
            break
        await asyncio.sleep(0.1)
    assert causes <= {getattr(n, "cause_id", "") for n in notes}, roles.logs()
    return notes


async def settled(
    client: aioredis.Redis, keys: Keys, group: str, topics: set[str], *, rounds: int = 600
) -> None:
    """Until ``group`` has no lag and nothing pending on any of ``topics`` (polled)."""
    for _ in range(rounds):
        rows = [g for t in topics for g in await group_infos(client, keys.stream(t))]
        mine = [g for g in rows if g.name == group]
        if mine and all(not g.pending and not g.lag for g in mine):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{group} did not settle on {sorted(topics)}")


@pytest.mark.timeout(120)
async def test_consumers_and_ticker_run_on_the_cluster_with_partitions(
    roles: Roles, cluster_client: aioredis.Redis, cluster_keys: Keys
) -> None:
    keys = Keys(cluster_keys.prefix, partitions={"cluster": 3})
    await add_agent(roles)  # the tenancy check reads the agent's record on the cluster
    await roles.start("consume", "consume", "--all")
    await roles.start(
        "ticker", "ticker", "--schedules", "tests.cluster_roles_support:SCHEDULES",
        "--node", "roles-ticker",
    )  # fmt: skip
    producer = Producer(cluster_client, Codec(REGISTRY), keys)
    first = events("roles-agent")
    await producer.publish_many(first)
    sample = MetricSample(at=datetime.now(UTC), nodes=3)  # the metrics concern's figures
    await producer.publish(ClusterMetrics(cluster_id="c0", source="roles-agent", samples=[sample]))
    # NotReady of n-1 once its interruption was handled (its mark set); n-2 unexplained.
    await wait_for_causes(
        roles, cluster_client, keys, {e.id for e in first if isinstance(e, SpotInterruption)}
    )
    second = [
        NodeNotReady(cluster_id=c, source="roles-agent", node_name=n, reason="kubelet stopped")
        for c in CLUSTERS
        for n in ("n-1", "n-2")
    ]
    await producer.publish_many(second)

    # Every follow-up: 6 spot notifications, 6 recommendations, 6 classified pods, and a
    # critical notification for each unexplained NotReady (n-2) only.
    hk = HibernationKeys(keys)
    want = {e.id for e in first} | {e.id for e in second if e.node_name == "n-2"}
    notes = await wait_for_causes(roles, cluster_client, keys, want, hk.last_tick)
    assert sum(isinstance(n, RightSizingRecommendation) for n in notes) == len(CLUSTERS)
    assert sum(isinstance(n, PodPendingClassified) for n in notes) == len(CLUSTERS)
    critical = [n for n in notes if isinstance(n, Notification) and n.severity == "critical"]
    assert sorted(n.title for n in critical) == ["Node n-2 not ready"] * len(CLUSTERS)
    # The ticker fired on the cluster and the hibernation concern handled a tick.
    assert await cluster_client.get(hk.last_tick), roles.logs()

    # State where the design puts it: marks in the cluster's partition's slot, figures once.
    # A handler publishes its follow-ups before its settle applies its effects: wait for the
    # group to have nothing read and unsettled (it raced the assertions under load).
    await settled(
        cluster_client, keys, "cluster-events", {keys.partition("cluster", c, "") for c in CLUSTERS}
    )
    for c in CLUSTERS:
        part = keys.partition("cluster", c, "")
        assert await cluster_client.get(interrupted_key(keys, part, c, "n-1"))
        assert await cluster_client.get(not_ready_key(keys, part, c, "n-1")) == b"interruption"
        assert await cluster_client.get(not_ready_key(keys, part, c, "n-2")) == b"unexpected"
    day = day_of(datetime.now(UTC))
    figures: Any = await cluster_client.hgetall(daily_key(keys, day))
    assert figures[b"spot_interruptions"] == figures[b"oom_kills"] == str(len(CLUSTERS)).encode()
    for c in CLUSTERS:
        mine: Any = await cluster_client.hgetall(cluster_daily_key(keys, c, day))
        assert (mine[b"spot_interruptions"], mine[b"oom_kills"]) == (b"1", b"1")
    pools: Any = await cluster_client.hgetall(pool_interruptions_key(keys, day))
    assert pools == {b"m5.large/eu-west-1a": str(len(CLUSTERS)).encode()}
    for _ in range(100):  # the agent's metrics (another topic, another slot) add theirs
        if await cluster_client.hget(daily_key(keys, day), "agent_samples") or roles.exited():
            break
        await asyncio.sleep(0.1)
    assert await cluster_client.hget(daily_key(keys, day), "agent_samples") == b"1"
    assert await cluster_client.hget(cluster_daily_key(keys, "c0", day), "nodes_sum") == b"3"
    assert await cluster_client.xlen(keys.dlq("metrics", "metrics")) == 0
    assert len({keys.partition("cluster", c, "") for c in CLUSTERS}) > 1  # spread over them

    # The operator's tools read the cluster (every partition) while the roles run.
    for args in (("inspect",), ("check", "--all"), ("dlq", "list", "cluster-events")):
        code, text = await cli(roles, *args)
        assert code == 0, f"{args}: {text[-3000:]}"
        assert not [b for b in BAD if b in text], f"{args}: {text[-3000:]}"

    # No dead letter in any partition, nor of the ticks; no role exited; clean logs.
    for part in keys.partitions_of("cluster"):
        assert await cluster_client.xlen(keys.dlq(part, "cluster-events")) == 0, roles.logs()
    assert await cluster_client.xlen(keys.dlq("ticks", "hibernation")) == 0, roles.logs()
    assert roles.exited() == [], roles.logs()
    codes = await roles.stop()
    assert codes == {"consume": 0, "ticker": 0}, roles.logs()
    for name in roles.procs:
        lines = roles.log(name).splitlines()
        for bad in BAD:
            found = [ln for ln in lines if bad in ln]
            assert not found, f"{name}: {bad}\n" + "\n".join(found[:5])[-4000:]


@pytest.mark.timeout(90)
async def test_notify_fanout_runs_on_the_cluster(
    roles: Roles, cluster_client: aioredis.Redis, cluster_keys: Keys
) -> None:
    """``streamproc consume notify-fanout`` on the cluster handles a notification without a
    dead letter."""
    await roles.start("consume", "consume", "notify-fanout")
    producer = Producer(cluster_client, Codec(REGISTRY), cluster_keys)
    note = Notification(cluster_id="c1", severity="warning", title="t", body="b", cause_id="x")
    await producer.publish(note)
    stream = cluster_keys.stream("notify")
    for _ in range(600):
        groups: Any = await cluster_client.xinfo_groups(stream)
        done = [g for g in groups if g["name"] == b"notify-fanout" and g["lag"] == 0]
        if (done and done[0]["pending"] == 0) or roles.exited():
            break
        await asyncio.sleep(0.1)
    assert done, roles.logs()
    assert done[0]["pending"] == 0
    assert await cluster_client.xlen(cluster_keys.dlq("notify", "notify-fanout")) == 0
    # the cluster's live feed got it, in the {feed} slot
    feed: Any = await cluster_client.xrange(feed_key(cluster_keys, "c1"))
    [(_, fields)] = feed
    assert fields[b"type"] == b"notify.notification"


@pytest.mark.timeout(60)
async def test_ingest_serves_the_cluster(
    roles: Roles, cluster_client: aioredis.Redis, cluster_keys: Keys
) -> None:
    """``streamproc ingest`` on the cluster: a 202 for events posted by an agent, stored in the
    partition of their cluster."""
    keys = Keys(cluster_keys.prefix, partitions={"cluster": 3})
    token = await add_agent(roles)
    port = free_port()
    ingest = await roles.start("ingest", "ingest", "--port", str(port))
    url = f"http://127.0.0.1:{port}"
    sent = events("")
    async with aiohttp.ClientSession() as session:
        while ingest.returncode is None:
            try:
                async with session.get(url + "/healthz") as r:
                    if r.status == 200:
                        break
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
        assert ingest.returncode is None, roles.log("ingest")[-3000:]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        data = orjson.dumps([body(e) for e in sent])
        async with session.post(url + "/v1/events", data=data, headers=headers) as r:
            assert r.status == 202, await r.text()
    for c in CLUSTERS:
        rows: Any = await cluster_client.xrange(keys.stream(keys.partition("cluster", c, "")))
        assert len(rows) >= 3


async def test_the_applications_scripts_and_multis_run_on_the_cluster(
    cluster_client: aioredis.Redis, cluster_keys: Keys
) -> None:
    """Each script or MULTI of the application that touches several keys, on the cluster
    (CROSSSLOT otherwise): the day's figures once per mark, discovery's fenced write, and the
    keys of the QA and hibernation MULTIs in one slot each."""
    from redis.crc import key_slot

    from qa import _keys as qa_keys
    from schemas.metrics import add_figures
    from spot import _inventory as inv

    keys = cluster_keys
    for _ in range(2):  # the same mark twice: counted once
        await add_figures(
            cluster_client, keys, day="2026-12-01", mark="ev-1", everyone={"oom_kills": 1},
            cluster=("c1", {"oom_kills": 1}), pools={"m5.large/eu-west-1a": 1},
        )  # fmt: skip
    assert await cluster_client.hgetall(daily_key(keys, "2026-12-01")) == {b"oom_kills": b"1"}
    pools: Any = await cluster_client.hgetall(pool_interruptions_key(keys, "2026-12-01"))
    assert pools == {b"m5.large/eu-west-1a": b"1"}

    diff = inv.Diff(upsert={"i-1": b"{}"})
    assert await inv.write(
        cluster_client, keys, account_id="111122223333", region="eu-west-1", token="t",
        ttl_ms=10_000, instances=diff, clusters=inv.Diff(),
    )  # fmt: skip
    ikey, _ = inv.inventory_keys(keys, "111122223333", "eu-west-1")
    assert await cluster_client.hget(ikey, "i-1") == b"{}"

    together = [
        [qa_keys.session(keys, "s"), qa_keys.sessions(keys), qa_keys.screenshots(keys, "s")],
        [qa_keys.screenshots(keys, "s"), qa_keys.staged_png(keys, "x")],
        [getattr(HibernationKeys(keys), a) for a in ("schedules", "version", "asleep", "audit")]
        + [HibernationKeys(keys).last_tick, keys.stream("ticks")],
    ]
    for group in together:
        assert len({key_slot(k.encode()) for k in group}) == 1, group
