"""The cluster-event processor (WORKLOADS.md §1): highest priority, 10 parallel workers.

- spot interruption → flag the pool (instance type + AZ) as risky for the reporting cluster,
  and for every cluster once ``MIN_REPORTERS`` distinct clusters and agents reported it
  (``schemas.risky_pools``), with a TTL; remember the interrupted node for a while; notify the
  cluster's subscribers.
- OOMKilled → a right-sizing recommendation: the new memory limit from the observed one.
- node not ready → interruption-related when that node (or instance) was interrupted in the
  last ``INTERRUPTION_MEMORY_S``; a critical notification otherwise.
- pod pending → classified by the scheduler's reason.

Figures for the weekly report (``schemas.metrics``), on the UTC day the event occurred:
``spot_interruptions`` and ``oom_kills`` in the daily hash and the cluster's daily hash, and
interruptions per pool (``<type>/<az>``), which the optimizer turns into a risk score.

What it emits goes through ``schemas.notify.fit``: text from the agent (names, a node's
reason) is cut to the notification's own limits, so every notification decodes downstream.

Tenancy (issue 17 item 3): an event is acted on only when its ``source`` may speak for its
cluster. The ingest stamps ``source`` with the posting agent's name and checks its
``--clusters`` already; here the agent's record is read again (``AgentStore.get``, cached
``AGENT_CACHE_S``) so that a scope narrowed since, or an event that entered by another route,
changes nothing. Refused events are acked and ignored (log ``cluster_event_refused``, metric
``streamproc_cluster_events_refused_total``), never dead-lettered: a hostile agent must not fill
the DLQ. An event whose source names no agent is the application's own (only the roles that
hold a Redis password can write the stream without the ingest's stamp) and is acted on.

Where its state lives (Redis Cluster, issue 18). The settle script applies ``ctx.effect``
atomically with the ack, in the slot of the event's topic (or partition), so:

- **per-cluster state** is an effect, under the topic's tag: ``interrupted_key`` and
  ``not_ready_key`` (``<p>:{<topic>}:state:interrupted:<cluster>:<node>``, …). A cluster's
  events carry its id as key, so with ``STREAMPROC_PARTITIONS=cluster=N`` they all go to one
  partition and its marks are in that partition's slot, where its NotReady events read them.
- **figures across clusters** (the day's counts, per cluster and per pool: ``schemas.metrics``)
  are written by several concerns from several topics; they are not effects but one
  ``add_figures`` script per event in the day's slot ``{metrics:<day>}``, made idempotent by a
  mark named after the event id. It runs in the handler, before the settle: a handler that
  fails later and runs again counts nothing twice.
- **the pool's reports and its all-clusters flag** (``schemas.risky_pools``) span every
  cluster: plain single-key commands from the handler (``ZADD`` of the (source, cluster)
  member, ``EXPIRE``, ``SET … EX``), idempotent by themselves (a second run only moves the
  member's score to the later time), not atomic with the ack.

Key names before this (2026-12): ``<p>:state:interrupted:…`` and ``<p>:state:node-not-ready:…``
(marks of 15 min and 1 h: not migrated; for 15 min after the upgrade a NotReady is not explained
by an interruption handled before it), the day's figures (see ``schemas.metrics``).

Events it emits get ids derived from the cause's id, so a handler that runs twice emits
nothing new (producer-side dedup).
"""

from __future__ import annotations

import re
import time
import weakref
from typing import Any

import structlog
from prometheus_client import Counter

from schemas.cluster import ClusterEvent, NodeNotReady, OOMKilled, PodPending, SpotInterruption
from schemas.metrics import add_figures, day_of
from schemas.notify import Notification, PodPendingClassified, RightSizingRecommendation, fit
from schemas.risky_pools import (
    MAX_REPORTS,
    REPORTS_KEPT_S,
    RISKY_POOL_TTL_S,
    PoolReports,
    report_member,
    reports_key,
    risky_pool_key,
)
from streamproc.concern import Concern, Context
from streamproc.event import derived_id
from streamproc.ingest.auth import AgentStore
from streamproc.keys import Keys
from streamproc.settings import RetryPolicy

__all__ = (
    "CONCERN",
    "RISKY_POOL_TTL_S",
    "classify_pending",
    "count_figure",
    "interrupted_key",
    "not_ready_key",
    "recommend_memory_limit",
    "speaks_for",
)

log = structlog.get_logger("consumers.cluster_events")

#: Events refused because their source may not speak for their cluster.
REFUSED = Counter(
    "streamproc_cluster_events_refused",
    "cluster events acked and ignored: their source (agent) may not speak for the cluster",
    ["type"],
)
#: How long an agent's record is cached by this concern (a narrowed scope applies after it).
AGENT_CACHE_S = 5.0
#: One AgentStore (and cache) per Redis client.
_STORES: weakref.WeakKeyDictionary[Any, AgentStore] = weakref.WeakKeyDictionary()
#: How long an interrupted node is remembered, to explain a later NotReady.
INTERRUPTION_MEMORY_S = 15 * 60
#: How long a NotReady node's classification is kept (one key per node, never a growing hash:
#: every key an agent's input creates expires; issue 17).
NOT_READY_MEMORY_S = 3600
_MIB = 1 << 20


def recommend_memory_limit(limit_bytes: int, peak_bytes: int = 0, restarts: int = 0) -> int:
    """The next memory limit after an OOM kill.

    1.5x the larger of the limit and the observed peak (2x once it was killed 3+ times), with
    at least 64 MiB more, rounded up to a whole MiB.
    """
    base = max(limit_bytes, peak_bytes)
    factor = 2.0 if restarts >= 3 else 1.5
    new = max(int(base * factor), base + 64 * _MIB)
    return -(-new // _MIB) * _MIB


_PENDING_RULES = (
    ("insufficient_gpu", re.compile(r"insufficient (nvidia\.com/gpu|amd\.com/gpu|gpu)", re.I)),
    ("insufficient_cpu", re.compile(r"insufficient cpu", re.I)),
    ("insufficient_memory", re.compile(r"insufficient memory", re.I)),
    ("taints", re.compile(r"untolerated taint|had taint", re.I)),
    ("node_selector", re.compile(r"node affinity|node selector|didn't match", re.I)),
    ("volume", re.compile(r"volume|persistentvolumeclaim|pvc", re.I)),
)


def classify_pending(message: str) -> str:
    """The scheduler's reason for a pending pod, as one category."""
    for category, pattern in _PENDING_RULES:
        if pattern.search(message):
            return category
    return "unknown"


def interrupted_key(keys: Keys, topic: str, cluster_id: str, node: str) -> str:
    """A node (or instance) of the cluster was interrupted: the event id, for
    ``INTERRUPTION_MEMORY_S``. ``topic``: the event's topic or partition (``ctx.topic``;
    ``keys.partition("cluster", cluster_id, "")`` from outside a handler)."""
    return keys.topic_state(topic, "interrupted", cluster_id, node)


def not_ready_key(keys: Keys, topic: str, cluster_id: str, node: str) -> str:
    """A NotReady node's classification (``interruption`` or ``unexpected``)."""
    return keys.topic_state(topic, "node-not-ready", cluster_id, node)


async def count_figure(
    ctx: Context, event: ClusterEvent, field: str, pools: dict[str, int] | None = None
) -> None:
    """One more ``field`` on the event's day, for all clusters and for its cluster (and the
    ``pools`` counts), once per event id (``schemas.metrics.add_figures``)."""
    await add_figures(
        ctx.redis,
        ctx.keys,
        day=day_of(event.occurred_at),
        mark=event.id,
        everyone={field: 1},
        cluster=(event.cluster_id, {field: 1}),
        pools=pools,
    )


async def speaks_for(event: ClusterEvent, ctx: Context) -> bool:
    """May the event's source act for its cluster (see the module's Tenancy paragraph)?"""
    store = _STORES.get(ctx.redis)
    if store is None:
        store = _STORES[ctx.redis] = AgentStore(ctx.redis, ctx.keys, cache_s=AGENT_CACHE_S)
    agent = await store.get(event.source) if event.source else None
    if agent is None or agent.may_speak_for(event.cluster_id):
        return True
    REFUSED.labels(event.type_name()).inc()
    log.warning(
        "cluster_event_refused",
        event_id=event.id,
        type=event.type_name(),
        source=event.source,
        cluster_id=event.cluster_id,
        reason="the source may not speak for this cluster",
    )
    return False


def _tenant(handler: Any) -> Any:
    """Run ``handler`` only for events whose source may speak for their cluster."""

    async def checked(event: ClusterEvent, ctx: Context) -> None:
        if await speaks_for(event, ctx):
            await handler(event, ctx)

    checked.__name__ = checked.__qualname__ = handler.__name__
    checked.__doc__ = handler.__doc__
    return checked


async def on_spot_interruption(event: SpotInterruption, ctx: Context) -> None:
    itype, az = event.instance_type, event.availability_zone
    # Risky for this cluster now; for every cluster once the quorum of schemas.risky_pools
    # is met (the optimizer applies the same rule to the reports when it reads them).
    reports = reports_key(ctx.keys, itype, az)
    now_ms = int(time.time() * 1000)
    member = report_member(event.source, event.cluster_id)
    # Every cluster's reports of the pool: not in this event's slot, so not an effect
    # (idempotent: a second run moves the member's score to the later time).
    await ctx.redis.zadd(reports, {member: now_ms})
    await ctx.redis.expire(reports, REPORTS_KEPT_S)
    # Old and surplus reports go now.
    await ctx.redis.zremrangebyscore(reports, "-inf", now_ms - REPORTS_KEPT_S * 1000)
    await ctx.redis.zremrangebyrank(reports, 0, -MAX_REPORTS)
    kept: Any = await ctx.redis.zrange(reports, 0, -1, withscores=True)
    seen = PoolReports([*kept, (member, now_ms)], now_ms)
    for_all = seen.risky_for_all()
    if for_all:
        await ctx.redis.set(risky_pool_key(ctx.keys, itype, az), event.id, ex=RISKY_POOL_TTL_S)
    await count_figure(ctx, event, "spot_interruptions", {f"{itype}/{az}": 1})
    for node in filter(None, (event.node_name, event.instance_id)):
        mark = interrupted_key(ctx.keys, ctx.topic, event.cluster_id, node)
        ctx.effect("SET", mark, event.id, "EX", INTERRUPTION_MEMORY_S)
    await ctx.producer.publish(
        fit(
            Notification(
                id=derived_id(event.id, "notify"),
                key=event.cluster_id,
                source="cluster-events",
                cluster_id=event.cluster_id,
                severity="warning",
                cause_id=event.id,
                title=f"Spot interruption: {event.instance_id} ({event.instance_type}, "
                f"{event.availability_zone})",
                body=f"Pool {event.instance_type}/{event.availability_zone} flagged risky for "
                f"{'every cluster' if for_all else 'this cluster'} for "
                f"{RISKY_POOL_TTL_S // 3600} h.",
            )
        )
    )


async def on_oom_killed(event: OOMKilled, ctx: Context) -> None:
    new_limit = recommend_memory_limit(
        event.memory_limit_bytes, event.memory_peak_bytes, event.restart_count
    )
    await count_figure(ctx, event, "oom_kills")
    await ctx.producer.publish(
        fit(
            RightSizingRecommendation(
                id=derived_id(event.id, "rightsizing"),
                key=event.cluster_id,
                source="cluster-events",
                cluster_id=event.cluster_id,
                namespace=event.namespace,
                workload=event.workload or event.pod,
                container=event.container,
                current_limit_bytes=event.memory_limit_bytes,
                recommended_limit_bytes=new_limit,
                cause_id=event.id,
            )
        )
    )


async def on_node_not_ready(event: NodeNotReady, ctx: Context) -> None:
    marks = [
        interrupted_key(ctx.keys, ctx.topic, event.cluster_id, n)
        for n in filter(None, (event.node_name, event.instance_id))
    ]
    interrupted = any(await ctx.redis.mget(marks)) if marks else False
    category = "interruption" if interrupted else "unexpected"
    ctx.effect(
        "SET",
        not_ready_key(ctx.keys, ctx.topic, event.cluster_id, event.node_name),
        category,
        "EX",
        NOT_READY_MEMORY_S,
    )
    if not interrupted:
        await ctx.producer.publish(
            fit(
                Notification(
                    id=derived_id(event.id, "notify"),
                    key=event.cluster_id,
                    source="cluster-events",
                    cluster_id=event.cluster_id,
                    severity="critical",
                    cause_id=event.id,
                    title=f"Node {event.node_name} not ready",
                    body=event.reason or "no spot interruption explains it",
                )
            )
        )


async def on_pod_pending(event: PodPending, ctx: Context) -> None:
    await ctx.producer.publish(
        fit(
            PodPendingClassified(
                id=derived_id(event.id, "pending"),
                key=event.cluster_id,
                source="cluster-events",
                cluster_id=event.cluster_id,
                namespace=event.namespace,
                pod=event.pod,
                category=classify_pending(event.message),  # type: ignore[arg-type]
                cause_id=event.id,
            )
        )
    )


CONCERN = Concern(
    group="cluster-events",
    topics=("cluster",),
    handlers={
        SpotInterruption: _tenant(on_spot_interruption),
        OOMKilled: _tenant(on_oom_killed),
        NodeNotReady: _tenant(on_node_not_ready),
        PodPending: _tenant(on_pod_pending),
    },
    concurrency=10,
    retry=RetryPolicy(max_retries=3, base_s=0.5, cap_s=30.0),
)
