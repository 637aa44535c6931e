"""The task runner (WORKLOADS.md §1 optimizer, §4 task nodes, §5 cancellable jobs).

Task types run here; ``POST /v1/tasks`` and ``POST /clusters/{id}/optimize`` submit them.
``optimizer.run`` is the spot-instance optimizer of §1 (5 in parallel), whose steps are in
``spot.optimizer_pipeline``: the cluster's inventory (as discovery stored it) and its policy
(``spot.policy``), candidate pools (instance type x AZ) checked one by one against the
cluster-event processor's risky flags and interruption counts (progress to the task's status
and the cluster's live feed), a decision per on-demand instance, and — only when the policy's
``dry_run`` is off and the request did not ask for one — the Auto Scaling groups' mixed-
instances policies set through ``Aws.call``. The result is stored on the task; the run's
figures (``optimizer_runs``, ``optimizer_opportunities``, ``optimizer_savings_usd``) go to the
day's report hashes once per task; a notification tells the cluster's subscribers.

The media task types (``media.transcode``, ``media.preview``: ffmpeg jobs on the media store,
docs/media.md) run in the same runner, each with its own concurrency and time limit.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import structlog

import media
import qa
from notifications import feed_keys
from schemas.notify import Notification, fit
from schemas.tasks import QUEUES
from spot import optimizer_pipeline as pipeline
from spot.policy import Family, PolicyStore
from streamproc.config import TASK_CONCURRENCY_VAR, parse_task_concurrency
from streamproc.event import derived_id
from streamproc.tasks import LoadLimits, TaskContext, TaskType, task_concerns
from streamproc.tasks.events import task_group
from streamproc.tasks.runners import limits_from_env

__all__ = (
    "CONCERNS",
    "LIMITS",
    "QUEUE_LIMITS",
    "TASK_TYPES",
    "OptimizerRun",
    "configure_from_env",
    "run_optimizer",
)

log = structlog.get_logger("consumers.tasks")

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]


class OptimizerRun(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Payload of ``optimizer.run`` (also the body of ``POST /clusters/{id}/optimize``)."""

    cluster_id: Name
    #: Pools to check instead of the policy's families in the sizes the cluster runs.
    instance_types: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=50)] | None = None
    #: AZs to consider instead of those the cluster runs in.
    availability_zones: Annotated[list[Name], msgspec.Meta(min_length=1, max_length=20)] | None = (
        None
    )
    #: Families instead of the policy's, for this run.
    families: Annotated[list[Family], msgspec.Meta(min_length=1, max_length=30)] | None = None
    #: True: plan only, whatever the policy says. (A request cannot turn the policy's dry run
    #: off: acting on AWS is the operator's choice, in the policy.)
    dry_run: bool | None = None
    #: Pause between pool checks, to stay under the cloud API's rate limits.
    pace_ms: Annotated[int, msgspec.Meta(ge=0, le=10_000)] = 0


async def _report(ctx: TaskContext, cluster_id: str, fraction: float, **detail: Any) -> None:
    await ctx.progress(fraction, **detail)
    # The cluster's people follow it live (GET /clusters/{id}/feed).
    await feed_keys.append(
        ctx.redis,
        ctx.keys,
        cluster_id,
        "task.progress",
        {"task_id": ctx.task_id, "type": "optimizer.run", "fraction": fraction, **detail},
    )


async def run_optimizer(p: OptimizerRun, ctx: TaskContext) -> dict[str, Any]:
    now = datetime.now(UTC)
    policy = await PolicyStore(ctx.redis, ctx.keys).get(p.cluster_id)
    if p.families:
        policy = msgspec.structs.replace(policy, families=list(p.families))
    dry_run = policy.dry_run or p.dry_run is True
    placed = await pipeline.cluster_inventory(ctx.redis, ctx.keys, p.cluster_id)
    pools = pipeline.candidate_pools(
        placed,
        policy,
        instance_types=p.instance_types or (),
        availability_zones=p.availability_zones or (),
    )
    risks: list[pipeline.PoolRisk] = []
    risky = 0
    for i, pool in enumerate(pools, 1):
        [risk] = await pipeline.pool_risks(
            ctx.redis, ctx.keys, [pool], now, cluster_id=p.cluster_id
        )
        risks.append(risk)
        risky += risk.score >= pipeline.RISK_LIMIT
        await _report(
            ctx,
            p.cluster_id,
            0.9 * i / len(pools),
            pools_checked=i,
            pools_total=len(pools),
            risky=risky,
        )
        if p.pace_ms:
            await asyncio.sleep(p.pace_ms / 1000)
    decisions = pipeline.decide(placed, risks, policy)
    converts = [d for d in decisions if d.action == "convert"]
    actions: list[pipeline.AsgAction] = []
    if converts and not dry_run:
        aws = pipeline.runtime_aws()
        actions = await pipeline.apply_decisions(aws, ctx.redis, ctx.keys, decisions, policy)
    applied = {a.asg for a in actions if a.applied}
    changed = {a.asg for a in actions if a.changed}
    hourly = sum(d.savings_usd_per_hour for d in converts)
    # Saved: what this run changed (a group that had the policy already was counted then).
    realised = sum(d.savings_usd_per_hour for d in converts if d.asg in changed)
    await pipeline.record_run(
        ctx.redis,
        ctx.keys,
        task_id=ctx.task_id,
        cluster_id=p.cluster_id,
        at=now,
        figures={
            "optimizer_runs": 1,
            "optimizer_opportunities": len(converts),
            "optimizer_savings_usd": round(realised * 24, 4),
        },
    )
    safe = [r.pool for r in risks if r.score < pipeline.RISK_LIMIT]
    risky_pools = [r.pool for r in risks if r.score >= pipeline.RISK_LIMIT]
    await _report(
        ctx,
        p.cluster_id,
        1.0,
        pools_checked=len(pools),
        pools_total=len(pools),
        risky=risky,
        decisions=len(decisions),
        convert=len(converts),
    )
    mode = "dry run" if dry_run else f"{len(applied)} group(s) updated"
    await ctx.producer.publish(
        fit(
            Notification(
                id=derived_id(ctx.task_id, "optimizer"),
                key=p.cluster_id,
                source="tasks",
                cluster_id=p.cluster_id,
                severity="warning"
                if risky_pools or any(not a.applied for a in actions)
                else "info",
                title=f"Optimizer run for {p.cluster_id}: {len(converts)} of {len(placed)} "
                f"instances to spot (${hourly * 730:,.0f}/month), {mode}",
                body="\n".join(
                    [f"{d.instance_id}: {d.action} ({d.reason})" for d in decisions[:50]]
                    + [f"risky pools: {', '.join(risky_pools)}"] * bool(risky_pools)
                    + [f"{a.asg}: {a.error}" for a in actions if not a.applied]
                ),
                cause_id=ctx.task_id,
            )
        )
    )
    return {
        "cluster_id": p.cluster_id,
        "dry_run": dry_run,
        "policy": msgspec.to_builtins(policy),
        "instances": len(placed),
        "safe_pools": safe,
        "risky_pools": risky_pools,
        "recommended": sorted(safe, key=lambda s: next(r.score for r in risks if r.pool == s))[:3],
        "pool_risk": msgspec.to_builtins(risks),
        "decisions": msgspec.to_builtins(decisions),
        "savings_usd_per_hour": round(hourly, 6),
        "savings_usd_per_month": round(hourly * 730, 2),
        "actions": msgspec.to_builtins(actions),
    }


TASK_TYPES: dict[str, TaskType] = {
    t.name: t
    for t in (
        TaskType(
            name="optimizer.run",
            run=run_optimizer,
            payload_type=OptimizerRun,
            queue="optimizer",
            concurrency=5,
            max_retries=3,
            time_limit_s=3600,
        ),
    )
}
#: The media jobs (``media.transcode``, ``media.preview``: docs/media.md).
TASK_TYPES.update(media.TASK_TYPES)
#: The QA agent's tasks (``crawl.session``, ``ticket.create``, ``screenshot.upload``: docs/qa.md).
TASK_TYPES.update(qa.TASK_TYPES)

#: The runners' CPU and memory ceilings (load shedding): ``STREAMPROC_TASKS_MAX_CPU_PERCENT``
#: (90) and ``STREAMPROC_TASKS_MAX_MEMORY_PERCENT`` (85), read by ``configure_from_env``.
LIMITS = LoadLimits(max_cpu_percent=90, max_memory_percent=85)
_SEED_LIMITS = LoadLimits(max_cpu_percent=90, max_memory_percent=85)

_USED = {t.queue for t in TASK_TYPES.values()}
#: The figures in code (``schemas.tasks.QUEUES``) of the queues this application runs.
_CODE_QUEUES: dict[str, int | None] = {q: n for q, n in QUEUES.items() if q in _USED}
#: Each queue's concurrency across every runner now: the code's, with the overrides of
#: ``STREAMPROC_TASK_CONCURRENCY`` (``crawl=3,tickets=6``) put in by ``configure_from_env``.
#: The task concerns read it as each task starts (``streamproc.tasks.runner``).
QUEUE_LIMITS: dict[str, int | None] = dict(_CODE_QUEUES)


def configure_from_env(env: Mapping[str, str]) -> None:
    """``STREAMPROC_TASKS_MAX_CPU_PERCENT`` / ``_MAX_MEMORY_PERCENT`` and
    ``STREAMPROC_TASK_CONCURRENCY``; a bad value is a ConfigError naming the variable (and
    the item), before anything changes."""
    configured = limits_from_env(env, _SEED_LIMITS)
    overrides = parse_task_concurrency(env.get(TASK_CONCURRENCY_VAR, ""), queues=_CODE_QUEUES)
    LIMITS.max_cpu_percent = configured.max_cpu_percent
    LIMITS.max_memory_percent = configured.max_memory_percent
    QUEUE_LIMITS.clear()
    QUEUE_LIMITS.update({**_CODE_QUEUES, **overrides})
    by_group = {c.group: c for c in CONCERNS}
    for queue, n in sorted(overrides.items()):
        log.info("task_queue_concurrency", queue=queue, concurrency=n, code=_CODE_QUEUES[queue])
        per_process = by_group[task_group(queue)].concurrency
        if n > per_process:  # fixed when the concerns were built (2x the code's figure, >= 8)
            log.warning(
                "task_queue_concurrency_above_one_runner",
                queue=queue,
                concurrency=n,
                per_runner=per_process,
                runners_needed=-(-n // per_process),
            )


#: One consumer group per queue (``schemas.tasks.QUEUES``): ``tasks-optimizer``, ``tasks-video``…
CONCERNS = task_concerns(TASK_TYPES, queues=QUEUE_LIMITS, limits=LIMITS)
