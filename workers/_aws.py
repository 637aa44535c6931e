"""The AWS calls of worker monitoring: instance state, CPU and memory, tagged instances.

A worker with an ``account_id`` is reached through that registered account's role
(``spot.aws.Aws.call``: breaker per service/account/region, CallTransient/CallPermanent); an
unregistered account is a ``CallPermanent``. A worker without one is in the account of the
base credentials: the same guarded call with ``account=None`` (breaker
``aws:<service>:self:<region>``), with a client built from boto3's default chain.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import redis.asyncio as aioredis

from spot.aws import AccountStore, Aws, AwsSettings
from streamproc.keys import Keys
from streamproc.outbound import CallPermanent

__all__ = ("NOT_FOUND", "Tagged", "WorkerAws", "instance_state", "tagged_instances", "usage")

T = TypeVar("T")

#: ``instance_state`` when EC2 does not know the instance.
NOT_FOUND = "not-found"


class WorkerAws:
    def __init__(self, settings: AwsSettings) -> None:
        self.settings = settings
        self.aws = Aws(settings)

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
        BreakerOpen otherwise. ``account_id`` "" = the base credentials' own account."""
        account = None
        if account_id:
            account = await AccountStore(redis, keys).get(account_id)
            if account is None:
                raise CallPermanent(
                    f"account {account_id} is not registered (streamproc accounts add)"
                )
        return await self.aws.call(redis, keys, account, service, region, fn)


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
