"""Discovery's data path for one account and region: what AWS lists, how it differs from the
stored inventory, the ``inventory.*`` events that difference makes, and the fenced write.

Keys (all under ``<p>:state:``):

| key | type | what |
|---|---|---|
| ``{aws}:inventory:<account>:<region>`` | hash | instance id → ``Instance`` JSON |
| ``{aws}:clusters:<account>:<region>`` | hash | EKS cluster name → ``EksCluster`` JSON |
| ``{aws}:scan-lease:<account>`` | string | ``<consumer>/<tick id>`` while a replica scans it |
| ``aws:scan:<account>`` | hash | the latest scan: ``ok_at``, ``duration_s``, ``error`` |

The first three share the hash tag ``{aws}``: the fenced write (``write_inventory``) checks the
lease and writes both hashes in one script, also on Redis Cluster (one slot for every
account's inventory: discovery writes it every few minutes). Before 2026-12 they were
``<p>:state:aws:…``: on one Redis, ``RENAME`` each ``inventory:…`` and ``clusters:…`` hash to
its new name before the first scan; otherwise that scan finds every instance new (one
``inventory.*`` event each) and the optimizer sees no inventory until it ran.

The AWS calls here are blocking functions of a boto3 client; ``spot.discovery`` runs them with
``Aws.call`` (a thread, the breaker, the error classes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import redis.asyncio as aioredis

from schemas.inventory import (
    ClusterAdded,
    ClusterChanged,
    ClusterRemoved,
    EksCluster,
    Instance,
    InstanceAdded,
    InstanceChanged,
    InstanceRemoved,
)
from streamproc._lua import Lua
from streamproc.event import Event, derived_id
from streamproc.keys import Keys

__all__ = (
    "Diff",
    "cpu_averages",
    "describe_clusters",
    "describe_instances",
    "diff_clusters",
    "diff_instances",
    "instance_of",
    "inventory_keys",
    "inventory_prefix",
    "lease_key",
    "load",
    "status_key",
    "write",
)

#: What makes an instance "changed" (other fields, e.g. CPU, are updated silently).
INSTANCE_FIELDS = ("state", "instance_type", "tags")
CLUSTER_FIELDS = ("status", "version")
#: GetMetricData takes at most 500 queries per call.
_CW_BATCH = 500
_ENC = msgspec.json.Encoder()
_INSTANCE = msgspec.json.Decoder(Instance)
_CLUSTER = msgspec.json.Decoder(EksCluster)


# ---------------------------------------------------------------------- keys


#: The hash tag of the keys the fenced write touches together.
_TAG = "{aws}"


def inventory_keys(keys: Keys, account_id: str, region: str) -> tuple[str, str]:
    """(instances hash, clusters hash) of one account and region."""
    return (
        keys.state(_TAG, "inventory", account_id, region),
        keys.state(_TAG, "clusters", account_id, region),
    )


def inventory_prefix(keys: Keys) -> str:
    """Every account's and region's instances hash starts with this
    (``inventory:<account>:<region>``)."""
    return keys.state(_TAG, "inventory", "")


def lease_key(keys: Keys, account_id: str) -> str:
    return keys.state(_TAG, "scan-lease", account_id)


def status_key(keys: Keys, account_id: str) -> str:
    return keys.state("aws", "scan", account_id)


# ---------------------------------------------------------------------- AWS (blocking)


def _cluster_of(tags: Mapping[str, str]) -> str:
    for k in ("eks:cluster-name", "aws:eks:cluster-name"):
        if tags.get(k):
            return tags[k]
    for k in tags:
        if k.startswith("kubernetes.io/cluster/"):
            return k.removeprefix("kubernetes.io/cluster/")
    return ""


def _instance(raw: Mapping[str, Any]) -> Instance:
    tags = {str(t.get("Key", "")): str(t.get("Value", "")) for t in raw.get("Tags") or ()}
    launched = raw.get("LaunchTime")
    return Instance(
        instance_id=str(raw["InstanceId"]),
        instance_type=str(raw.get("InstanceType", "")),
        state=str((raw.get("State") or {}).get("Name", "")),
        availability_zone=str((raw.get("Placement") or {}).get("AvailabilityZone", "")),
        lifecycle="spot" if raw.get("InstanceLifecycle") == "spot" else "on-demand",
        tags=tags,
        cluster=_cluster_of(tags),
        launch_time=launched.isoformat() if isinstance(launched, datetime) else str(launched or ""),
    )


def describe_instances(ec2: Any, page_size: int = 1000) -> list[Instance]:
    """Every instance of the region (DescribeInstances, all pages)."""
    out: list[Instance] = []
    pages = ec2.get_paginator("describe_instances").paginate(
        PaginationConfig={"PageSize": page_size}
    )
    for page in pages:
        for reservation in page.get("Reservations", ()):
            out.extend(_instance(i) for i in reservation.get("Instances", ()))
    return out


def describe_clusters(eks: Any) -> list[EksCluster]:
    """Every EKS cluster of the region (ListClusters, then DescribeCluster of each)."""
    out: list[EksCluster] = []
    for page in eks.get_paginator("list_clusters").paginate():
        for name in page.get("clusters", ()):
            c = eks.describe_cluster(name=name)["cluster"]
            out.append(
                EksCluster(
                    name=str(c.get("name", name)),
                    status=str(c.get("status", "")),
                    version=str(c.get("version", "")),
                    arn=str(c.get("arn", "")),
                )
            )
    return out


def cpu_averages(
    cloudwatch: Any, instance_ids: Sequence[str], *, window_s: int, now: datetime | None = None
) -> dict[str, float]:
    """Average CPUUtilization of each instance over the last ``window_s`` (those with data)."""
    end = now or datetime.now(UTC)
    start = end - timedelta(seconds=window_s)
    period = max(60, window_s - window_s % 60)
    out: dict[str, float] = {}
    for first in range(0, len(instance_ids), _CW_BATCH):
        batch = instance_ids[first : first + _CW_BATCH]
        queries = [
            {
                "Id": f"m{n}",
                "MetricStat": {
                    "Metric": {
                        "Namespace": "AWS/EC2",
                        "MetricName": "CPUUtilization",
                        "Dimensions": [{"Name": "InstanceId", "Value": iid}],
                    },
                    "Period": period,
                    "Stat": "Average",
                },
                "ReturnData": True,
            }
            for n, iid in enumerate(batch)
        ]
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {
                "MetricDataQueries": queries,
                "StartTime": start,
                "EndTime": end,
            }
            if token:
                kwargs["NextToken"] = token
            answer = cloudwatch.get_metric_data(**kwargs)
            for result in answer.get("MetricDataResults", ()):
                values = result.get("Values") or ()
                if values:
                    iid = batch[int(str(result["Id"])[1:])]
                    out[iid] = round(sum(values) / len(values), 2)
            token = answer.get("NextToken")
            if not token:
                break
    return out


# ---------------------------------------------------------------------- diff


@dataclass
class Diff:
    """A region's changes: events to publish, entries to write and to delete."""

    events: list[Event] = field(default_factory=list)
    upsert: dict[str, bytes] = field(default_factory=dict)
    delete: list[str] = field(default_factory=list)
    added: int = 0
    changed: int = 0
    removed: int = 0


def _where(cause_id: str, account_id: str, region: str) -> dict[str, Any]:
    return {"account_id": account_id, "region": region, "cause_id": cause_id, "key": account_id}


def instance_of(event: Event) -> Instance | None:
    """The instance an ``inventory.instance_*`` event is about (after the change)."""
    if isinstance(event, InstanceAdded):
        return event.instance
    if isinstance(event, InstanceChanged):
        return event.after
    if isinstance(event, InstanceRemoved):
        return event.before
    return None


def _digest(obj: Any, fields: Iterable[str]) -> str:
    body = _ENC.encode({f: getattr(obj, f) for f in fields})
    return hashlib.sha256(body).hexdigest()[:16]


def _changed(before: Any, after: Any, fields: Iterable[str]) -> tuple[str, ...]:
    return tuple(f for f in fields if getattr(before, f) != getattr(after, f))


def diff_instances(
    before: Mapping[str, Instance],
    found: Iterable[Instance],
    *,
    cause_id: str,
    account_id: str,
    region: str,
) -> Diff:
    """What changed since ``before``. Terminated instances leave the inventory (AWS lists them
    for about an hour after); an instance no longer listed at all is removed as ``gone``."""
    d = Diff()
    where = _where(cause_id, account_id, region)
    seen: set[str] = set()

    def eid(resource: str, change: str) -> str:
        return derived_id(cause_id, f"inventory/{account_id}/{region}/{resource}/{change}")

    for inst in found:
        iid = inst.instance_id
        seen.add(iid)
        old = before.get(iid)
        if inst.state == "terminated":
            if old is not None:
                d.events.append(
                    InstanceRemoved(
                        id=eid(iid, "removed"),
                        instance_id=iid,
                        reason="terminated",
                        before=old,
                        **where,
                    )
                )
                d.delete.append(iid)
                d.removed += 1
            continue
        if old is None:
            d.events.append(InstanceAdded(id=eid(iid, "added"), instance=inst, **where))
            d.added += 1
        else:
            fields = _changed(old, inst, INSTANCE_FIELDS)
            if fields:
                change = f"changed/{_digest(inst, INSTANCE_FIELDS)}"
                d.events.append(
                    InstanceChanged(
                        id=eid(iid, change),
                        instance_id=iid,
                        changed=fields,
                        before=old,
                        after=inst,
                        **where,
                    )
                )
                d.changed += 1
            if old == inst:
                continue
        d.upsert[iid] = _ENC.encode(inst)
    for iid, old in before.items():
        if iid not in seen:
            d.events.append(
                InstanceRemoved(
                    id=eid(iid, "removed"), instance_id=iid, reason="gone", before=old, **where
                )
            )
            d.delete.append(iid)
            d.removed += 1
    return d


def diff_clusters(
    before: Mapping[str, EksCluster],
    found: Iterable[EksCluster],
    *,
    cause_id: str,
    account_id: str,
    region: str,
) -> Diff:
    d = Diff()
    where = _where(cause_id, account_id, region)
    seen: set[str] = set()

    def eid(name: str, change: str) -> str:
        return derived_id(cause_id, f"inventory/{account_id}/{region}/eks/{name}/{change}")

    for c in found:
        seen.add(c.name)
        old = before.get(c.name)
        if old is None:
            d.events.append(ClusterAdded(id=eid(c.name, "added"), cluster=c, **where))
            d.added += 1
        else:
            fields = _changed(old, c, CLUSTER_FIELDS)
            if fields:
                change = f"changed/{_digest(c, CLUSTER_FIELDS)}"
                d.events.append(
                    ClusterChanged(
                        id=eid(c.name, change),
                        name=c.name,
                        changed=fields,
                        before=old,
                        after=c,
                        **where,
                    )
                )
                d.changed += 1
            if old == c:
                continue
        d.upsert[c.name] = _ENC.encode(c)
    for name, old in before.items():
        if name not in seen:
            d.events.append(ClusterRemoved(id=eid(name, "removed"), name=name, before=old, **where))
            d.delete.append(name)
            d.removed += 1
    return d


# ---------------------------------------------------------------------- Redis


async def load(
    client: aioredis.Redis, keys: Keys, account_id: str, region: str
) -> tuple[dict[str, Instance], dict[str, EksCluster]]:
    """The stored inventory of one account and region (entries that do not decode are left
    out: the next write replaces them)."""
    ikey, ckey = inventory_keys(keys, account_id, region)
    async with client.pipeline(transaction=False) as pipe:
        pipe.hgetall(ikey)
        pipe.hgetall(ckey)
        raw_i, raw_c = await pipe.execute()
    instances: dict[str, Instance] = {}
    for k, v in raw_i.items():
        try:
            instances[k.decode()] = _INSTANCE.decode(v)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    clusters: dict[str, EksCluster] = {}
    for k, v in raw_c.items():
        try:
            clusters[k.decode()] = _CLUSTER.decode(v)
        except (msgspec.DecodeError, UnicodeDecodeError):
            continue
    return instances, clusters


# KEYS: lease, instances hash, clusters hash.
# ARGV: token, lease ttl ms, n instance upserts, n instance deletes, n cluster upserts,
#       n cluster deletes, then (field, value) pairs / fields in that order.
# Writes only while the lease is this scan's (taken again if it expired and nobody took it):
# 1, else 0 (nothing written).
_WRITE = Lua("""
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] then
  if holder then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
local i = 7
local function upsert(key, n)
  for _ = 1, n do redis.call('HSET', key, ARGV[i], ARGV[i + 1]); i = i + 2 end
end
local function delete(key, n)
  for _ = 1, n do redis.call('HDEL', key, ARGV[i]); i = i + 1 end
end
upsert(KEYS[2], tonumber(ARGV[3]))
delete(KEYS[2], tonumber(ARGV[4]))
upsert(KEYS[3], tonumber(ARGV[5]))
delete(KEYS[3], tonumber(ARGV[6]))
return 1
""")


async def write(
    client: aioredis.Redis,
    keys: Keys,
    account_id: str,
    region: str,
    token: str,
    ttl_ms: int,
    instances: Diff,
    clusters: Diff,
) -> bool:
    """Apply both diffs at once, fenced by the account's scan lease; False when another
    replica holds it now (nothing written). A lease that expired unnoticed (a stalled event
    loop) and that nobody took is taken again."""
    args: list[Any] = [
        token,
        ttl_ms,
        len(instances.upsert),
        len(instances.delete),
        len(clusters.upsert),
        len(clusters.delete),
    ]
    for d in (instances, clusters):
        for k, v in d.upsert.items():
            args += (k, v)
        args += d.delete
    ikey, ckey = inventory_keys(keys, account_id, region)
    return bool(await _WRITE(client, [lease_key(keys, account_id), ikey, ckey], args))
