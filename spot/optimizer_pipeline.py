"""The optimizer's pipeline for one cluster (``optimizer.run``, run by ``consumers.tasks``).

1. **Inventory**: the cluster's instances as discovery stored them (every account and region,
   ``Instance.cluster`` = the cluster), running ones only.
2. **Candidate pools**: (instance type, AZ) for the policy's families (else the families the
   cluster runs) in every size it runs on demand, times the AZs it runs in.
3. **Risk per pool** (0..1): 1.0 while the pool is risky for this cluster (``schemas.risky_pools``:
   it reported a spot interruption of the pool in the last 6 h, or two clusters of two
   different agents did); else ``RISK_PER_INTERRUPTION`` per interruption of that pool
   in the last ``RISK_WINDOW_DAYS`` days (every client's), at most 0.9 — and below
   ``RISK_LIMIT`` when the pool's kept reports neither name this cluster nor meet that quorum.
4. **Decisions**: each running on-demand instance either ``convert`` to the cheapest pool of its
   size under ``RISK_LIMIT`` (its own AZ first) — while the cluster's spot share stays within
   the policy's ``max_spot_share`` — or ``keep``, with the reason. A type missing from the
   price table is never chosen and never claimed as saved.
5. **Apply** (only when the policy's ``dry_run`` is off): each Auto Scaling group holding
   converted instances gets a mixed-instances policy — its launch template, the chosen spot
   types and its current types as overrides, ``100 - max_spot_share`` % on demand above a base
   of 0, price-capacity-optimized spot. Setting it twice sets the same thing (a retried task
   is harmless).

Prices come from ``spot.prices``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

import msgspec
import redis.asyncio as aioredis

from schemas.inventory import Instance
from schemas.metrics import add_figures, day_of
from schemas.metrics import pool_interruptions_key as _pool_key
from schemas.risky_pools import REPORTS_KEPT_S, PoolReports, reports_key, risky_pool_key
from spot._inventory import inventory_prefix
from spot.aws import AccountStore, Aws
from spot.policy import Policy
from spot.prices import hourly_usd
from streamproc.keys import Keys
from streamproc.outbound import CallPermanent

__all__ = (
    "ASG_TAG",
    "RISK_LIMIT",
    "AsgAction",
    "Decision",
    "Placed",
    "PoolRisk",
    "apply_decisions",
    "candidate_pools",
    "cluster_inventory",
    "decide",
    "pool_risks",
    "record_run",
    "runtime_aws",
    "use_aws",
)

#: Pools at or above this risk are not used.
RISK_LIMIT = 0.5
RISK_PER_INTERRUPTION = 0.15
RISK_WINDOW_DAYS = 7
#: The tag EC2 Auto Scaling puts on its instances.
ASG_TAG = "aws:autoscaling:groupName"

_aws: Aws | None = None


def use_aws(aws: Aws | None) -> None:
    """The AWS client set the optimizer acts through (``spot.optimizer.configure_from_env``)."""
    global _aws
    _aws = aws


def runtime_aws() -> Aws:
    """The configured ``Aws``, else one with default settings (AWS itself)."""
    global _aws
    if _aws is None:
        from spot.aws import AwsSettings

        _aws = Aws(AwsSettings())
    return _aws


class Placed(msgspec.Struct, frozen=True, kw_only=True):
    """An instance and where discovery found it."""

    account_id: str
    region: str
    instance: Instance


class PoolRisk(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    instance_type: str
    availability_zone: str
    flagged: bool
    interruptions: int
    score: float


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    instance_type: str
    availability_zone: str
    action: str  # "convert" | "keep"
    reason: str
    pool: str = ""
    risk: float = 0.0
    savings_usd_per_hour: float = 0.0
    asg: str = ""
    account_id: str = ""
    region: str = ""


class AsgAction(msgspec.Struct, frozen=True, kw_only=True):
    account_id: str
    region: str
    asg: str
    instance_types: list[str]
    on_demand_percent: int
    #: The group has the policy (now or already).
    applied: bool
    #: This run changed it (False: it had it already; its savings were counted then).
    changed: bool = False
    error: str = ""


def _split(instance_type: str) -> tuple[str, str]:
    family, _, size = instance_type.partition(".")
    return family, size


async def cluster_inventory(redis: aioredis.Redis, keys: Keys, cluster_id: str) -> list[Placed]:
    """The cluster's running instances, from every account and region discovery scanned."""
    decoder = msgspec.json.Decoder(Instance)
    base = inventory_prefix(keys)
    out: list[Placed] = []
    async for raw_key in redis.scan_iter(match=base + "*", count=500):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        account_id, _, region = key[len(base) :].partition(":")
        async for _, value in redis.hscan_iter(key, count=1000):
            try:
                inst = decoder.decode(value)
            except msgspec.DecodeError:  # written by something else: not this cluster's
                continue
            if inst.cluster == cluster_id and inst.state == "running":
                out.append(Placed(account_id=account_id, region=region, instance=inst))
    return sorted(out, key=lambda p: p.instance.instance_id)


def candidate_pools(
    placed: Sequence[Placed],
    policy: Policy,
    *,
    instance_types: Sequence[str] = (),
    availability_zones: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """(instance type, AZ) pools to consider; explicit types/AZs (the task's payload) win."""
    types = list(dict.fromkeys(instance_types))
    if not types:
        families = policy.families or sorted({_split(p.instance.instance_type)[0] for p in placed})
        sizes = sorted({_split(p.instance.instance_type)[1] for p in placed})
        types = [f"{f}.{s}" for f in families for s in sizes if s]
    azs = list(dict.fromkeys(availability_zones)) or sorted(
        {p.instance.availability_zone for p in placed if p.instance.availability_zone}
    )
    return [(t, az) for t in types for az in azs]


async def pool_risks(
    redis: aioredis.Redis,
    keys: Keys,
    pools: Sequence[tuple[str, str]],
    now: datetime,
    *,
    cluster_id: str | None = None,
) -> list[PoolRisk]:
    """Each pool's risk from its risky flags and its recent interruptions (one round trip).

    Flagged: risky for every cluster (the flag, or the reports meet the quorum), or reported
    by ``cluster_id`` itself within the window (``schemas.risky_pools``).
    """
    if not pools:
        return []
    names = [f"{t}/{az}" for t, az in pools]
    days = [day_of(now - timedelta(days=i)) for i in range(RISK_WINDOW_DAYS)]
    now_ms = int(now.timestamp() * 1000)
    pipe = redis.pipeline(transaction=False)
    for t, az in pools:  # one GET each: the flags are in different slots (Redis Cluster)
        pipe.get(risky_pool_key(keys, t, az))
    for t, az in pools:
        pipe.zrangebyscore(
            reports_key(keys, t, az), now_ms - REPORTS_KEPT_S * 1000, "+inf", withscores=True
        )
    for day in days:
        pipe.hmget(_pool_key(keys, day), names)
    replies = await pipe.execute()
    flags, rest = replies[: len(pools)], replies[len(pools) :]
    reports = [PoolReports(r, now_ms) for r in rest[: len(pools)]]
    counts = rest[len(pools) :]
    out = []
    for i, ((itype, az), name) in enumerate(zip(pools, names, strict=True)):
        n = sum(int(c[i] or 0) for c in counts)
        seen = reports[i]
        flagged = (
            flags[i] is not None
            or seen.risky_for_all()
            or (cluster_id is not None and seen.risky_for(cluster_id))
        )
        score = 1.0 if flagged else min(0.9, RISK_PER_INTERRUPTION * n)
        if not flagged and cluster_id is not None and not seen.counts_for(cluster_id):
            # One tenant's reports alone: its counts never lift another cluster to the limit.
            score = min(score, RISK_LIMIT - RISK_PER_INTERRUPTION / 3)
        out.append(
            PoolRisk(
                pool=name,
                instance_type=itype,
                availability_zone=az,
                flagged=flagged,
                interruptions=n,
                score=round(score, 3),
            )
        )
    return out


def decide(placed: Sequence[Placed], risks: Iterable[PoolRisk], policy: Policy) -> list[Decision]:
    """What to do with each running instance (see the module's step 4)."""
    safe = [r for r in risks if r.score < RISK_LIMIT]
    total = len(placed)
    spot_now = sum(1 for p in placed if p.instance.lifecycle == "spot")
    max_spot = math.floor(policy.max_spot_share * total + 1e-9)
    on_demand = [p for p in placed if p.instance.lifecycle != "spot"]
    # The biggest savings first, so the share limit keeps the best conversions.
    on_demand.sort(key=lambda p: (-hourly_usd(p.instance.instance_type), p.instance.instance_id))
    out: list[Decision] = []
    for p in on_demand:
        inst = p.instance
        base: dict[str, Any] = {
            "instance_id": inst.instance_id,
            "instance_type": inst.instance_type,
            "availability_zone": inst.availability_zone,
            "asg": inst.tags.get(ASG_TAG, ""),
            "account_id": p.account_id,
            "region": p.region,
        }
        size = _split(inst.instance_type)[1]
        fits = [r for r in safe if _split(r.instance_type)[1] == size]
        if not fits:
            out.append(
                Decision(**base, action="keep", reason="no pool of its size under the risk limit")
            )
            continue
        # A type missing from the price table costs 0.0 there: unknown, never "free".
        priced = [r for r in fits if hourly_usd(r.instance_type, "spot") > 0]
        best = min(
            priced or fits,
            key=lambda r: (
                r.availability_zone != inst.availability_zone,
                r.score,
                hourly_usd(r.instance_type, "spot"),
                r.pool,
            ),
        )
        saving = hourly_usd(inst.instance_type) - hourly_usd(best.instance_type, "spot")
        if not priced or not hourly_usd(inst.instance_type) or saving <= 0:
            reason = "no saving at known prices"
            out.append(Decision(**base, action="keep", reason=reason, pool=best.pool))
            continue
        if spot_now >= max_spot:
            reason = f"spot share at the policy's limit ({policy.max_spot_share:.0%})"
            out.append(Decision(**base, action="keep", reason=reason, pool=best.pool))
            continue
        spot_now += 1
        out.append(
            Decision(
                **base,
                action="convert",
                reason=f"spot in {best.pool} (risk {best.score:.2f})",
                pool=best.pool,
                risk=best.score,
                savings_usd_per_hour=round(saving, 6),
            )
        )
    return sorted(out, key=lambda d: d.instance_id)


def _mixed_policy(asg: dict[str, Any], types: list[str], on_demand_percent: int) -> dict[str, Any]:
    mixed = asg.get("MixedInstancesPolicy") or {}
    spec = asg.get("LaunchTemplate") or mixed.get("LaunchTemplate", {}).get(
        "LaunchTemplateSpecification"
    )
    if not spec:
        raise CallPermanent("the group has no launch template (a launch configuration cannot mix)")
    spec = {k: v for k, v in spec.items() if k in ("LaunchTemplateId", "Version")} or spec
    return {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": spec,
            "Overrides": [{"InstanceType": t} for t in types],
        },
        "InstancesDistribution": {
            "OnDemandBaseCapacity": 0,
            "OnDemandPercentageAboveBaseCapacity": on_demand_percent,
            "SpotAllocationStrategy": "price-capacity-optimized",
        },
    }


def _same_mix(have: dict[str, Any] | None, want: dict[str, Any]) -> bool:
    """Does the group's mixed-instances policy already say what ``want`` says?"""
    if not have:
        return False

    def gist(m: dict[str, Any]) -> tuple[Any, ...]:
        dist = m.get("InstancesDistribution", {})
        overrides = m.get("LaunchTemplate", {}).get("Overrides", [])
        return (
            sorted(o.get("InstanceType", "") for o in overrides),
            int(dist.get("OnDemandBaseCapacity", 0)),
            int(dist.get("OnDemandPercentageAboveBaseCapacity", 100)),
            dist.get("SpotAllocationStrategy", ""),
        )

    return gist(have) == gist(want)


async def apply_decisions(
    aws: Aws,
    redis: aioredis.Redis,
    keys: Keys,
    decisions: Sequence[Decision],
    policy: Policy,
) -> list[AsgAction]:
    """Give each Auto Scaling group with converted instances its mixed-instances policy.

    A group that cannot take it (no launch template, no account, a refused call) is reported
    with its error and the others still go; transient failures propagate (the task retries).
    """
    groups: dict[tuple[str, str, str], list[Decision]] = defaultdict(list)
    for d in decisions:
        if d.action == "convert" and d.asg:
            groups[(d.account_id, d.region, d.asg)].append(d)
    accounts = AccountStore(redis, keys)
    on_demand_percent = round(100 * (1 - policy.max_spot_share))
    out = []
    for (account_id, region, name), ds in sorted(groups.items()):
        types = sorted({d.pool.partition("/")[0] for d in ds} | {d.instance_type for d in ds})
        action: dict[str, Any] = {
            "account_id": account_id,
            "region": region,
            "asg": name,
            "instance_types": types,
            "on_demand_percent": on_demand_percent,
        }
        account = await accounts.get(account_id)
        if account is None:
            out.append(AsgAction(**action, applied=False, error="account no longer registered"))
            continue

        def update(client: Any, name: str = name, types: list[str] = types) -> bool:
            found = client.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
            if not found["AutoScalingGroups"]:
                raise CallPermanent(f"no Auto Scaling group {name!r}")
            group = found["AutoScalingGroups"][0]
            mixed = _mixed_policy(group, types, on_demand_percent)
            if _same_mix(group.get("MixedInstancesPolicy"), mixed):
                return False
            client.update_auto_scaling_group(AutoScalingGroupName=name, MixedInstancesPolicy=mixed)
            return True

        try:
            changed = await aws.call(redis, keys, account, "autoscaling", region, update)
        except CallPermanent as e:
            out.append(AsgAction(**action, applied=False, error=str(e)[:500]))
            continue
        out.append(AsgAction(**action, applied=True, changed=changed))
    return out


async def record_run(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    task_id: str,
    cluster_id: str,
    at: datetime,
    figures: dict[str, float],
) -> bool:
    """Add a run's figures to its day's hashes, once per task id (False: counted before)."""
    return await add_figures(
        redis,
        keys,
        day=day_of(at),
        mark=f"optimizer:{task_id}",
        everyone={f: float(v) for f, v in figures.items()},
        cluster=(cluster_id, {f: float(v) for f, v in figures.items()}),
    )
