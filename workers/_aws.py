"""The AWS calls of worker monitoring: instance state, CPU and memory, tagged instances.

A worker with an ``account_id`` is reached through that registered account's role
(``spot.aws.Aws.call``: breaker per service/account/region, CallTransient/CallPermanent); an
unregistered account is a ``CallPermanent``. A worker without one is in the account of the
base credentials: the same guarded call (breaker ``aws:<service>:self:<region>``), with a client
built from boto3's default chain. ``spot.aws.Aws`` only calls through assumed roles; this is
the piece it lacks (see the report of issue 14).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import redis.asyncio as aioredis

from spot.aws import AccountStore, Aws, AwsSettings
from streamproc.breaker import Breaker
from streamproc.keys import Keys
from streamproc.outbound import CallPermanent, aws_failure, guarded

__all__ = ("NOT_FOUND", "Tagged", "WorkerAws", "instance_state", "tagged_instances", "usage")

T = TypeVar("T")

#: ``instance_state`` when EC2 does not know the instance.
NOT_FOUND = "not-found"


class WorkerAws:
    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self.aws = Aws(settings)
        self._lock = threading.Lock()
        self._clients: dict[tuple[str, str], Any] = {}

    def _base_client(self, service: str, region: str) -> Any:
        """A client with the base credentials (blocking: run in a thread)."""
        with self._lock:
            found = self._clients.get((service, region))
        if found is None:
            import boto3  # type: ignore[import-untyped]
            from botocore.config import Config  # type: ignore[import-untyped]

            s = self.settings
            found = boto3.session.Session().client(
                service,
                region_name=region,
                endpoint_url=s.endpoint_url or None,
                config=Config(
                    connect_timeout=s.connect_timeout_s,
                    read_timeout=s.read_timeout_s,
                    retries={"total_max_attempts": 1, "mode": "standard"},
                ),
            )
            with self._lock:
                self._clients[(service, region)] = found
        return found

    async def call(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        account_id: str,
        service: str,
        region: str,
        fn: Callable[[Any], T],
    ) -> T:
        """``fn(client)`` in a thread, behind the breaker; CallTransient, CallPermanent or
        BreakerOpen otherwise."""
        if account_id:
            account = await AccountStore(redis, keys).get(account_id)
            if account is None:
                raise CallPermanent(
                    f"account {account_id} is not registered (streamproc accounts add)"
                )
            return await self.aws.call(redis, keys, account, service, region, fn)
        s = self.settings
        breaker = Breaker(
            redis,
            keys,
            f"aws:{service}:self:{region}",
            threshold=s.breaker_threshold,
            cooldown_s=s.breaker_cooldown_s,
            probe_s=s.connect_timeout_s + s.read_timeout_s + 5,
        )

        async def attempt() -> T:
            try:
                return await asyncio.to_thread(lambda: fn(self._base_client(service, region)))
            except CallPermanent:
                raise
            except Exception as e:
                raise aws_failure(e, f"{service} self/{region}") from e

        return await guarded(breaker, attempt)


def instance_state(client: Any, instance_id: str) -> str:
    """The EC2 state name of the instance (``running``, ``stopped`` ...) or ``NOT_FOUND``."""
    import botocore.exceptions as bx  # type: ignore[import-untyped]

    try:
        r = client.describe_instance_status(InstanceIds=[instance_id], IncludeAllInstances=True)
    except bx.ClientError as e:
        if e.response.get("Error", {}).get("Code") == "InvalidInstanceID.NotFound":
            return NOT_FOUND
        raise
    statuses = r.get("InstanceStatuses") or []
    if not statuses:  # terminated long ago: EC2 stops listing it
        return NOT_FOUND
    return str(statuses[0]["InstanceState"]["Name"])


def usage(
    client: Any, instance_id: str, *, window_s: int, now: datetime
) -> tuple[float | None, float | None]:
    """Average CPU (AWS/EC2 CPUUtilization) and memory (CWAgent mem_used_percent, dimension
    InstanceId) over the last ``window_s`` (rounded up to whole minutes); None without data."""
    period = max(60, -(-window_s // 60) * 60)
    dims = [{"Name": "InstanceId", "Value": instance_id}]
    queries = [
        {
            "Id": qid,
            "MetricStat": {
                "Metric": {"Namespace": ns, "MetricName": metric, "Dimensions": dims},
                "Period": period,
                "Stat": "Average",
            },
            "ReturnData": True,
        }
        for qid, ns, metric in (
            ("cpu", "AWS/EC2", "CPUUtilization"),
            ("mem", "CWAgent", "mem_used_percent"),
        )
    ]
    # EndTime one second on: a point stamped within the current second counts (CloudWatch
    # and moto compare whole seconds, end excluded).
    r = client.get_metric_data(
        MetricDataQueries=queries,
        StartTime=now - timedelta(seconds=period),
        EndTime=now + timedelta(seconds=1),
    )
    found: dict[str, float | None] = {"cpu": None, "mem": None}
    for result in r.get("MetricDataResults", []):
        values = [float(v) for v in result.get("Values", [])]
        if values and result.get("Id") in found:
            found[result["Id"]] = sum(values) / len(values)
    return found["cpu"], found["mem"]


class Tagged:
    """An instance found by discovery."""

    __slots__ = ("instance_id", "launch_time", "name", "state")

    def __init__(self, instance_id: str, state: str, launch_time: str, name: str) -> None:
        self.instance_id, self.state = instance_id, state
        self.launch_time, self.name = launch_time, name


def tagged_instances(client: Any, tag_key: str) -> list[Tagged]:
    """Every non-terminated instance carrying the tag key (all pages)."""
    out: list[Tagged] = []
    pages = client.get_paginator("describe_instances").paginate(
        Filters=[
            {"Name": "tag-key", "Values": [tag_key]},
            {
                "Name": "instance-state-name",
                "Values": ["pending", "running", "stopping", "stopped"],
            },
        ],
        PaginationConfig={"PageSize": 1000},
    )
    for page in pages:
        for reservation in page.get("Reservations", []):
            for i in reservation.get("Instances", []):
                tags = {t.get("Key"): t.get("Value", "") for t in i.get("Tags", [])}
                launched = i.get("LaunchTime")
                out.append(
                    Tagged(
                        instance_id=i["InstanceId"],
                        state=i.get("State", {}).get("Name", ""),
                        launch_time=launched.isoformat()
                        if isinstance(launched, datetime)
                        else str(launched or ""),
                        name=str(tags.get("Name", "")),
                    )
                )
    return out
