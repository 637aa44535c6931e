"""Discovery against a moto server over HTTP and a real Redis: what it finds, the exact events a
change makes, nothing on a rerun, one scanner per account, failures by class, and the accounts
CLI and API with broken and hostile input."""

from __future__ import annotations

import asyncio
import http.client
import os
import random
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlsplit

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from moto.ec2.models.amis import AMIS

from notifications.feed_keys import feed_key
from schemas import REGISTRY
from schemas.inventory import (
    ClusterAdded,
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
)
from schemas.notify import Notification
from schemas.ticks import DiscoveryTick
from spot import _inventory as inv
from spot import accounts as accounts_api
from spot import discovery, discovery_demo
from spot.aws import AccountStore, AwsSettings, new_account
from spot.discovery import DiscoverySettings
from streamproc import Codec, ConsumerSettings, Keys, Producer
from streamproc.concern import Context
from streamproc.consumer import Consumer
from streamproc.errors import Retry
from streamproc.event import derived_id
from streamproc.ingest import Ingest, IngestSettings, create_app
from tests.helpers import cli_in_process, moto_server
from tests.test_ingest_support import Server

pytestmark = pytest.mark.timeout(120)

REGIONS = ("eu-west-1", "us-east-1")

#: The image the tests' instances run: the first of moto's built-in AMIs (those in every region),
#: named by id. ``DescribeImages`` without ids makes moto serialize all ~1,300 of them (about 2 s
#: a call on a 2-core machine); by id it is one.
IMAGE_ID: str = AMIS[0]["ami_id"]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    with moto_server() as url:
        yield url


class _Proxy(BaseHTTPRequestHandler):
    """Forwards to moto, except STS AssumeRole of the roles in ``refuse`` (account id ->
    (HTTP status, error code)): what AWS answers for a role that cannot be assumed."""

    upstream = ""
    refuse: dict[str, tuple[int, str]] = {}  # noqa: RUF012 - set per test on a subclass

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        return

    def _forward(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        text = unquote_plus(body.decode("latin-1"))
        if "Action=AssumeRole" in text:
            for account, (status, code) in self.refuse.items():
                if f"arn:aws:iam::{account}:role/" in text:
                    answer = (
                        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
                        f"<Error><Type>Sender</Type><Code>{code}</Code>"
                        "<Message>not authorized to perform: sts:AssumeRole</Message></Error>"
                        "<RequestId>r-1</RequestId></ErrorResponse>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "text/xml")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                    return
        up = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(up.hostname or "127.0.0.1", up.port, timeout=30)
        try:
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _forward


@pytest.fixture
def proxy(moto_url: str) -> Iterator[type[_Proxy]]:
    handler = type("P", (_Proxy,), {"upstream": moto_url, "refuse": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    handler.url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    try:
        yield handler
    finally:
        server.shutdown()
        server.server_close()


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
def settings(proxy: type[_Proxy]) -> Iterator[DiscoverySettings]:
    s = DiscoverySettings(lease_ttl_s=5.0, scan_alert_s=60.0)
    discovery.use_settings(
        s,
        AwsSettings(
            endpoint_url=proxy.url,  # type: ignore[attr-defined]
            connect_timeout_s=2.0,
            read_timeout_s=30.0,
            breaker_threshold=50,
        ),
    )
    yield s
    discovery.use_settings(DiscoverySettings())


def account_id() -> str:
    return str(random.randrange(10**11, 10**12))


class AwsAccount:
    """boto3 as one account of the moto server (its role assumed), to create what to find."""

    def __init__(self, endpoint: str, account: str) -> None:
        import boto3  # type: ignore[import-untyped]

        self.id, self.endpoint = account, endpoint
        self.role_arn = f"arn:aws:iam::{account}:role/scanner"
        creds = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1").assume_role(
            RoleArn=self.role_arn, RoleSessionName="test-setup"
        )["Credentials"]
        self.session = boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )

    def client(self, service: str, region: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint, region_name=region)

    def run(self, region: str, n: int = 1, itype: str = "t3.micro", cluster: str = "") -> list[str]:
        ec2 = self.client("ec2", region)
        [image] = [i["ImageId"] for i in ec2.describe_images(ImageIds=[IMAGE_ID])["Images"]]
        kw: dict[str, Any] = {}
        if cluster:
            kw["TagSpecifications"] = [
                {
                    "ResourceType": "instance",
                    "Tags": [{"Key": "eks:cluster-name", "Value": cluster}],
                }
            ]
        r = ec2.run_instances(ImageId=image, MinCount=n, MaxCount=n, InstanceType=itype, **kw)
        return [i["InstanceId"] for i in r["Instances"]]


async def add_account(client: aioredis.Redis, keys: Keys, a: AwsAccount) -> None:
    await AccountStore(client, keys).add(
        new_account(id=a.id, role_arn=a.role_arn, regions=list(REGIONS), name=f"acct-{a.id}")
    )


def tick(n: int = 0) -> DiscoveryTick:
    """The n-th tick (the same id each time, as the ticker makes it)."""
    when = datetime(2026, 12, 1, tzinfo=UTC) + timedelta(minutes=5 * n)
    return DiscoveryTick(
        id=derived_id("test-discovery", when.isoformat()), schedule="discovery", scheduled_for=when
    )


def ctx_for(
    client: aioredis.Redis, producer: Producer, keys: Keys, t: DiscoveryTick, consumer: str = "r1"
) -> Context:
    return Context(
        topic="ticks",
        group="discovery",
        consumer=consumer,
        entry_id="1-0",
        attempt=1,
        deliveries=1,
        redis=client,
        producer=producer,
        keys=keys,
        event_id=t.id,
    )


async def run_scan(
    client: aioredis.Redis, producer: Producer, keys: Keys, t: DiscoveryTick, consumer: str = "r1"
) -> None:
    await discovery.scan(t, ctx_for(client, producer, keys, t, consumer))


async def stream(client: aioredis.Redis, keys: Keys, topic: str) -> list[Any]:
    codec = Codec(REGISTRY)
    entries: Any = await client.xrange(keys.stream(topic))
    return [codec.decode(f) for _, f in entries]


# ---------------------------------------------------------------------- discovery


async def test_discovery_finds_instances_and_clusters_in_every_region(
    client: aioredis.Redis, producer: Producer, keys: Keys, moto_url: str, settings: Any
) -> None:
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    in_cluster = await asyncio.to_thread(a.run, "eu-west-1", 2, "m5.large", "shop")
    alone = await asyncio.to_thread(a.run, "eu-west-1", 1, "t3.micro")
    east = await asyncio.to_thread(a.run, "us-east-1", 1, "c5.xlarge")
    await asyncio.to_thread(
        a.client("eks", "eu-west-1").create_cluster,
        name="shop",
        version="1.30",
        roleArn=f"arn:aws:iam::{a.id}:role/eks",
        resourcesVpcConfig={},
    )
    await asyncio.to_thread(
        a.client("cloudwatch", "eu-west-1").put_metric_data,
        Namespace="AWS/EC2",
        MetricData=[
            {
                "MetricName": "CPUUtilization",
                "Dimensions": [{"Name": "InstanceId", "Value": alone[0]}],
                "Value": 37.5,
                "Timestamp": datetime.now(UTC),
            }
        ],
    )
    await add_account(client, keys, a)
    await run_scan(client, producer, keys, tick(1))

    events = await stream(client, keys, "inventory")
    added = {e.instance.instance_id: e for e in events if isinstance(e, InstanceAdded)}
    assert set(added) == {*in_cluster, *alone, *east}
    assert len(events) == 5
    [cluster] = [e for e in events if isinstance(e, ClusterAdded)]
    assert (cluster.cluster.name, cluster.region, cluster.account_id) == ("shop", "eu-west-1", a.id)
    assert {added[i].instance.cluster for i in in_cluster} == {"shop"}
    assert added[east[0]].region == "us-east-1"
    assert added[east[0]].instance.instance_type == "c5.xlarge"
    assert added[alone[0]].instance.cpu_avg == 37.5
    assert all(e.key == a.id and e.cause_id == tick(1).id for e in events)

    stored, clusters = await inv.load(client, keys, a.id, "eu-west-1")
    assert set(stored) == {*in_cluster, *alone}
    assert stored[alone[0]].state == "running"
    assert set(clusters) == {"shop"}
    feed: Any = await client.xrange(feed_key(keys, "shop"))
    [(_, fields)] = feed
    assert fields[b"type"] == b"inventory.scan"
    assert orjson.loads(fields[b"data"])["instances"] == 2
    status = await client.hgetall(inv.status_key(keys, a.id))
    assert status[b"error"] == b""


async def test_terminated_added_and_changed_instances_make_exactly_their_events(
    client: aioredis.Redis, producer: Producer, keys: Keys, moto_url: str, settings: Any
) -> None:
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    first = await asyncio.to_thread(a.run, "eu-west-1", 4)
    await add_account(client, keys, a)
    await run_scan(client, producer, keys, tick(1))
    assert len(await stream(client, keys, "inventory")) == 4

    ec2 = a.client("ec2", "eu-west-1")
    await asyncio.to_thread(ec2.terminate_instances, InstanceIds=[first[0]])
    await asyncio.to_thread(ec2.stop_instances, InstanceIds=[first[1]])
    await asyncio.to_thread(
        ec2.create_tags, Resources=[first[2]], Tags=[{"Key": "team", "Value": "data"}]
    )
    [new] = await asyncio.to_thread(a.run, "eu-west-1", 1)
    await run_scan(client, producer, keys, tick(2))
    events = (await stream(client, keys, "inventory"))[4:]
    assert {type(e).__name__ for e in events} == {
        "InstanceRemoved",
        "InstanceChanged",
        "InstanceAdded",
    }
    assert len(events) == 4
    [removed] = [e for e in events if isinstance(e, InstanceRemoved)]
    assert (removed.instance_id, removed.reason) == (first[0], "terminated")
    assert removed.before.state == "running"
    changes = {e.instance_id: e for e in events if isinstance(e, InstanceChanged)}
    assert changes[first[1]].changed == ("state",)
    assert (changes[first[1]].before.state, changes[first[1]].after.state) == (
        "running",
        "stopped",
    )
    assert changes[first[2]].changed == ("tags",)
    assert changes[first[2]].after.tags == {"team": "data"}
    [added] = [e for e in events if isinstance(e, InstanceAdded)]
    assert added.instance.instance_id == new
    stored, _ = await inv.load(client, keys, a.id, "eu-west-1")
    assert set(stored) == {first[1], first[2], first[3], new}

    # Nothing changed: a new tick emits nothing.
    await run_scan(client, producer, keys, tick(3))
    assert len(await stream(client, keys, "inventory")) == 8


async def test_the_same_tick_handled_twice_emits_nothing_new(
    client: aioredis.Redis, producer: Producer, keys: Keys, moto_url: str, settings: Any
) -> None:
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    await asyncio.to_thread(a.run, "us-east-1", 3)
    await add_account(client, keys, a)
    t = tick(1)
    await run_scan(client, producer, keys, t)
    assert len(await stream(client, keys, "inventory")) == 3
    await run_scan(client, producer, keys, t)
    assert len(await stream(client, keys, "inventory")) == 3
    # A crash after publishing and before the inventory was written: the rerun finds the
    # same differences and publishes the same event ids, which the producer drops.
    ikey, _ = inv.inventory_keys(keys, a.id, "us-east-1")
    await client.delete(ikey)
    await run_scan(client, producer, keys, t, consumer="r2")
    assert len(await stream(client, keys, "inventory")) == 3
    assert await client.hlen(ikey) == 3


async def test_two_replicas_never_scan_one_account_at_once(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    moto_url: str,
    settings: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    created = await asyncio.to_thread(a.run, "eu-west-1", 2)
    await add_account(client, keys, a)
    scanning: set[str] = set()
    overlap: list[set[str]] = []
    scanned_by: list[str] = []
    real = discovery._scan_region

    async def slow(rt: Any, ctx: Context, *args: Any) -> None:
        scanning.add(ctx.consumer)
        if len(scanning) > 1:
            overlap.append(set(scanning))
        scanned_by.append(ctx.consumer)
        try:
            await asyncio.sleep(0.2)
            await real(rt, ctx, *args)
        finally:
            scanning.discard(ctx.consumer)

    monkeypatch.setattr(discovery, "_scan_region", slow)
    skipped = discovery.SCANS_SKIPPED._value.get()
    for n in range(3):
        await asyncio.gather(
            *(run_scan(client, producer, keys, tick(10 * n + r), f"r{r}") for r in (1, 2))
        )
    assert overlap == []
    assert discovery.SCANS_SKIPPED._value.get() - skipped == 3  # one of the two, every round
    assert len(scanned_by) == 3 * len(REGIONS)
    added = [e for e in await stream(client, keys, "inventory") if isinstance(e, InstanceAdded)]
    assert sorted(e.instance.instance_id for e in added) == sorted(created)
    assert await client.exists(inv.lease_key(keys, a.id)) == 0  # released after each scan


async def test_access_denied_on_one_account_alerts_once_and_the_others_are_scanned(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    moto_url: str,
    settings: Any,
    proxy: type[_Proxy],
) -> None:
    bad = await asyncio.to_thread(AwsAccount, moto_url, "0" + account_id()[1:])
    good = await asyncio.to_thread(AwsAccount, moto_url, "9" + account_id()[1:])
    await asyncio.to_thread(bad.run, "eu-west-1", 2)
    ids = await asyncio.to_thread(good.run, "eu-west-1", 2)
    proxy.refuse[bad.id] = (403, "AccessDenied")
    await add_account(client, keys, bad)
    await add_account(client, keys, good)

    await run_scan(client, producer, keys, tick(1))  # no exception: nothing to retry
    events = await stream(client, keys, "inventory")
    assert sorted(e.instance.instance_id for e in events) == sorted(ids)
    assert {e.account_id for e in events} == {good.id}
    [alert] = await stream(client, keys, "notify")
    assert isinstance(alert, Notification)
    assert alert.severity == "critical"
    assert bad.id in alert.title
    assert "AccessDenied" in alert.title
    assert alert.cluster_id == ""
    status = await client.hgetall(inv.status_key(keys, bad.id))
    assert status[b"error"] == b"AccessDenied"

    # Still refused on the next tick: no second alert for the same failure.
    await run_scan(client, producer, keys, tick(2))
    assert len(await stream(client, keys, "notify")) == 1
    # The role is fixed: its instances are found.
    proxy.refuse.clear()
    await run_scan(client, producer, keys, tick(3))
    assert {e.account_id for e in await stream(client, keys, "inventory")} == {good.id, bad.id}
    assert (await client.hgetall(inv.status_key(keys, bad.id)))[b"error"] == b""


async def test_a_throttled_account_retries_the_tick_after_the_others(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    moto_url: str,
    settings: Any,
    proxy: type[_Proxy],
) -> None:
    slow = await asyncio.to_thread(AwsAccount, moto_url, "0" + account_id()[1:])
    good = await asyncio.to_thread(AwsAccount, moto_url, "9" + account_id()[1:])
    ids = await asyncio.to_thread(good.run, "us-east-1", 1)
    await add_account(client, keys, slow)
    await add_account(client, keys, good)
    proxy.refuse[slow.id] = (400, "Throttling")
    with pytest.raises(Retry):
        await run_scan(client, producer, keys, tick(1))
    assert [e.instance.instance_id for e in await stream(client, keys, "inventory")] == ids
    assert await stream(client, keys, "notify") == []  # transient: no alert


async def test_a_scan_past_its_limit_raises_a_warning(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    moto_url: str,
    proxy: type[_Proxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    discovery.use_settings(
        DiscoverySettings(scan_alert_s=0.2, lease_ttl_s=1.0),
        AwsSettings(endpoint_url=proxy.url),  # type: ignore[attr-defined]
    )
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    await add_account(client, keys, a)
    real = discovery._scan_region

    async def slow(*args: Any) -> None:
        await asyncio.sleep(0.3)
        await real(*args)

    monkeypatch.setattr(discovery, "_scan_region", slow)
    try:
        await run_scan(client, producer, keys, tick(1))
    finally:
        discovery.use_settings(DiscoverySettings())
    [warning] = await stream(client, keys, "notify")
    assert warning.severity == "warning"
    assert "slow" in warning.title
    assert a.id in warning.title


async def test_a_slow_warning_in_flight_when_the_scan_ends_is_still_published(
    client: aioredis.Redis,
    producer: Producer,
    keys: Keys,
    moto_url: str,
    proxy: type[_Proxy],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scan ended while its "slow" warning was being published: the scan used to cancel
    the watchdog mid-publish and the warning was lost (seen in CI on a loaded machine)."""
    discovery.use_settings(
        DiscoverySettings(scan_alert_s=0.05, lease_ttl_s=1.0),
        AwsSettings(endpoint_url=proxy.url),  # type: ignore[attr-defined]
    )
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    await add_account(client, keys, a)
    real_scan, real_publish = discovery._scan_region, producer.publish
    regions_done = asyncio.Event()
    scanned: list[str] = []

    async def slow(*args: Any) -> None:
        await asyncio.sleep(0.1)
        await real_scan(*args)
        scanned.append(args[4])
        if len(scanned) == len(REGIONS):
            regions_done.set()

    async def publish_after_the_scan(event: Any, *args: Any, **kw: Any) -> str:
        await regions_done.wait()  # the warning goes out only once the last region is done
        return await real_publish(event, *args, **kw)

    monkeypatch.setattr(discovery, "_scan_region", slow)
    monkeypatch.setattr(producer, "publish", publish_after_the_scan)
    try:
        await run_scan(client, producer, keys, tick(1))
    finally:
        discovery.use_settings(DiscoverySettings())
    [warning] = await stream(client, keys, "notify")
    assert "slow" in warning.title
    assert a.id in warning.title


async def test_a_published_tick_is_scanned_by_the_discovery_group(
    client: aioredis.Redis,
    codec: Codec[Any],
    producer: Producer,
    keys: Keys,
    moto_url: str,
    settings: Any,
) -> None:
    a = await asyncio.to_thread(AwsAccount, moto_url, account_id())
    ids = await asyncio.to_thread(a.run, "eu-west-1", 2, "m5.large", "web")
    await add_account(client, keys, a)
    consumer = Consumer(
        discovery.CONCERN,
        client=client,
        codec=codec,
        keys=keys,
        producer=producer,
        settings=ConsumerSettings(consumer="t1", block_ms=50, grace_s=1.0),
    )
    task = asyncio.create_task(consumer.run())
    try:
        await producer.publish(tick(1))
        for _ in range(200):
            if len(await stream(client, keys, "inventory")) >= 2:
                break
            await asyncio.sleep(0.05)
    finally:
        consumer.stop()
        await task
    events = await stream(client, keys, "inventory")
    assert sorted(e.instance.instance_id for e in events) == sorted(ids)


async def test_the_demo_seed_is_found_by_one_scan(
    client: aioredis.Redis, producer: Producer, keys: Keys, moto_url: str, settings: Any
) -> None:
    """What ``make run`` shows: the aws-demo role's seed, registered, found by the first tick."""
    created = await asyncio.to_thread(discovery_demo.seed, moto_url)
    assert created == {"eu-west-1": 4, "us-east-1": 2}
    await AccountStore(client, keys).add(
        new_account(
            id=discovery_demo.DEMO_ACCOUNT,
            role_arn=discovery_demo.DEMO_ROLE,
            regions=discovery_demo.DEMO_REGIONS,
        )
    )
    await run_scan(client, producer, keys, tick(1))
    events = await stream(client, keys, "inventory")
    assert sorted(type(e).__name__ for e in events) == ["ClusterAdded"] + ["InstanceAdded"] * 6
    in_cluster = [
        e for e in events if isinstance(e, InstanceAdded) and e.instance.cluster == "demo-cluster"
    ]
    assert len(in_cluster) == 3
    assert all(e.instance.cpu_avg is not None for e in events if isinstance(e, InstanceAdded))
    assert await client.xlen(feed_key(keys, "demo-cluster")) == 1


def test_diff_ignores_cpu_and_keeps_terminated_out() -> None:
    old = Instance(instance_id="i-1", instance_type="t3.micro", state="running", cpu_avg=1.0)
    same = Instance(instance_id="i-1", instance_type="t3.micro", state="running", cpu_avg=9.0)
    gone = Instance(instance_id="i-2", instance_type="t3.micro", state="terminated")
    d = inv.diff_instances({"i-1": old}, [same, gone], cause_id="t", account_id="1", region="r")
    assert d.events == []
    assert list(d.upsert) == ["i-1"]  # stored with its new CPU figure, no event
    assert d.delete == []


# ---------------------------------------------------------------------- accounts


@pytest.fixture
async def srv(client: aioredis.Redis, keys: Keys, producer: Producer) -> AsyncIterator[Server]:
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(auth_cache_s=0.0, max_body_bytes=64 * 1024),
    )
    app = create_app(ingest, routes=[accounts_api.add_routes])
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()


ROLE = "arn:aws:iam::123456789012:role/scanner"


async def test_accounts_are_added_listed_and_removed_without_the_external_id(
    srv: Server,
) -> None:
    op = await srv.token("op", (), operator=True)
    body = {
        "id": "123456789012",
        "role_arn": ROLE,
        "regions": ["eu-west-1", "us-east-1"],
        "external_id": "s3cr3t-ext-id",
        "name": "prod",
    }
    status, answer, _ = await srv.post("/v1/accounts", body, token=op)
    assert status == 201, answer
    assert answer["account"]["external_id"] == "set"
    assert answer["new"] is True
    status, listed, _ = await srv.post("/v1/accounts", token=op, method="GET")
    assert status == 200
    assert "s3cr3t" not in orjson.dumps(listed).decode()
    [row] = listed["accounts"]
    assert row["regions"] == ["eu-west-1", "us-east-1"]
    assert (await srv.post("/v1/accounts/123456789012", token=op, method="DELETE"))[0] == 204
    status, answer, _ = await srv.post("/v1/accounts/123456789012", token=op, method="DELETE")
    assert (status, answer["error"]) == (404, "not_found")


@pytest.mark.parametrize(
    ("body", "path"),
    [
        ({"id": "12345", "role_arn": ROLE, "regions": ["eu-west-1"]}, "$.id"),
        (
            {"id": "123456789012", "role_arn": "arn:aws:iam::1:role/x", "regions": ["eu-west-1"]},
            "$.role_arn",
        ),
        (
            {
                "id": "123456789012",
                "role_arn": "arn:aws:iam::210987654321:role/x",
                "regions": ["eu-west-1"],
            },
            "$.role_arn",
        ),
        ({"id": "123456789012", "role_arn": ROLE, "regions": []}, "$.regions"),
        ({"id": "123456789012", "role_arn": ROLE, "regions": ["mars-1"]}, "$.regions"),
        ({"id": "123456789012", "role_arn": ROLE, "regions": "eu-west-1"}, "$.regions"),
        ({"id": "123456789012", "role_arn": ROLE, "regions": [5]}, "$.regions[0]"),
        ({"id": "123456789012", "role_arn": ROLE, "regions": ["eu-west-1"] * 31}, "$.regions"),
        (
            {
                "id": "123456789012",
                "role_arn": ROLE,
                "regions": ["eu-west-1"],
                "external_id": "a b",
            },
            "$.external_id",
        ),
        (
            {"id": "123456789012", "role_arn": ROLE, "regions": ["eu-west-1"], "name": "x\ny"},
            "$.name",
        ),
        ({"id": "123456789012", "role_arn": ROLE}, "$"),
        ({"id": 123456789012, "role_arn": ROLE, "regions": ["eu-west-1"]}, "$.id"),
        ({"id": "123456789012", "role_arn": ROLE, "regions": ["eu-west-1"], "x": 1}, None),
        ({"id": "123456789012", "role_arn": ROLE + "x" * 3000, "regions": ["eu-west-1"]}, None),
        ({"id": "12345678901\u0662", "role_arn": ROLE, "regions": ["eu-west-1"]}, "$.id"),
        ([1, 2], "$"),
    ],
)
async def test_bad_accounts_get_a_precise_400(
    srv: Server, client: aioredis.Redis, keys: Keys, body: Any, path: str | None
) -> None:
    op = await srv.token("op", (), operator=True)
    status, answer, _ = await srv.post("/v1/accounts", body, token=op)
    assert status == 400, answer
    assert answer["error"] == "invalid"
    if path is not None:
        assert answer["path"] == path, answer
    assert await AccountStore(client, keys).all() == []


async def test_hostile_account_requests(srv: Server, client: aioredis.Redis, keys: Keys) -> None:
    op = await srv.token("op", (), operator=True)
    agent = await srv.token("edge", ("cluster.*",))
    good = {"id": "123456789012", "role_arn": ROLE, "regions": ["eu-west-1"]}
    assert (await srv.post("/v1/accounts", good))[0] == 401
    assert (await srv.post("/v1/accounts", good, token="spk_forged"))[0] == 401
    assert (await srv.post("/v1/accounts", good, token=agent))[0] == 403
    assert (await srv.post("/v1/accounts", token=agent, method="GET"))[0] == 403
    assert (await srv.post("/v1/accounts/123456789012", token=agent, method="DELETE"))[0] == 403
    json_ct = {"Content-Type": "application/json"}
    status, body, _ = await srv.post("/v1/accounts", data=b"{not json", token=op, headers=json_ct)
    assert (status, body["error"]) == (400, "malformed")
    assert (await srv.post("/v1/accounts", data=b"x" * (65 * 1024), token=op, headers=json_ct))[
        0
    ] == 413
    deep = b"[" * 10_000 + b"]" * 10_000
    assert (await srv.post("/v1/accounts", data=deep, token=op, headers=json_ct))[0] == 400
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert (await srv.post("/v1/accounts", data=b"a=b", token=op, headers=form))[0] == 415
    for bad in ("..%2F..%2Fx", "%00", "1" * 200, "*"):
        status, _, _ = await srv.post(f"/v1/accounts/{bad}", token=op, method="DELETE")
        assert status == 404, bad
    assert (await srv.post("/v1/accounts", good, token=op))[0] == 201
    assert len(await AccountStore(client, keys).all()) == 1


def _cli(env: dict[str, str], repo_root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamproc", *args],
        env=env,
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_accounts(
    redis_url: str,
    keys: Keys,
    repo_root: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    overrides = {"REDIS_URL": redis_url, "STREAMPROC_PREFIX": keys.prefix}
    env = {**os.environ, **overrides}
    add = _cli(
        env,
        repo_root,
        *("accounts", "add", "123456789012", "--role-arn", ROLE),
        *("--regions", "eu-west-1", "us-east-1", "--external-id", "s3cr3t-x", "--name", "prod"),
    )
    assert add.returncode == 0, add.stderr
    assert "s3cr3t" not in add.stdout + add.stderr
    listed = _cli(env, repo_root, "accounts", "list")
    assert listed.returncode == 0
    assert "123456789012" in listed.stdout
    assert "s3cr3t" not in listed.stdout
    [row] = [
        orjson.loads(x)
        for x in _cli(env, repo_root, "accounts", "list", "--json").stdout.splitlines()
    ]
    assert row["external_id"] == "set"
    assert row["regions"] == ["eu-west-1", "us-east-1"]
    for bad in (
        ("12", "--role-arn", ROLE, "--regions", "eu-west-1"),
        ("123456789012", "--role-arn", "nope", "--regions", "eu-west-1"),
        ("123456789012", "--role-arn", ROLE, "--regions", "eu west 1;rm"),
        ("123456789012", "--role-arn", ROLE, "--regions", "eu-west-1", "--name", "a\x1bb"),
    ):
        # In this process: argument checking, one ``python -m`` start each would add nothing.
        out = cli_in_process(monkeypatch, capsys, overrides, "accounts", "add", *bad)
        assert out.returncode == 2, (bad, out.stderr)
        assert "Traceback" not in out.stderr
    assert _cli(env, repo_root, "accounts", "remove", "123456789012").returncode == 0
    gone = cli_in_process(monkeypatch, capsys, overrides, "accounts", "remove", "123456789012")
    assert gone.returncode == 1
    assert "no account" in gone.stderr
