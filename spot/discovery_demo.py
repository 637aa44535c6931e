"""``streamproc aws-demo``: the AWS that ``make run`` shows discovery on, when there is no other.

``streamproc up`` runs it as a role (``spot.discovery.UP_ROLE``). When
``STREAMPROC_AWS_ENDPOINT_URL`` is ``DEMO_ENDPOINT`` (``make run`` sets it unless the variable
is set, even empty) and nothing listens there, it starts a moto server on that address, seeds
it — a demo account's role, an EKS cluster and a few EC2 instances in two regions, some tagged
with the cluster's name, with CPU figures in CloudWatch — registers the account
(``streamproc accounts``) and publishes one ``tick.discovery`` so the first scan runs at once
instead of at the next five-minute mark. Otherwise it does nothing. Either way it stays up until
SIGTERM/SIGINT, because ``up`` stops every role when one ends.

Worker monitoring (docs/workers.md): it also starts three instances tagged
``streamproc:worker=true`` in the base credentials' own account (``DEMO_WORKER_REGION``), runs
the workers discovery once they exist (the consume role's startup discovery may have looked
before), and while it runs puts their CPU and memory into CloudWatch every
``DEMO_METRICS_EVERY_S``: one stays above 90 % CPU (an alert), one swings across the threshold
(alerts and recoveries), one is idle. ``make run`` polls them every 15 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import structlog

__all__ = (
    "DEMO_ACCOUNT",
    "DEMO_ENDPOINT",
    "DEMO_REGIONS",
    "DEMO_WORKER_REGION",
    "put_worker_metrics",
    "register",
    "seed",
    "seed_workers",
)

log = structlog.get_logger("spot.demo")

DEMO_ENDPOINT = "http://127.0.0.1:4566"
DEMO_ACCOUNT = "111122223333"
DEMO_ROLE = f"arn:aws:iam::{DEMO_ACCOUNT}:role/streamproc-discovery"
DEMO_REGIONS = ("eu-west-1", "us-east-1")
DEMO_CLUSTER = "demo-cluster"
#: The demo workers' region (the default ``STREAMPROC_AWS_REGION``, which discovery searches).
DEMO_WORKER_REGION = "us-east-1"
DEMO_METRICS_EVERY_S = 15.0

_TRUST = (
    '{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Principal":'
    '{"AWS":"*"},"Action":"sts:AssumeRole"}]}'
)


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def seed(endpoint: str) -> dict[str, int]:
    """Create the demo's role, cluster and instances on the moto server at ``endpoint``
    (blocking). Returns instances created per region."""
    import boto3  # type: ignore[import-untyped]

    base = boto3.session.Session(aws_access_key_id="demo", aws_secret_access_key="demo")
    iam = base.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    with contextlib.suppress(iam.exceptions.EntityAlreadyExistsException):
        iam.create_role(RoleName="streamproc-discovery", AssumeRolePolicyDocument=_TRUST)
    creds = base.client("sts", endpoint_url=endpoint, region_name="us-east-1").assume_role(
        RoleArn=DEMO_ROLE, RoleSessionName="streamproc-demo-seed"
    )["Credentials"]
    session = boto3.session.Session(
        aws_access_key_id=creds["AccessKeyId"],
        aws_secret_access_key=creds["SecretAccessKey"],
        aws_session_token=creds["SessionToken"],
    )
    created: dict[str, int] = {}
    layout = {
        "eu-west-1": [("m5.large", 3, True), ("t3.medium", 1, False)],
        "us-east-1": [("c5.xlarge", 2, False)],
    }
    for region, groups in layout.items():
        ec2 = session.client("ec2", endpoint_url=endpoint, region_name=region)
        image = _image(ec2)
        ids: list[str] = []
        for itype, count, in_cluster in groups:
            tags = [{"Key": "Name", "Value": f"demo-{itype}"}]
            if in_cluster:
                tags.append({"Key": "eks:cluster-name", "Value": DEMO_CLUSTER})
            r = ec2.run_instances(
                ImageId=image,
                MinCount=count,
                MaxCount=count,
                InstanceType=itype,
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            )
            ids += [i["InstanceId"] for i in r["Instances"]]
        if any(in_cluster for _, _, in_cluster in groups):
            eks = session.client("eks", endpoint_url=endpoint, region_name=region)
            eks.create_cluster(
                name=DEMO_CLUSTER,
                version="1.30",
                roleArn=f"arn:aws:iam::{DEMO_ACCOUNT}:role/eks",
                resourcesVpcConfig={},
            )
        cw = session.client("cloudwatch", endpoint_url=endpoint, region_name=region)
        now = datetime.now(UTC)
        cw.put_metric_data(
            Namespace="AWS/EC2",
            MetricData=[
                {
                    "MetricName": "CPUUtilization",
                    "Dimensions": [{"Name": "InstanceId", "Value": iid}],
                    "Value": 10.0 + 7 * n,
                    "Timestamp": now,
                }
                for n, iid in enumerate(ids)
            ],
        )
        created[region] = len(ids)
    return created


def seed_workers(endpoint: str, region: str = DEMO_WORKER_REGION) -> list[str]:
    """Three instances tagged ``streamproc:worker=true`` with the base credentials
    (blocking); their ids."""
    import boto3

    ec2 = boto3.session.Session(aws_access_key_id="demo", aws_secret_access_key="demo").client(
        "ec2", endpoint_url=endpoint, region_name=region
    )
    image = _image(ec2)
    ids: list[str] = []
    for name in ("demo-worker-hot", "demo-worker-swing", "demo-worker-idle"):
        r = ec2.run_instances(
            ImageId=image,
            MinCount=1,
            MaxCount=1,
            InstanceType="m5.large",
            TagSpecifications=[
                {
                    "ResourceType": "instance",
                    "Tags": [
                        {"Key": "Name", "Value": name},
                        {"Key": "streamproc:worker", "Value": "true"},
                    ],
                }
            ],
        )
        ids.append(r["Instances"][0]["InstanceId"])
    return ids


def put_worker_metrics(
    endpoint: str, ids: list[str], step: int, region: str = DEMO_WORKER_REGION
) -> None:
    """CPU (AWS/EC2) and memory (CWAgent) of the demo workers for one step (blocking): the
    first ~95 % CPU, the second 60 % and 97 % in turns of four steps, the third idle."""
    import boto3

    cw = boto3.session.Session(aws_access_key_id="demo", aws_secret_access_key="demo").client(
        "cloudwatch", endpoint_url=endpoint, region_name=region
    )
    now = datetime.now(UTC)
    swing = 97.0 if step // 4 % 2 else 60.0
    figures = zip(
        ids, ((95.0 + step % 3, 70.0), (swing, 55.0), (3.0 + step % 2, 20.0)), strict=True
    )
    data = []
    for iid, (cpu, mem) in figures:
        dims = [{"Name": "InstanceId", "Value": iid}]
        data.append((("AWS/EC2", "CPUUtilization"), dims, cpu))
        data.append((("CWAgent", "mem_used_percent"), dims, mem))
    for ns in ("AWS/EC2", "CWAgent"):
        cw.put_metric_data(
            Namespace=ns,
            MetricData=[
                {"MetricName": m, "Dimensions": d, "Value": v, "Timestamp": now}
                for (n, m), d, v in data
                if n == ns
            ],
        )


async def _workers(cfg: Any, app: Any, endpoint: str, ids: list[str]) -> None:
    """Import the demo workers, then keep their metrics coming (until cancelled)."""
    import os

    import workers
    from streamproc.cli import open_redis
    from streamproc.keys import Keys
    from streamproc.producer import Producer
    from workers.discover import discover

    workers.configure_from_env(os.environ)
    client, _ = await open_redis(cfg, wait_s=30, role=True)
    try:
        keys = Keys(cfg.redis.key_prefix)
        step = 0
        await asyncio.to_thread(put_worker_metrics, endpoint, ids, step)
        found = await discover(client, keys, Producer(client, app.codec, keys, cfg.producer))
        log.info("demo_workers", imported=found.imported, known=found.known, errors=found.errors)
        while True:
            await asyncio.sleep(DEMO_METRICS_EVERY_S)
            step += 1
            try:
                await asyncio.to_thread(put_worker_metrics, endpoint, ids, step)
            except Exception as e:  # the demo goes on without fresh figures
                log.warning("demo_metrics_failed", error=str(e))
    finally:
        await client.aclose()


async def _register_and_tick(cfg: Any, app: Any) -> None:
    from schemas.ticks import DiscoveryTick
    from spot.aws import AccountStore, new_account
    from streamproc.cli import open_redis
    from streamproc.event import derived_id
    from streamproc.keys import Keys
    from streamproc.producer import Producer

    client, _ = await open_redis(cfg, wait_s=30, role=True)
    try:
        keys = Keys(cfg.redis.key_prefix)
        await AccountStore(client, keys).add(
            new_account(id=DEMO_ACCOUNT, role_arn=DEMO_ROLE, regions=DEMO_REGIONS, name="demo")
        )
        now = datetime.now(UTC)
        tick = DiscoveryTick(
            id=derived_id("aws-demo", now.isoformat()),
            source="aws-demo",
            schedule="discovery",
            scheduled_for=now,
        )
        await Producer(client, app.codec, keys, cfg.producer).publish(tick)
    finally:
        await client.aclose()


def _cmd_aws_demo(args: argparse.Namespace, cfg: Any, app: Any) -> int:
    from spot import aws_settings
    from streamproc.cli import run_async

    endpoint = aws_settings().endpoint_url.rstrip("/")
    server: Any = None
    worker_ids: list[str] = []
    if endpoint == DEMO_ENDPOINT:
        parts = urlsplit(endpoint)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        if _listening(host, port):
            print(f"aws-demo: something already listens on {endpoint}; using it", flush=True)
        else:
            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request
            server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
            server.start()
            created = seed(endpoint)
            worker_ids = seed_workers(endpoint)
            print(
                f"aws-demo: moto on {endpoint}, account {DEMO_ACCOUNT} with "
                + ", ".join(f"{n} instances in {r}" for r, n in created.items())
                + f"; EKS cluster {DEMO_CLUSTER!r}. Watch: streamproc tail inventory",
                flush=True,
            )
            print(
                f"aws-demo: {len(worker_ids)} worker instances tagged streamproc:worker in "
                f"{DEMO_WORKER_REGION}. Watch: streamproc workers list",
                flush=True,
            )

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        metrics: asyncio.Task[None] | None = None
        if server is not None:
            await _register_and_tick(cfg, app)
            metrics = asyncio.create_task(_workers(cfg, app, endpoint, worker_ids))
        await stop.wait()
        if metrics is not None:
            metrics.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await metrics
        return 0

    try:
        return run_async(main())
    finally:
        if server is not None:
            server.stop()
        sys.stdout.flush()


def register(sub: Any) -> None:
    d = sub.add_parser(
        "aws-demo",
        help="serve a seeded moto server for the demo (when the AWS endpoint is the demo one)",
    )
    d.set_defaults(func=_cmd_aws_demo, role=True)


def _image(ec2: Any) -> str:
    """An AMI the demo's instances run: moto's first built-in one, asked for by id (a
    DescribeImages without ids makes moto serialize all ~1,300 of them, ~2 s a call)."""
    try:
        from moto.ec2.models.amis import AMIS

        ids = [str(AMIS[0]["ami_id"])]
    except (ImportError, IndexError, KeyError):
        ids = []
    if ids:
        found = ec2.describe_images(ImageIds=ids)["Images"]
        if found:
            return str(found[0]["ImageId"])
    return str(ec2.describe_images(MaxResults=5)["Images"][0]["ImageId"])
