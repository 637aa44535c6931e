"""The optimizer and agent-metrics routes (issue 13, items 4-6) on a real Redis, with the AWS
side served by moto on 127.0.0.1 over HTTP: ``POST /clusters/{id}/optimize`` end to end (202 →
the task runs on the cluster's real inventory → decisions on the task → a notification), who
may call it, dry run on and off against a real Auto Scaling group, ``POST /clusters/{id}/metrics``
with broken and hostile bodies, and a weekly report built from the figures the concerns
recorded."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from consumers import cluster_events, renders
from consumers.render_jobs import ReportInput, report_job, unpack_files
from consumers.tasks import CONCERNS as TASK_CONCERNS
from consumers.tasks import TASK_TYPES
from schemas import Notification, OOMKilled, SpotInterruption
from schemas.inventory import Instance
from schemas.metrics import cluster_daily_key, daily_key, day_of, pool_interruptions_key
from spot import optimizer, optimizer_pipeline
from spot._inventory import inventory_keys
from spot.aws import AccountStore, Aws, AwsSettings, new_account
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.concern import Concern
from streamproc.offload import WorkerContext
from tests.helpers import entries, moto_server, spot
from tests.test_ingest_support import Server, running_ingest

pytestmark = pytest.mark.timeout(60)

ACCOUNT = "123456789012"
REGION = "eu-west-1"
CLUSTER = "prod-eu"

[OPTIMIZER_CONCERN] = [c for c in TASK_CONCERNS if c.group == "tasks-optimizer"]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """moto (STS, EC2, Auto Scaling) on a free 127.0.0.1 port, for this module."""
    with moto_server() as url:
        yield url


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Credentials from the environment only: no profile, no config file, no instance metadata."""
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def on_moto(endpoint: str) -> Iterator[None]:
    """The optimizer acts through moto (as ``configure_from_env`` would set it up)."""
    optimizer_pipeline.use_aws(Aws(AwsSettings(endpoint_url=endpoint, region=REGION)))
    yield
    optimizer_pipeline.use_aws(None)


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    async with running_ingest(
        client, keys, producer, task_types=TASK_TYPES, routes=[optimizer.add_routes]
    ) as s:
        yield s


async def token(
    srv: Server,
    name: str,
    types: tuple[str, ...] = (),
    clusters: tuple[str, ...] = (),
    operator: bool = False,
) -> str:
    _, tok = await srv.agents.add(name, types=types, clusters=clusters, operator=operator)
    return tok


@pytest.fixture
async def op(srv: Server) -> str:
    return await token(srv, "ops", operator=True)


@pytest.fixture
async def agent(srv: Server) -> str:
    """The prod clusters' agent: posts cluster events and metrics, so starts optimizer runs."""
    return await token(srv, "agent-prod", ("cluster.*",), ("prod-*",))


def consumer(
    concern: Concern, client: aioredis.Redis, codec: Codec[Any], keys: Keys, producer: Producer
) -> Consumer:
    return Consumer(
        concern,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="t1", block_ms=50, min_idle_ms=60_000),
    )


async def drain(c: Consumer) -> None:
    await c.ensure_groups()
    while await c.process_once(block_ms=50):
        pass


def instance(i: int, az: str = "eu-west-1a", **kw: Any) -> Instance:
    fields: dict[str, Any] = {
        "instance_id": f"i-{i:04d}",
        "instance_type": "m5.large",
        "state": "running",
        "availability_zone": az,
        "cluster": CLUSTER,
        **kw,
    }
    return Instance(**fields)


async def store_inventory(
    client: aioredis.Redis, keys: Keys, instances: list[Instance], region: str = REGION
) -> None:
    """As discovery stores it (``spot._inventory.inventory_keys``)."""
    await client.hset(
        inventory_keys(keys, ACCOUNT, region)[0],
        mapping={i.instance_id: msgspec.json.encode(i) for i in instances},
    )


async def optimize(
    srv: Server, tok: str, body: Any = None, cluster: str = CLUSTER, **kw: Any
) -> tuple[int, Any]:
    status, answer, _ = await srv.post(f"/clusters/{cluster}/optimize", body, token=tok, **kw)
    return status, answer


async def run_status(srv: Server, tok: str, location: str) -> dict[str, Any]:
    status, view, _ = await srv.post(location, token=tok, method="GET")
    assert status == 200, view
    return dict(view)


# ---------------------------------------------------------------------- optimize


async def test_optimize_route_end_to_end_in_dry_run(
    srv: Server,
    op: str,
    agent: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
) -> None:
    """202 with a task → the task reads the cluster's inventory and the pools' risk (from the
    cluster-event processor's flag and interruption counts) → a decision per on-demand
    instance, within the policy's spot share → the result on the task, a notification, the
    day's figures; nothing is changed on AWS (dry run is the default)."""
    await store_inventory(
        client,
        keys,
        [
            *(instance(i, "eu-west-1a") for i in range(1, 3)),
            *(instance(i, "eu-west-1b") for i in range(3, 5)),
            instance(5, "eu-west-1b", lifecycle="spot"),
            instance(6, state="stopped"),  # not running: not counted
            instance(7, cluster="other"),  # another cluster's
        ],
    )
    # A spot interruption in m5.large/eu-west-1a, through the real cluster-event processor.
    await producer.publish(interruption(1))
    await drain(consumer(cluster_events.CONCERN, client, codec, keys, producer))
    # c5.large/eu-west-1b was interrupted 4 times two days ago (no flag left): risk 0.6.
    two_days_ago = day_of(datetime.now(UTC) - timedelta(days=2))
    await client.hset(pool_interruptions_key(keys, two_days_ago), "c5.large/eu-west-1b", 4)
    status, answer, _ = await srv.post(
        f"/v1/clusters/{CLUSTER}/policy",
        {"families": ["m5", "c5"], "max_spot_share": 0.6},
        token=op,
        method="PUT",
    )
    assert status == 200, answer
    assert answer["policy"]["dry_run"] is True  # unless said otherwise

    status, sub = await optimize(srv, agent)
    assert status == 202, sub
    assert sub["status"] == "queued"
    assert sub["location"] == f"/clusters/{CLUSTER}/optimize/{sub['id']}"
    assert sub["task_location"] == f"/v1/tasks/{sub['id']}"
    await drain(consumer(OPTIMIZER_CONCERN, client, codec, keys, producer))

    view = await run_status(srv, agent, sub["location"])
    assert view == await run_status(srv, op, sub["task_location"])  # the task API's view
    assert view["status"] == "completed"
    result = view["result"]
    assert result["dry_run"] is True
    assert result["instances"] == 5
    risk = {r["pool"]: r for r in result["pool_risk"]}
    assert set(risk) == {f"{t}/eu-west-1{z}" for t in ("m5.large", "c5.large") for z in "ab"}
    assert risk["m5.large/eu-west-1a"]["flagged"]
    assert risk["m5.large/eu-west-1a"]["score"] == 1.0
    assert risk["m5.large/eu-west-1a"]["interruptions"] == 1  # counted by the concern
    assert risk["c5.large/eu-west-1b"] == {
        "pool": "c5.large/eu-west-1b",
        "instance_type": "c5.large",
        "availability_zone": "eu-west-1b",
        "flagged": False,
        "interruptions": 4,
        "score": 0.6,
    }
    assert sorted(result["risky_pools"]) == ["c5.large/eu-west-1b", "m5.large/eu-west-1a"]
    # 5 running, 60 % spot at most = 3: one spot already, two conversions, two kept.
    by_id = {d["instance_id"]: d for d in result["decisions"]}
    assert sorted(by_id) == [f"i-{i:04d}" for i in range(1, 5)]
    converted = [d for d in result["decisions"] if d["action"] == "convert"]
    assert len(converted) == 2
    for d in converted:
        # The cheapest safe pool of its size, its own AZ first; never a risky one.
        assert d["pool"] in ("c5.large/eu-west-1a", "m5.large/eu-west-1b")
        assert d["pool"].endswith(d["availability_zone"]) or d["availability_zone"] == "eu-west-1a"
        assert d["savings_usd_per_hour"] > 0
    kept = [d for d in result["decisions"] if d["action"] == "keep"]
    assert [d["reason"] for d in kept] == ["spot share at the policy's limit (60%)"] * 2
    assert result["actions"] == []
    assert result["savings_usd_per_month"] == round(
        sum(d["savings_usd_per_hour"] for d in converted) * 730, 2
    )
    # The notification for the cluster's subscribers.
    notes = [codec.decode(f) for _, f in await entries(client, keys.stream("notify"))]
    mine = [n for n in notes if isinstance(n, Notification) and n.source == "tasks"]
    [note] = mine
    assert note.cluster_id == CLUSTER
    assert note.cause_id == sub["id"]
    assert "2 of 5 instances to spot" in note.title
    assert "dry run" in note.title
    # The day's figures: one run, two opportunities, nothing saved (nothing was changed).
    today: Any = await client.hgetall(daily_key(keys, day_of(datetime.now(UTC))))
    assert float(today[b"optimizer_runs"]) == 1
    assert float(today[b"optimizer_opportunities"]) == 2
    assert float(today[b"optimizer_savings_usd"]) == 0
    # Counted once per task, however often it runs.
    assert not await optimizer_pipeline.record_run(
        client,
        keys,
        task_id=sub["id"],
        cluster_id=CLUSTER,
        at=datetime.now(UTC),
        figures={"optimizer_runs": 1},
    )


async def test_who_may_start_and_follow_an_optimizer_run(
    srv: Server, op: str, agent: str, client: aioredis.Redis, keys: Keys
) -> None:
    viewer = await token(srv, "viewer", (), ("prod-*",))
    other = await token(srv, "agent-dev", ("cluster.*",), ("dev-*",))
    assert (await optimize(srv, ""))[0] == 401
    status, answer, headers = await srv.post(f"/clusters/{CLUSTER}/optimize")
    assert status == 401
    assert headers["WWW-Authenticate"].startswith("Bearer")
    assert (await optimize(srv, "spk_not-a-token"))[0] == 401
    status, answer = await optimize(srv, other)
    assert status == 403
    assert "--clusters" in answer["detail"]
    assert CLUSTER in answer["detail"]
    assert (await optimize(srv, viewer))[0] == 403  # reads feeds, starts nothing
    assert (await optimize(srv, agent, cluster="bad%20id"))[0] == 404
    # Bodies: an object of OptimizerRun's fields, the path's cluster.
    status, answer = await optimize(srv, agent, [1, 2])
    assert (status, answer["path"]) == (422, "$")
    status, answer = await optimize(srv, agent, {"cluster_id": "prod-us"})
    assert (status, answer["error"], answer["path"]) == (422, "cluster_mismatch", "$.cluster_id")
    status, answer = await optimize(srv, agent, {"families": ["M5!"]})
    assert (status, answer["path"]) == (422, "$.families[0]")
    status, answer = await optimize(srv, agent, {"surprise": 1})
    assert (status, answer["path"]) == (422, "$")
    assert "surprise" in answer["detail"]
    status, answer, _ = await srv.post(
        f"/clusters/{CLUSTER}/optimize",
        data=b"{",
        token=agent,
        headers={"Content-Type": "application/json"},
    )
    assert (status, answer["error"]) == (400, "malformed")
    # Accepted: the operator's and the agent's, with an Idempotency-Key naming one task.
    status, first = await optimize(srv, op)
    assert status == 202
    assert first["priority"] == "high"
    status, a = await optimize(srv, agent, {"dry_run": True}, headers={"Idempotency-Key": "k1"})
    status2, b = await optimize(srv, agent, {"dry_run": True}, headers={"Idempotency-Key": "k1"})
    assert (status, status2) == (202, 202)
    assert a["id"] == b["id"]
    # Following: the cluster's own agent, not another cluster's, not through another path.
    assert (await srv.post(a["location"], token=other, method="GET"))[0] == 403
    assert (await srv.post(f"/clusters/prod-us/optimize/{a['id']}", token=agent, method="GET"))[
        0
    ] == 404
    assert (await srv.post(f"/clusters/{CLUSTER}/optimize/nope", token=agent, method="GET"))[
        0
    ] == 404
    assert (await srv.post(a["task_location"], token=agent, method="GET"))[0] == 403
    # Policies are the operator's.
    status, answer, _ = await srv.post(
        f"/v1/clusters/{CLUSTER}/policy", {"dry_run": False}, token=agent, method="PUT"
    )
    assert status == 403
    status, answer, _ = await srv.post(
        f"/v1/clusters/{CLUSTER}/policy", {"max_spot_share": 1.5}, token=op, method="PUT"
    )
    assert (status, answer["path"]) == (422, "$.max_spot_share")
    status, answer, _ = await srv.post(f"/v1/clusters/{CLUSTER}/policy", token=op, method="GET")
    assert status == 200
    assert answer["policy"] == {
        "families": [],
        "max_spot_share": 0.7,
        "dry_run": True,
        "updated_by": "",
    }


async def moto_asg(endpoint: str, name: str) -> Any:
    """A launch template and an Auto Scaling group of m5.large in moto; its client."""
    import boto3  # type: ignore[import-untyped]

    ec2 = boto3.client("ec2", endpoint_url=endpoint, region_name=REGION)
    asg = boto3.client("autoscaling", endpoint_url=endpoint, region_name=REGION)
    lt = ec2.create_launch_template(
        LaunchTemplateName=f"lt-{name}",
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "m5.large"},
    )["LaunchTemplate"]
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name,
        LaunchTemplate={"LaunchTemplateId": lt["LaunchTemplateId"], "Version": "$Latest"},
        MinSize=0,
        MaxSize=4,
        DesiredCapacity=0,
        AvailabilityZones=["eu-west-1a", "eu-west-1b"],
    )
    return asg


def mixed_policy(asg: Any, name: str) -> Any:
    [group] = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return group.get("MixedInstancesPolicy")


async def test_dry_run_off_sets_the_groups_mixed_instances_policy_on_aws(
    srv: Server,
    op: str,
    agent: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
    endpoint: str,
    on_moto: None,
) -> None:
    """With the policy's dry run off, the group holding the converted instances gets a
    mixed-instances policy (moto over HTTP, through the account's assumed role); a request
    that asks for a dry run changes nothing, whatever the policy says."""
    name = f"nodes-{keys.prefix}"
    asg = await moto_asg(endpoint, name)
    await AccountStore(client, keys).add(
        new_account(
            id=ACCOUNT, role_arn=f"arn:aws:iam::{ACCOUNT}:role/streamproc", regions=[REGION]
        )
    )
    tags = {"aws:autoscaling:groupName": name}
    await store_inventory(client, keys, [instance(i, tags=tags) for i in range(1, 5)])
    status, _, _ = await srv.post(
        f"/v1/clusters/{CLUSTER}/policy",
        {"families": ["m5", "m6i"], "max_spot_share": 0.5, "dry_run": False},
        token=op,
        method="PUT",
    )
    assert status == 200
    runner = consumer(OPTIMIZER_CONCERN, client, codec, keys, producer)

    status, asked = await optimize(srv, agent, {"dry_run": True})
    assert status == 202
    await drain(runner)
    view = await run_status(srv, agent, asked["location"])
    assert view["result"]["dry_run"] is True
    assert view["result"]["actions"] == []
    assert mixed_policy(asg, name) is None  # untouched

    status, sub = await optimize(srv, agent)
    assert status == 202
    await drain(runner)
    view = await run_status(srv, agent, sub["location"])
    assert view["status"] == "completed", view
    result = view["result"]
    assert result["dry_run"] is False
    converted = [d for d in result["decisions"] if d["action"] == "convert"]
    assert len(converted) == 2  # 50 % of 4
    assert {d["asg"] for d in converted} == {name}
    [action] = result["actions"]
    assert action["applied"] is True, action
    assert action["asg"] == name
    assert action["on_demand_percent"] == 50
    assert "m5.large" in action["instance_types"]
    policy = mixed_policy(asg, name)
    assert policy is not None
    overrides = sorted(o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"])
    assert overrides == action["instance_types"]
    dist = policy["InstancesDistribution"]
    assert dist["OnDemandPercentageAboveBaseCapacity"] == 50
    assert dist["OnDemandBaseCapacity"] == 0
    assert action["changed"] is True
    # Run again: the group has that policy already; nothing changed, no saving counted twice.
    status, again = await optimize(srv, agent)
    await drain(runner)
    actions = (await run_status(srv, agent, again["location"]))["result"]["actions"]
    assert actions == [{**action, "changed": False}]
    assert mixed_policy(asg, name) == policy
    # What was changed is what the report counts as saved (per day at today's prices).
    today: Any = await client.hgetall(daily_key(keys, day_of(datetime.now(UTC))))
    saved = sum(d["savings_usd_per_hour"] for d in converted) * 24
    assert float(today[b"optimizer_savings_usd"]) == pytest.approx(saved, abs=1e-3)
    assert float(today[b"optimizer_runs"]) == 3


async def test_a_group_that_cannot_be_changed_is_reported_and_the_run_completes(
    srv: Server,
    op: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
    on_moto: None,
) -> None:
    await AccountStore(client, keys).add(
        new_account(
            id=ACCOUNT, role_arn=f"arn:aws:iam::{ACCOUNT}:role/streamproc", regions=[REGION]
        )
    )
    tags = {"aws:autoscaling:groupName": f"missing-{keys.prefix}"}
    await store_inventory(client, keys, [instance(i, tags=tags) for i in range(1, 3)])
    await srv.post(f"/v1/clusters/{CLUSTER}/policy", {"dry_run": False}, token=op, method="PUT")
    status, sub = await optimize(srv, op)
    assert status == 202
    await drain(consumer(OPTIMIZER_CONCERN, client, codec, keys, producer))
    view = await run_status(srv, op, sub["location"])
    assert view["status"] == "completed"
    [action] = view["result"]["actions"]
    assert action["applied"] is False
    assert "no Auto Scaling group" in action["error"]
    notes = [codec.decode(f) for _, f in await entries(client, keys.stream("notify"))]
    [note] = [n for n in notes if n.source == "tasks"]
    assert note.severity == "warning"


# ---------------------------------------------------------------------- metrics


def interruption(i: int) -> SpotInterruption:
    """A spot interruption in m5.large/eu-west-1a of this module's cluster."""
    return msgspec.structs.replace(spot(i), cluster_id=CLUSTER, key=CLUSTER)


def yesterday_noon() -> datetime:
    """Samples are dated here: one UTC day, whenever the test runs."""
    today = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    return today - timedelta(days=1)


def sample(minutes_ago: float = 5, **kw: Any) -> dict[str, Any]:
    at = yesterday_noon() - timedelta(minutes=minutes_ago)
    return {
        "at": at.isoformat(),
        "interval_s": 60,
        "nodes": 10,
        "spot_nodes": 4,
        "pods": 120,
        "cpu_requested_cores": 20.0,
        "cpu_used_cores": 8.0,
        **kw,
    }


async def post_metrics(srv: Server, tok: str, body: Any, cluster: str = CLUSTER, **kw: Any) -> Any:
    status, answer, _ = await srv.post(f"/clusters/{cluster}/metrics", body, token=tok, **kw)
    return status, answer


async def test_metrics_batches_become_daily_figures_once(
    srv: Server,
    agent: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
) -> None:
    body = {"samples": [sample(m) for m in (3, 2, 1)]}
    status, answer = await post_metrics(srv, agent, body, headers={"Idempotency-Key": "b1"})
    assert status == 202, answer
    assert answer["accepted"] == 3
    again = await post_metrics(srv, agent, body, headers={"Idempotency-Key": "b1"})
    assert again[1]["id"] == answer["id"]  # a retry is the same event
    status, other = await post_metrics(srv, agent, {"samples": [sample(1, nodes=20)]})
    assert status == 202
    stored = [codec.decode(f) for _, f in await entries(client, keys.stream("metrics"))]
    assert [e.id for e in stored] == [answer["id"], other["id"]]
    assert stored[0].source == "agent-prod"
    assert stored[0].cluster_id == CLUSTER
    await drain(consumer(optimizer.CONCERNS[0], client, codec, keys, producer))

    day = day_of(yesterday_noon())
    raw: Any = await client.hgetall(daily_key(keys, day))
    figures = {k.decode(): float(v) for k, v in raw.items()}
    raw = await client.hgetall(cluster_daily_key(keys, CLUSTER, day))
    per_cluster = {k.decode(): float(v) for k, v in raw.items()}
    assert figures["agent_samples"] == 4
    assert figures["node_hours"] == pytest.approx((3 * 10 + 20) / 60, abs=1e-5)
    assert figures["spot_node_hours"] == pytest.approx(4 * 4 / 60, abs=1e-5)
    assert figures["cpu_core_hours_used"] == pytest.approx(4 * 8 / 60, abs=1e-5)
    assert "nodes_sum" not in figures  # the cluster's own hash keeps the sums
    assert per_cluster["nodes_sum"] == 50
    assert per_cluster["pods_sum"] == 480
    assert 0 < await client.ttl(daily_key(keys, day)) <= 35 * 86_400


async def test_metrics_refusals_are_precise_and_publish_nothing(
    srv: Server, agent: str, op: str, client: aioredis.Redis, keys: Keys
) -> None:
    good = {"samples": [sample()]}
    assert (await post_metrics(srv, "", good))[0] == 401
    dev = await token(srv, "agent-dev", ("cluster.*",), ("dev-*",))
    assert (await post_metrics(srv, dev, good))[0] == 403
    events_only = await token(srv, "events-only", ("cluster.spot_*",), ("prod-*",))
    status, answer = await post_metrics(srv, events_only, good)
    assert status == 403
    assert "cluster.metrics" in answer["detail"]
    cases: list[tuple[Any, int, str, str | None]] = [
        ({}, 422, "invalid", "$"),
        ({"samples": []}, 422, "invalid", "$.samples"),
        ({"samples": [sample()] * 101}, 422, "invalid", "$.samples"),
        ({"samples": [sample(), sample(nodes=-1)]}, 422, "invalid", "$.samples[1].nodes"),
        ({"samples": [sample(nodes="ten")]}, 422, "invalid", "$.samples[0].nodes"),
        ({"samples": [sample(gpus=8)]}, 422, "invalid", "$.samples[0]"),
        ({"samples": [sample(interval_s=86_400)]}, 422, "invalid", "$.samples[0].interval_s"),
        ({"samples": [sample(at="2026-01-01T00:00:00")]}, 422, "invalid", "$.samples[0].at"),
        ({"samples": [sample(-60 * 24 * 365)]}, 422, "out_of_range", "$.samples[0].at"),
        ({"samples": [sample(60 * 24 * 30)]}, 422, "out_of_range", "$.samples[0].at"),
        ({"samples": [sample(spot_nodes=11)]}, 422, "invalid", "$.samples[0].spot_nodes"),
        ({"samples": [sample(pods=10**18)]}, 422, "invalid", "$.samples[0].pods"),
        ({**good, "id": "no spaces"}, 422, "invalid", "$.id"),
        ({**good, "cluster_id": "prod-us"}, 422, "invalid", "$"),
        ([sample()], 422, "invalid", "$"),
    ]
    for body, want_status, want_error, want_path in cases:
        status, answer = await post_metrics(srv, agent, body)
        assert (status, answer["error"], answer.get("path")) == (
            want_status,
            want_error,
            want_path,
        ), (body, answer)
    raw_cases: list[tuple[bytes, dict[str, str], int, str]] = [
        (b"", {}, 400, "empty_body"),
        (b'{"samples": [', {}, 400, "malformed"),
        (b"\xff\xfe{}", {}, 400, "malformed"),
        (b"[" * 100_000, {}, 422, "invalid"),  # refused at the first "["
        (b'{"id": "a", "samples": [' + b"[" * 100_000, {}, 422, "invalid"),
        (
            b'{"samples": [{"at": "2026-11-30T00:00:00Z", "nodes": 1' + b"0" * 400 + b"}]}",
            {},
            422,
            "invalid",
        ),
        (b'{"samples": [], "samples": [], ' + b'"x": 1, ' * 1000 + b"}", {}, 422, "invalid"),
        (b'{"samples": []}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (b" " * (5 << 20), {}, 413, "body_too_large"),
    ]
    for data, headers, want_status, want_error in raw_cases:
        status, answer, _ = await srv.post(
            f"/clusters/{CLUSTER}/metrics",
            data=data,
            token=agent,
            headers={"Content-Type": "application/json", **headers},
        )
        assert (status, answer["error"]) == (want_status, want_error), (data[:40], answer)
    assert await client.xlen(keys.stream("metrics")) == 0
    # Not an event agents post elsewhere: only this route checks the cluster and the times.
    status, answer, _ = await srv.post(
        "/v1/events", {"type": "cluster.metrics", "cluster_id": CLUSTER, **good}, token=op
    )
    assert status == 422
    assert await client.xlen(keys.stream("metrics")) == 0


async def test_nothing_accepted_is_lost(
    srv: Server,
    agent: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
) -> None:
    """Accepted batches mixed with refused ones: every 202 is an event on the topic, and every
    accepted sample is in the day's figures, once."""
    accepted: list[str] = []
    samples = 0
    for i in range(30):
        body = {"samples": [sample(1 + j / 10) for j in range(1 + i % 5)]}
        if i % 3 == 2:
            body["samples"][-1]["nodes"] = -1  # refused whole
        status, answer = await post_metrics(srv, agent, body)
        if status == 202:
            accepted.append(answer["id"])
            samples += len(body["samples"])
        else:
            assert status == 422
    stored = [codec.decode(f) for _, f in await entries(client, keys.stream("metrics"))]
    assert [e.id for e in stored] == accepted
    await drain(consumer(optimizer.CONCERNS[0], client, codec, keys, producer))
    raw: Any = await client.hget(daily_key(keys, day_of(yesterday_noon())), "agent_samples")
    assert float(raw) == samples


# ---------------------------------------------------------------------- weekly report


async def test_the_weekly_report_is_built_from_what_the_concerns_recorded(
    srv: Server,
    agent: str,
    client: aioredis.Redis,
    keys: Keys,
    codec: Codec[Any],
    producer: Producer,
) -> None:
    """Cluster events, agent metrics and an optimizer run record the day's figures; the
    report job (as the renders concern runs it) charts each of them with its label."""
    now = datetime.now(UTC)
    await producer.publish(interruption(1))
    await producer.publish(interruption(2))
    await producer.publish(
        OOMKilled(
            cluster_id=CLUSTER,
            key=CLUSTER,
            namespace="shop",
            pod="cart-1",
            container="cart",
            memory_limit_bytes=256 << 20,
        )
    )
    await drain(consumer(cluster_events.CONCERN, client, codec, keys, producer))
    assert (await post_metrics(srv, agent, {"samples": [sample(1)]}))[0] == 202
    await drain(consumer(optimizer.CONCERNS[0], client, codec, keys, producer))
    await store_inventory(client, keys, [instance(i, "eu-west-1b") for i in range(1, 3)])
    assert (await optimize(srv, agent))[0] == 202
    await drain(consumer(OPTIMIZER_CONCERN, client, codec, keys, producer))
    # What the hibernation concern records (spot.hibernation), written here as it would.
    await client.hincrbyfloat(daily_key(keys, day_of(now)), "hibernated_instance_hours", 12.0)
    await client.hincrbyfloat(daily_key(keys, day_of(now)), "savings_usd", 1.152)

    end = now + timedelta(days=1)
    start = end - timedelta(days=7)
    ctx: Any = SimpleNamespace(redis=client, keys=keys)
    days = await renders._daily_metrics(ctx, "metrics", start, 7)
    week = {
        name: sum(d.values.get(name, 0.0) for d in days)
        for name in {n for d in days for n in d.values}
    }
    assert week["spot_interruptions"] == 2
    assert week["oom_kills"] == 1
    assert week["optimizer_runs"] == 1
    assert week["optimizer_opportunities"] == 1  # 70 % of 2 instances
    assert week["agent_samples"] == 1
    assert week["node_hours"] == pytest.approx(10 / 60, abs=1e-5)
    assert week["hibernated_instance_hours"] == 12.0
    report = ReportInput(title="Weekly report", period_start=start, period_end=end, days=days)
    files = unpack_files(
        report_job(msgspec.msgpack.encode(report), WorkerContext("j", "report", "cpu"))
    )
    for name in (
        "spot_interruptions",
        "oom_kills",
        "optimizer_runs",
        "optimizer_savings_usd",
        "agent_samples",
        "node_hours",
        "hibernated_instance_hours",
        "savings_usd",
    ):
        assert f"{name}.png" in files
    page = files["index.html"].decode()
    assert "<td>Spot interruptions (events)</td><td>2.00</td>" in page
    assert "<td>OOM kills (events)</td><td>1.00</td>" in page
    # The savings come first, the agent metrics after the events.
    assert page.index("savings_usd.png") < page.index("spot_interruptions.png")
    assert page.index("oom_kills.png") < page.index("agent_samples.png")


def test_policy_cli_sets_and_shows(
    redis_url: str, keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    """``streamproc policy set CLUSTER --families ... --max-spot-share ... --act`` (its parser
    and command, without the entry point's logging setup)."""
    import argparse

    from streamproc.config import load_config

    parser = argparse.ArgumentParser()
    optimizer.register(parser.add_subparsers())
    cfg = load_config({"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix})

    def run(*argv: str) -> int:
        args = parser.parse_args(argv)
        return int(args.func(args, cfg, None))

    assert (
        run("policy", "set", CLUSTER, "--families", "m5,c6i", "--max-spot-share", "0.4", "--act")
        == 0
    )
    assert run("policy", "show", CLUSTER) == 0
    assert run("policy", "set", CLUSTER, "--max-spot-share", "2") == 2
    out = capsys.readouterr()
    # (Without the entry point's logging setup, structlog's default lines go to stdout too.)
    lines = [ln for ln in out.out.splitlines() if ln.startswith('{"cluster_id"')]
    shown = [msgspec.json.decode(line) for line in lines]
    assert len(shown) == 2
    assert shown[0] == shown[1]
    assert shown[1]["families"] == ["m5", "c6i"]
    assert shown[1]["max_spot_share"] == 0.4
    assert shown[1]["dry_run"] is False
    assert "max_spot_share" in out.err


def placed(*instances: Instance) -> list[optimizer_pipeline.Placed]:
    return [
        optimizer_pipeline.Placed(account_id=ACCOUNT, region=REGION, instance=i) for i in instances
    ]


def risk(pool: str, score: float = 0.0) -> optimizer_pipeline.PoolRisk:
    itype, _, az = pool.partition("/")
    return optimizer_pipeline.PoolRisk(
        pool=pool,
        instance_type=itype,
        availability_zone=az,
        flagged=score >= 1,
        interruptions=0,
        score=score,
    )


def test_decisions_say_why_an_instance_stays_on_demand() -> None:
    from spot.policy import Policy

    fleet = placed(
        instance(1, instance_type="m5.xlarge"),  # no pool of its size
        instance(2, instance_type="x9.large"),  # no known price: no saving claimed
        instance(3),  # the only safe large pool is in the other AZ: still used
        instance(4, az="eu-west-1b"),
    )
    risks = [
        risk("m5.large/eu-west-1a", 1.0),
        risk("m5.large/eu-west-1b", 0.3),
        risk("x9.large/eu-west-1a", 0.0),
    ]
    out = {d.instance_id: d for d in optimizer_pipeline.decide(fleet, risks, Policy())}
    assert out["i-0001"].action == "keep"
    assert out["i-0001"].reason == "no pool of its size under the risk limit"
    assert out["i-0002"].action == "keep"
    assert out["i-0002"].reason == "no saving at known prices"
    assert out["i-0003"].action == "convert"
    assert out["i-0003"].pool == "m5.large/eu-west-1b"
    assert out["i-0004"].pool == "m5.large/eu-west-1b"
    assert out["i-0003"].savings_usd_per_hour == pytest.approx(0.096 * 0.7, abs=1e-6)
    none = optimizer_pipeline.decide(fleet, risks, Policy(max_spot_share=0.0))
    assert [d.action for d in none] == ["keep"] * 4


def test_candidate_pools_from_the_policy_or_the_request() -> None:
    from spot.policy import Policy

    fleet = placed(instance(1), instance(2, az="eu-west-1b", instance_type="c5.xlarge"))
    pools = optimizer_pipeline.candidate_pools(fleet, Policy(families=["m6i"]))
    assert pools == [
        ("m6i.large", "eu-west-1a"),
        ("m6i.large", "eu-west-1b"),
        ("m6i.xlarge", "eu-west-1a"),
        ("m6i.xlarge", "eu-west-1b"),
    ]
    assert len(optimizer_pipeline.candidate_pools(fleet, Policy())) == 8  # c5, m5 x 2 sizes x 2
    explicit = optimizer_pipeline.candidate_pools(
        fleet, Policy(), instance_types=["r5.large"], availability_zones=["eu-west-1c"]
    )
    assert explicit == [("r5.large", "eu-west-1c")]
