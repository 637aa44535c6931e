"""What the cluster-event processor emits: notifications and recommendations."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, ClassVar, Literal

import msgspec

from streamproc.event import Event

__all__ = (
    "DeliveryRequested",
    "Message",
    "Notification",
    "PodPendingClassified",
    "RightSizingRecommendation",
)


class Notification(Event, frozen=True, kw_only=True, tag="notify.notification"):
    """Something subscribers of a cluster should hear about."""

    topic: ClassVar[str] = "notify"
    #: Notifications are the application's conclusions (``cluster-events``, the optimizer,
    #: discovery, the monitors); an agent posting one would speak to any cluster's
    #: subscribers in the application's name. The same for the two below.
    external: ClassVar[bool] = False
    cluster_id: str
    severity: Literal["info", "warning", "critical"] = "info"
    title: Annotated[str, msgspec.Meta(max_length=512)]
    body: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    #: Where to read more (optional; channels fall back to the dashboard).
    link: Annotated[str, msgspec.Meta(max_length=2048)] = ""
    #: The event that caused it.
    cause_id: str = ""


class RightSizingRecommendation(Event, frozen=True, kw_only=True, tag="notify.rightsizing"):
    topic: ClassVar[str] = "notify"
    external: ClassVar[bool] = False
    cluster_id: str
    namespace: str
    workload: str
    container: str
    current_limit_bytes: int
    recommended_limit_bytes: int
    cause_id: str = ""


class PodPendingClassified(Event, frozen=True, kw_only=True, tag="notify.pod_pending"):
    topic: ClassVar[str] = "notify"
    external: ClassVar[bool] = False
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


class Message(msgspec.Struct, frozen=True, kw_only=True):
    """A notification as every channel renders it (built from any ``notify``/``reports``
    event by ``notifications.message_of``)."""

    notification_id: str
    #: The type of the event it came from (``notify.notification``, ``report.ready`` ...).
    type: str
    #: The cluster (tenant) it is about; empty for reports, which are not about one cluster.
    cluster_id: str = ""
    severity: Literal["info", "warning", "critical"] = "info"
    title: Annotated[str, msgspec.Meta(max_length=512)]
    body: Annotated[str, msgspec.Meta(max_length=8192)] = ""
    #: Where to read more (the dashboard, the report).
    link: str = ""
    occurred_at: datetime
    #: ``report.ready``: the HTML summary and every stored file (charts).
    report_location: str = ""
    report_files: list[str] = msgspec.field(default_factory=list)


class DeliveryRequested(Event, frozen=True, kw_only=True, tag="notify.delivery"):
    """Send one notification to one subscription (the event id is the delivery id, derived
    from the notification's id and the subscription's, so a fan-out that runs twice asks
    once)."""

    topic: ClassVar[str] = "deliveries"
    #: Only the fan-out publishes deliveries: an agent could otherwise send anything to any
    #: subscriber's destination.
    external: ClassVar[bool] = False
    subscription_id: str
    message: Message
