"""Agent metrics (``cluster.metrics``) and the daily figures the weekly report reads.

Agents post node/pod samples to ``POST /clusters/{id}/metrics``; the ``metrics`` concern
(``spot.optimizer_metrics``) folds them into daily figures. Every concern that records a
figure for the report names its key here, so the report's inputs are in one place:

| key | fields |
|---|---|
| ``<p>:state:metrics:daily:<YYYY-MM-DD>`` | the report's figures, all clusters (``FIGURES``) |
| ``<p>:state:metrics:cluster:<cluster>:<YYYY-MM-DD>`` | the same per cluster, plus sums |
| ``<p>:state:pool-interruptions:<YYYY-MM-DD>`` | ``<instance type>/<az>`` → interruptions |

Days are UTC; every hash expires ``DAILY_TTL_S`` after its last write.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import msgspec

from schemas.cluster import key_by_cluster
from streamproc.event import Event
from streamproc.keys import Keys

__all__ = (
    "DAILY_TTL_S",
    "FIGURES",
    "MAX_SAMPLES",
    "TYPES",
    "ClusterMetrics",
    "MetricSample",
    "cluster_daily_key",
    "daily_key",
    "day_of",
    "pool_interruptions_key",
)

#: Daily hashes are kept this long (the report reads 7 days; a month for looking back).
DAILY_TTL_S = 35 * 86_400
#: Samples in one ``cluster.metrics`` event (one request).
MAX_SAMPLES = 100

#: The report's figures and who records them: name → (label, unit).
FIGURES: dict[str, tuple[str, str]] = {
    "savings_usd": ("Savings (hibernation)", "USD"),
    "hibernated_instance_hours": ("Hibernated instance hours", "h"),
    "optimizer_savings_usd": ("Savings (optimizer, per day)", "USD"),
    "optimizer_runs": ("Optimizer runs", "runs"),
    "optimizer_opportunities": ("Spot opportunities found", "instances"),
    "spot_interruptions": ("Spot interruptions", "events"),
    "oom_kills": ("OOM kills", "events"),
    "agent_samples": ("Agent samples", "samples"),
    "node_hours": ("Node hours", "h"),
    "spot_node_hours": ("Spot node hours", "h"),
    "cpu_core_hours_requested": ("CPU core hours requested", "core h"),
    "cpu_core_hours_used": ("CPU core hours used", "core h"),
}

_Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
_Cores = Annotated[float, msgspec.Meta(ge=0, le=10_000_000)]
_Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]


class MetricSample(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One look at a cluster: what it ran over the ``interval_s`` before ``at``."""

    at: Annotated[datetime, msgspec.Meta(tz=True)]
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 60
    nodes: _Count
    spot_nodes: _Count = 0
    pods: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    pending_pods: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    cpu_requested_cores: _Cores = 0.0
    cpu_used_cores: _Cores = 0.0
    memory_requested_bytes: _Bytes = 0
    memory_used_bytes: _Bytes = 0


class ClusterMetrics(Event, frozen=True, kw_only=True, tag="cluster.metrics"):
    """A batch of an agent's samples of one cluster."""

    topic: ClassVar[str] = "metrics"
    #: Enters only by ``POST /clusters/{id}/metrics``, which checks the cluster's scope and
    #: the samples' times; not by ``/v1/events``.
    external: ClassVar[bool] = False
    cluster_id: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    samples: Annotated[list[MetricSample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]

    def __post_init__(self) -> None:
        key_by_cluster(self)


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = (ClusterMetrics,)


def day_of(at: datetime) -> str:
    """The UTC day of a time, as the daily keys name it."""
    return f"{at.astimezone(UTC):%Y-%m-%d}"


def daily_key(keys: Keys, day: str) -> str:
    """The report's figures of one day (``consumers.renders`` reads it)."""
    return keys.state("metrics", "daily", day)


def cluster_daily_key(keys: Keys, cluster_id: str, day: str) -> str:
    return keys.state("metrics", "cluster", cluster_id, day)


def pool_interruptions_key(keys: Keys, day: str) -> str:
    return keys.state("pool-interruptions", day)
