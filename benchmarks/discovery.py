"""Discovery of one AWS account x 3 regions x 5,000 instances on a moto server.

A moto server runs in a process of its own on 127.0.0.1 (``python -m moto.server``); the
instances are created with boto3 ``run_instances`` (``MaxCount`` 1,000 per call), as the
account's assumed role, a fifth of them tagged with an EKS cluster name, plus one EKS cluster
per region. Redis is an embedded one (unless REDIS_URL is set). Then the ``discovery``
handler (``spot.discovery.scan``) runs in this process, as the consumer would run it, on:

- scan 1   an empty inventory: every instance is ``inventory.instance_added``
- scan 2   nothing changed: no event
- scan 3   ``--churn`` instances terminated and as many added: exactly those events

Measured: wall time of each scan (and of its AWS calls: DescribeInstances, EKS, CloudWatch
GetMetricData, summed over regions), the Redis memory of the inventory (``MEMORY USAGE`` of
the three inventory hashes, ``SAMPLES 0``: every field) and of the ``inventory`` stream.
Checked, not assumed: the event counts of every scan and the inventory's size.

Usage: .venv/bin/python benchmarks/discovery.py [--instances 5000] [--regions 3]
       [--churn 100] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from schemas import REGISTRY
from schemas.ticks import DiscoveryTick
from spot import _inventory as inv
from spot import discovery
from spot.aws import AccountStore, AwsSettings, new_account
from streamproc import Codec, Keys, Producer, ProducerSettings
from streamproc.concern import Context
from streamproc.event import derived_id
from streamproc.settings import RedisSettings

ACCOUNT = "444455556666"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/discovery-bench"
ALL_REGIONS = ("eu-west-1", "us-east-1", "ap-southeast-2")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_port(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


class _Account:
    def __init__(self, endpoint: str) -> None:
        import boto3  # type: ignore[import-untyped]

        creds = boto3.client("sts", endpoint_url=endpoint, region_name="us-east-1").assume_role(
            RoleArn=ROLE, RoleSessionName="bench-setup"
        )["Credentials"]
        self.endpoint = endpoint
        self.session = boto3.session.Session(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )

    def client(self, service: str, region: str) -> Any:
        return self.session.client(service, endpoint_url=self.endpoint, region_name=region)

    def run(self, region: str, n: int) -> list[str]:
        ec2 = self.client("ec2", region)
        image = ec2.describe_images(MaxResults=5)["Images"][0]["ImageId"]
        ids: list[str] = []
        while len(ids) < n:
            count = min(1000, n - len(ids))
            tags = [{"Key": "Name", "Value": f"bench-{len(ids)}"}]
            if len(ids) % 5000 < 1000:  # a fifth in the cluster
                tags.append({"Key": "eks:cluster-name", "Value": "bench"})
            r = ec2.run_instances(
                ImageId=image,
                MinCount=count,
                MaxCount=count,
                InstanceType="m5.large",
                TagSpecifications=[{"ResourceType": "instance", "Tags": tags}],
            )
            ids += [i["InstanceId"] for i in r["Instances"]]
        return ids


def _timed_calls(timings: dict[str, float]) -> Callable[[], None]:
    """Sum the time of each kind of AWS call discovery makes (wrapping _inventory's)."""
    originals = {
        name: getattr(inv, name)
        for name in ("describe_instances", "describe_clusters", "cpu_averages")
    }

    def wrap(name: str, fn: Any) -> Any:
        def timed(*args: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                timings[name] += time.perf_counter() - t0

        return timed

    for name, fn in originals.items():
        setattr(inv, name, wrap(name, fn))

    def restore() -> None:
        for name, fn in originals.items():
            setattr(inv, name, fn)

    return restore


async def _scan(
    client: aioredis.Redis, producer: Producer, keys: Keys, n: int
) -> tuple[float, int, dict[str, float]]:
    when = datetime(2026, 12, 1, tzinfo=UTC).replace(minute=5 * n)
    tick = DiscoveryTick(
        id=derived_id("bench", when.isoformat()), schedule="discovery", scheduled_for=when
    )
    ctx = Context(
        topic="ticks",
        group="discovery",
        consumer="bench",
        entry_id="1-0",
        attempt=1,
        deliveries=1,
        redis=client,
        producer=producer,
        keys=keys,
        event_id=tick.id,
    )
    before = await client.xlen(keys.stream("inventory"))
    timings: dict[str, float] = defaultdict(float)
    restore = _timed_calls(timings)
    t0 = time.perf_counter()
    try:
        await discovery.scan(tick, ctx)
    finally:
        restore()
    wall = time.perf_counter() - t0
    return wall, await client.xlen(keys.stream("inventory")) - before, dict(timings)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    regions = ALL_REGIONS[: args.regions]
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_EC2_METADATA_DISABLED="true",
    )
    tmp = Path(tempfile.mkdtemp(prefix="sp-discovery-"))
    url = os.environ.get("REDIS_URL")
    redis_server = None
    if not url:
        from streamproc.embedded import EmbeddedRedis

        redis_server = EmbeddedRedis(tmp / "redis", appendonly=False).start()
        url = redis_server.url
    port = _free_port()
    moto = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    from streamproc.connection import connect

    client = connect(RedisSettings(url=url, key_prefix="bench"))
    keys = Keys("bench")
    try:
        await asyncio.to_thread(_wait_port, port)
        account = await asyncio.to_thread(_Account, endpoint)
        t0 = time.perf_counter()
        created: dict[str, list[str]] = {}
        for region in regions:
            created[region] = await asyncio.to_thread(account.run, region, args.instances)
            await asyncio.to_thread(
                account.client("eks", region).create_cluster,
                name="bench",
                version="1.30",
                roleArn=f"arn:aws:iam::{ACCOUNT}:role/eks",
                resourcesVpcConfig={},
            )
        setup_s = time.perf_counter() - t0
        total = args.instances * len(regions)
        print(
            f"created {total} instances in {len(regions)} region(s) in {setup_s:.1f}s", flush=True
        )

        discovery.use_settings(
            discovery.DiscoverySettings(lease_ttl_s=60.0),
            AwsSettings(endpoint_url=endpoint, read_timeout_s=300.0, connect_timeout_s=5.0),
        )
        await AccountStore(client, keys).add(
            new_account(id=ACCOUNT, role_arn=ROLE, regions=list(regions), name="bench")
        )
        producer = Producer(client, Codec(REGISTRY), keys, ProducerSettings())
        out: dict[str, Any] = {
            "instances": total,
            "regions": len(regions),
            "setup_s": round(setup_s, 1),
        }

        wall, events, calls = await _scan(client, producer, keys, 1)
        assert events == total + len(regions), (events, total)
        out["scan1"] = {"wall_s": round(wall, 2), "events": events, "calls_s": _round(calls)}
        print(f"scan 1 (empty inventory): {wall:.2f}s, {events} events, calls {_round(calls)}")

        memory = 0
        for region in regions:
            ikey, ckey = inv.inventory_keys(keys, ACCOUNT, region)
            assert await client.hlen(ikey) == args.instances
            memory += int(await client.memory_usage(ikey, samples=0) or 0)
            memory += int(await client.memory_usage(ckey, samples=0) or 0)
        stream_bytes = int(await client.memory_usage(keys.stream("inventory"), samples=0) or 0)
        out["inventory_bytes"] = memory
        out["inventory_bytes_per_instance"] = round(memory / total, 1)
        out["inventory_stream_bytes"] = stream_bytes
        print(
            f"inventory: {memory / 1e6:.2f} MB ({memory / total:.0f} B per instance); "
            f"inventory stream: {stream_bytes / 1e6:.2f} MB"
        )

        wall, events, calls = await _scan(client, producer, keys, 2)
        assert events == 0, events
        out["scan2"] = {"wall_s": round(wall, 2), "events": events, "calls_s": _round(calls)}
        print(f"scan 2 (no change): {wall:.2f}s, {events} events, calls {_round(calls)}")

        if args.churn:
            region = regions[0]
            ec2 = account.client("ec2", region)
            gone = created[region][: args.churn]
            for first in range(0, len(gone), 500):
                await asyncio.to_thread(
                    ec2.terminate_instances, InstanceIds=gone[first : first + 500]
                )
            await asyncio.to_thread(account.run, region, args.churn)
            wall, events, calls = await _scan(client, producer, keys, 3)
            assert events == 2 * args.churn, events
            out["scan3"] = {"wall_s": round(wall, 2), "events": events, "calls_s": _round(calls)}
            print(
                f"scan 3 ({args.churn} terminated, {args.churn} added): {wall:.2f}s, "
                f"{events} events, calls {_round(calls)}"
            )
        return out
    finally:
        await client.aclose()
        moto.terminate()
        await moto.wait()
        if redis_server is not None:
            redis_server.stop()


def _round(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--instances", type=int, default=5000, help="per region")
    p.add_argument("--regions", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--churn", type=int, default=100)
    p.add_argument("--quick", action="store_true", help="1 region x 500 instances, churn 20")
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.quick:
        a.instances, a.regions, a.churn = 500, 1, 20
    result = asyncio.run(main(a))
    print(json.dumps(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
