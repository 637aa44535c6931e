"""Kubernetes / AWS cluster events posted by agents (WORKLOADS.md §1)."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import msgspec

from streamproc.event import Event
from streamproc.printable import NO_CONTROL_PATTERN

__all__ = ("NodeNotReady", "OOMKilled", "PodPending", "SpotInterruption")

#: A Kubernetes/AWS name: shown to people and the cluster route's ``key``, so no control
#: characters either (a 422 naming the field at ingest).
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=NO_CONTROL_PATTERN)]
#: The same, where the agent may leave it out (empty).
OptionalName = Annotated[str, msgspec.Meta(max_length=253, pattern=NO_CONTROL_PATTERN)]
#: The largest integer an agent may send: what every consumer (and Redis' counters) can hold.
INT64_MAX = 2**63 - 1
#: Free text from an agent (a reason, a message): bounded, so no agent string is unbounded.
Text = Annotated[str, msgspec.Meta(max_length=4096)]


def key_by_cluster(event: Any) -> None:
    """An event about one cluster is ordered and partitioned by it: its ``key`` is the
    cluster id unless the sender chose another (from any source: ingest, the CLI, code)."""
    if not event.key:
        msgspec.structs.force_setattr(event, "key", event.cluster_id)


class ClusterEvent(Event, frozen=True, kw_only=True):
    topic: ClassVar[str] = "cluster"
    cluster_id: Name

    def __post_init__(self) -> None:
        key_by_cluster(self)


class SpotInterruption(ClusterEvent, frozen=True, kw_only=True, tag="cluster.spot_interruption"):
    """AWS will reclaim a spot instance (two-minute warning)."""

    instance_id: Name
    instance_type: Name
    availability_zone: Name
    node_name: OptionalName = ""
    action: Literal["terminate", "stop", "hibernate"] = "terminate"


class OOMKilled(ClusterEvent, frozen=True, kw_only=True, tag="cluster.oom_killed"):
    """A container was killed for exceeding its memory limit."""

    namespace: Name
    pod: Name
    container: Name
    workload: OptionalName = ""
    memory_limit_bytes: Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
    #: Peak usage seen before the kill, when the agent knows it.
    memory_peak_bytes: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0
    restart_count: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] = 0


class NodeNotReady(ClusterEvent, frozen=True, kw_only=True, tag="cluster.node_not_ready"):
    node_name: Name
    instance_id: OptionalName = ""
    reason: Text = ""


class PodPending(ClusterEvent, frozen=True, kw_only=True, tag="cluster.pod_pending"):
    namespace: Name
    pod: Name
    #: The scheduler's message, e.g. "0/5 nodes are available: 3 Insufficient cpu."
    message: Text = ""
    pending_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
