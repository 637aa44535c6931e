"""What the cluster-event processor emits: notifications and recommendations."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from streamproc.event import Event

__all__ = ("Notification", "PodPendingClassified", "RightSizingRecommendation")


class Notification(Event, frozen=True, kw_only=True, tag="notify.notification"):
    """Something subscribers of a cluster should hear about."""

    topic: ClassVar[str] = "notify"
    cluster_id: str
    severity: Literal["info", "warning", "critical"] = "info"
    title: Annotated[str, msgspec.Meta(max_length=512)]
    body: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    #: The event that caused it.
    cause_id: str = ""


class RightSizingRecommendation(Event, frozen=True, kw_only=True, tag="notify.rightsizing"):
    topic: ClassVar[str] = "notify"
    cluster_id: str
    namespace: str
    workload: str
    container: str
    current_limit_bytes: int
    recommended_limit_bytes: int
    cause_id: str = ""


class PodPendingClassified(Event, frozen=True, kw_only=True, tag="notify.pod_pending"):
    topic: ClassVar[str] = "notify"
    cluster_id: str
    namespace: str
    pod: str
    category: Literal[
        "insufficient_cpu",
        "insufficient_memory",
        "insufficient_gpu",
        "node_selector",
        "taints",
        "volume",
        "unknown",
    ]
    cause_id: str = ""
