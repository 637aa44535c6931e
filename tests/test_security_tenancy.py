"""Tenancy (issue 17 item 3): an agent speaks only for its clusters, each finding reproduced as
an attacker would, over a real ingest on 127.0.0.1 and a real Redis.

- An agent posts events only about the clusters of its ``--clusters``, on every route that
  posts events (``POST /v1/events``, ``POST /clusters/{id}/events``): 403 ``forbidden_cluster``
  with the JSON path of the offending item, and nothing of the request is written.
- The cluster-event processor acts only for clusters the event's ``source`` may speak for:
  an event about another tenant's cluster (entered some other way, or posted before its
  agent's scope was narrowed) is acked and ignored, with a log line and a metric.
- A shared signal: one tenant's interruptions make a pool risky for its own clusters; for
  every cluster only once two distinct clusters *and* agents reported it (``schemas.risky_pools``).
- ``agents add --types 'cluster.*'`` without ``--clusters`` is refused; ``agents set-clusters``
  scopes an existing agent without a new token (the migration path).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import REGISTRY as METRICS
from structlog.testing import capture_logs

from consumers import cluster_events
from schemas import REGISTRY
from schemas.cluster import SpotInterruption
from spot.optimizer_pipeline import RISK_LIMIT, pool_risks
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.ingest import AgentStore
from streamproc.ingest.auth import Agent, hash_token
from tests.helpers import CliRun, cli_in_process, entries
from tests.test_ingest_support import Server, cluster_event, running_ingest

pytestmark = pytest.mark.timeout(60)

POOL = ("m5.large", "eu-west-1a")


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(client, keys, producer, rate_burst=1000) as s:
        yield s


@pytest.fixture
def processor(client: aioredis.Redis, keys: Keys, producer: Producer) -> Consumer:
    return Consumer(
        cluster_events.CONCERN,
        client=client,
        codec=Codec(REGISTRY),
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="t"),
    )


@pytest.fixture
def run_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], redis_url: str, keys: Keys
) -> Callable[..., CliRun]:
    env = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    return lambda *args: cli_in_process(monkeypatch, capsys, env, *args)


async def tenant(srv: Server, name: str, *clusters: str) -> str:
    """An agent posting cluster events for ``clusters`` only."""
    return await srv.token(name, ["cluster.*"], clusters=clusters)


async def run_all(consumer: Consumer) -> None:
    await consumer.ensure_groups()
    while await consumer.process_once():
        pass


def refused_count(type_name: str) -> float:
    value = METRICS.get_sample_value("streamproc_cluster_events_refused_total", {"type": type_name})
    return value or 0.0


# ---------------------------------------------------------------------------------- ingest


async def test_v1_events_refuses_an_event_about_another_tenants_cluster(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """Before: any agent with ``cluster.*`` posted for any cluster_id (202)."""
    a = await tenant(srv, "tenant-a", "a-*")
    status, body, _ = await srv.post("/v1/events", cluster_event(cluster_id="b-1"), token=a)
    assert status == 403, body
    assert (body["error"], body["path"]) == ("forbidden_cluster", "$.cluster_id")
    assert "'b-1'" in body["detail"]
    # A batch is all or nothing: the offending item is named, the good one not written.
    batch = [cluster_event(cluster_id="a-1"), cluster_event(cluster_id="b-1")]
    status, body, _ = await srv.post("/v1/events", batch, token=a)
    assert (status, body["error"], body["path"]) == (403, "forbidden_cluster", "$[1].cluster_id")
    assert await client.xlen(keys.stream("cluster")) == 0
    status, body, _ = await srv.post("/v1/events", cluster_event(cluster_id="a-1"), token=a)
    assert status == 202, body
    assert await client.xlen(keys.stream("cluster")) == 1


async def test_the_cluster_route_refuses_a_cluster_the_agent_does_not_speak_for(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """Before: ``POST /clusters/{id}/events`` took the path's cluster on trust."""
    a = await tenant(srv, "tenant-a", "a-1")
    body = cluster_event()
    del body["cluster_id"]
    status, answer, _ = await srv.post("/clusters/b-1/events", body, token=a)
    assert (status, answer["error"], answer["path"]) == (403, "forbidden_cluster", "$.cluster_id")
    status, answer, _ = await srv.post("/clusters/b-1/events", [body, body], token=a)
    assert (status, answer["path"]) == (403, "$[0].cluster_id")
    assert await client.xlen(keys.stream("cluster")) == 0
    status, answer, _ = await srv.post("/clusters/a-1/events", body, token=a)
    assert status == 202, answer


async def test_an_agent_without_clusters_posts_no_cluster_event_but_an_operator_may(
    srv: Server, client: aioredis.Redis, keys: Keys
) -> None:
    """No ``--clusters``: no cluster at all (the default is nothing, not everything). Events
    about no cluster (``worker.*``) need none; operators speak for every cluster."""
    bare = await srv.token("bare", ["*"], clusters=())
    status, body, _ = await srv.post("/v1/events", cluster_event(), token=bare)
    assert (status, body["error"]) == (403, "forbidden_cluster")
    worker = {"type": "worker.terminated", "worker_id": "w-1"}
    status, body, _ = await srv.post("/v1/events", worker, token=bare)
    assert status != 403, body
    op = await srv.token("ops", ["*"], operator=True, clusters=())
    status, body, _ = await srv.post("/v1/events", cluster_event(cluster_id="any"), token=op)
    assert status == 202, body


# ---------------------------------------------------------------------------------- consumer


async def test_the_processor_ignores_an_event_whose_source_may_not_speak_for_its_cluster(
    srv: Server,
    processor: Consumer,
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
) -> None:
    """An event about cluster b with source tenant-a (written to the stream directly, as by a
    route that forgot the check): acked, ignored, logged and counted; not dead-lettered."""
    await tenant(srv, "tenant-a", "a-1")
    forged = SpotInterruption(
        cluster_id="b-1",
        key="b-1",
        source="tenant-a",
        instance_id="i-1",
        instance_type=POOL[0],
        availability_zone=POOL[1],
    )
    await producer.publish(forged)
    before = refused_count("cluster.spot_interruption")
    with capture_logs() as logs:
        await run_all(processor)
    assert await client.zcard(keys.state("risky-pool-reports", *POOL)) == 0
    assert await client.exists(keys.state("risky-pool", *POOL)) == 0
    assert await client.xlen(keys.stream("notify")) == 0
    assert await client.xlen(keys.dlq("cluster", "cluster-events")) == 0
    pending: Any = await client.xpending(keys.stream("cluster"), "cluster-events")
    assert pending["pending"] == 0
    [refused] = [e for e in logs if e["event"] == "cluster_event_refused"]
    assert (refused["source"], refused["cluster_id"]) == ("tenant-a", "b-1")
    assert refused_count("cluster.spot_interruption") == before + 1


async def test_a_narrowed_scope_applies_to_events_already_in_the_stream(
    srv: Server, processor: Consumer, client: aioredis.Redis, keys: Keys
) -> None:
    """Posted while tenant-a spoke for b-1; its scope is narrowed before the processor runs:
    the event is not acted on. Application events (source not an agent) still are."""
    a = await tenant(srv, "tenant-a", "a-1", "b-1")
    status, body, _ = await srv.post("/v1/events", cluster_event(cluster_id="b-1"), token=a)
    assert status == 202, body
    assert await AgentStore(client, keys).set_clusters("tenant-a", ["a-1"]) is not None
    await run_all(processor)
    assert await client.xlen(keys.stream("notify")) == 0
    assert await client.zcard(keys.state("risky-pool-reports", *POOL)) == 0


# ---------------------------------------------------------------------------------- shared signal


async def test_one_tenant_flags_a_pool_for_its_own_clusters_only(
    srv: Server, processor: Consumer, client: aioredis.Redis, keys: Keys
) -> None:
    """Before: one interruption from any agent flagged the pool risky for every client. Now
    tenant-a's interruptions (two of its clusters, one agent) make the pool risky for its
    clusters; a second agent's cluster completes the quorum for everyone."""
    a = await tenant(srv, "tenant-a", "a-1", "a-2")
    for cluster, instance in (("a-1", "i-1"), ("a-2", "i-2")):
        body = cluster_event(cluster_id=cluster, instance_id=instance)
        assert (await srv.post("/v1/events", body, token=a))[0] == 202
    await run_all(processor)
    now = datetime.now(UTC)

    async def flagged(cluster: str) -> bool:
        [risk] = await pool_risks(client, keys, [POOL], now, cluster_id=cluster)
        return risk.flagged

    assert await client.exists(keys.state("risky-pool", *POOL)) == 0
    assert await flagged("a-1")
    assert await flagged("a-2")
    assert not await flagged("z-other-tenant")

    b = await tenant(srv, "tenant-b", "b-1")
    body = cluster_event(cluster_id="b-1", instance_id="i-3")
    assert (await srv.post("/v1/events", body, token=b))[0] == 202
    await run_all(processor)
    assert await client.exists(keys.state("risky-pool", *POOL)) == 1
    assert await flagged("z-other-tenant")
    notes = [f for _, f in await entries(client, keys.stream("notify"))]
    assert len(notes) == 3


async def test_one_tenant_repeating_an_interruption_keeps_others_below_the_risk_limit(
    srv: Server, processor: Consumer, client: aioredis.Redis, keys: Keys
) -> None:
    """The shared daily counts (0.15 each) would reach the limit after 4 reports from anyone;
    from one tenant alone they stay below it for every other cluster."""
    a = await tenant(srv, "tenant-a", "a-1")
    for i in range(6):
        body = cluster_event(cluster_id="a-1", instance_id=f"i-{i}")
        assert (await srv.post("/v1/events", body, token=a))[0] == 202
    await run_all(processor)
    now = datetime.now(UTC)
    [other] = await pool_risks(client, keys, [POOL], now, cluster_id="z-other-tenant")
    assert other.interruptions == 6
    assert not other.flagged
    assert other.score < RISK_LIMIT
    [own] = await pool_risks(client, keys, [POOL], now, cluster_id="a-1")
    assert own.flagged


async def test_the_quorum_is_read_from_the_reports_even_without_the_flag(
    client: aioredis.Redis, keys: Keys
) -> None:
    """Two reports handled at the same moment may each miss the other; the optimizer applies
    the rule to the reports itself, so the pool is risky for everyone all the same."""
    now = datetime.now(UTC)
    reports = keys.state("risky-pool-reports", *POOL)
    at_ms = int(now.timestamp() * 1000)
    await client.zadd(reports, {'["tenant-a","a-1"]': at_ms, '["tenant-b","b-1"]': at_ms})
    [risk] = await pool_risks(client, keys, [POOL], now, cluster_id="z")
    assert risk.flagged
    assert risk.score == 1.0
    # Reports older than the window count for nobody.
    old = at_ms - (cluster_events.RISKY_POOL_TTL_S + 60) * 1000
    await client.zadd(reports, {'["tenant-a","a-1"]': old, '["tenant-b","b-1"]': old})
    [risk] = await pool_risks(client, keys, [POOL], now, cluster_id="a-1")
    assert not risk.flagged


# ---------------------------------------------------------------------------------- CLI


def test_agents_add_refuses_cluster_types_without_clusters(
    run_cli: Callable[..., CliRun],
) -> None:
    refused = run_cli("agents", "add", "unscoped", "--types", "cluster.*")
    assert refused.returncode != 0
    assert "give --clusters" in refused.stderr
    added = run_cli("agents", "add", "workers-only", "--types", "worker.*")
    assert added.returncode == 0, added.stderr
    added = run_cli("agents", "add", "scoped", "--types", "cluster.*", "--clusters", "prod-*")
    assert added.returncode == 0, added.stderr
    assert "clusters: prod-*" in added.stderr


def test_agents_set_clusters_scopes_an_existing_agent_keeping_its_token(
    run_cli: Callable[..., CliRun], redis_url: str, keys: Keys
) -> None:
    """The migration path for agents created before ``--clusters`` bound posting."""
    added = run_cli("agents", "add", "legacy", "--types", "cluster.*", "--clusters", "*")
    assert added.returncode == 0, added.stderr
    # The token is the line of its own (in-process, the session's log lines share stdout).
    [token] = [line for line in added.stdout.splitlines() if line.startswith("spk_")]
    changed = run_cli("agents", "set-clusters", "legacy", "--clusters", "prod-1", "prod-2")
    assert changed.returncode == 0, changed.stderr
    with redis.Redis.from_url(redis_url) as r:
        raw: Any = r.hget(keys.agents(), "legacy")
    agent = msgspec.json.decode(raw, type=Agent)
    assert agent.token_sha256 == hash_token(token)  # the same token
    assert agent.clusters == ("prod-1", "prod-2")
    assert agent.may_speak_for("prod-2")
    assert not agent.may_speak_for("prod-3")
    assert run_cli("agents", "set-clusters", "nobody", "--clusters", "x").returncode == 1
