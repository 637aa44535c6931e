"""The task runner (WORKLOADS.md §1 optimizer, §4 task nodes, §5 cancellable jobs).

Task types run here; ``POST /v1/tasks`` submits them. ``optimizer.run`` is the spot-instance
optimizer of §1 (5 in parallel): for a cluster's candidate pools (instance type x AZ) it checks
which ones the cluster-event processor flagged risky after spot interruptions, reports its
progress pool by pool (to the task's status and the cluster's live feed), returns the safe
pools to use, and notifies the cluster's subscribers.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import msgspec

from notifications import feed_keys
from schemas.notify import Notification
from streamproc.event import derived_id
from streamproc.tasks import TaskContext, TaskType, task_concern

__all__ = ("CONCERN", "TASK_TYPES", "OptimizerRun", "run_optimizer")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]


class OptimizerRun(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``optimizer.run``."""

    cluster_id: Name
    instance_types: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=50)]
    availability_zones: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=20)]
    #: Pause between pool checks, to stay under the cloud API's rate limits.
    pace_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


async def run_optimizer(p: OptimizerRun, ctx: TaskContext) -> dict[str, Any]:
    pools = [(t, az) for t in p.instance_types for az in p.availability_zones]
    safe: list[str] = []
    risky: list[str] = []
    for i, (itype, az) in enumerate(pools, 1):
        flagged = await ctx.redis.exists(ctx.keys.state("risky-pool", itype, az))
        (risky if flagged else safe).append(f"{itype}/{az}")
        await ctx.progress(
            i / len(pools), pools_checked=i, pools_total=len(pools), risky=len(risky)
        )
        # The cluster's people follow it live (GET /clusters/{id}/feed).
        await feed_keys.append(
            ctx.redis,
            ctx.keys,
            p.cluster_id,
            "task.progress",
            {
                "task_id": ctx.task_id,
                "type": "optimizer.run",
                "fraction": i / len(pools),
                "pools_checked": i,
                "pools_total": len(pools),
                "risky": len(risky),
            },
        )
        if p.pace_ms:
            await asyncio.sleep(p.pace_ms / 1000)
    await ctx.producer.publish(
        Notification(
            id=derived_id(ctx.task_id, "optimizer"),
            key=p.cluster_id,
            source="tasks",
            cluster_id=p.cluster_id,
            severity="warning" if risky else "info",
            title=f"Optimizer run for {p.cluster_id}: {len(safe)} safe pools, {len(risky)} risky",
            body=", ".join(risky)[:8000],
            cause_id=ctx.task_id,
        )
    )
    return {
        "cluster_id": p.cluster_id,
        "safe_pools": safe,
        "risky_pools": risky,
        "recommended": safe[:3],
    }


TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType(
            name="optimizer.run",
            run=run_optimizer,
            payload_type=OptimizerRun,
            concurrency=5,
            max_retries=3,
            timeout_s=3600,
        ),
    )
}

CONCERN = task_concern(TASK_TYPES)
