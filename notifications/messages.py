"""Every notification, whatever event it came from, as one ``Message`` the channels render.

Every message goes through ``schemas.notify.fit``: its text is built from agents' (a pod or
workload name), and a message over its schema's limits would make the delivery that carries
it undecodable.
"""

from __future__ import annotations

from typing import Any

from schemas.notify import (
    Message,
    Notification,
    PodPendingClassified,
    RightSizingRecommendation,
    fit,
)
from schemas.renders import ReportReady
from streamproc.event import Event

__all__ = ("NOTIFICATION_TYPES", "message_of")

#: The events that are notifications, by topic: what the fan-out concern reads.
NOTIFICATION_TYPES: tuple[type[Event], ...] = (
    Notification,
    RightSizingRecommendation,
    PodPendingClassified,
    ReportReady,
)
_MIB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / _MIB:,.0f} MiB"


def message_of(event: Any, base_url: str) -> Message:
    """The message of a notification event (links default to the dashboard)."""
    dashboard = base_url.rstrip("/") + "/dashboard"
    common: dict[str, Any] = {
        "notification_id": event.id,
        "type": event.type_name(),
        "occurred_at": event.occurred_at,
    }
    if isinstance(event, Notification):
        return fit(
            Message(
                **common,
                cluster_id=event.cluster_id,
                severity=event.severity,
                title=event.title,
                body=event.body,
                link=event.link or dashboard,
            )
        )
    if isinstance(event, RightSizingRecommendation):
        return fit(
            Message(
                **common,
                cluster_id=event.cluster_id,
                severity="info",
                title=f"Right-size {event.namespace}/{event.workload} ({event.container})",
                body=f"It was OOM-killed: raise its memory limit from "
                f"{_mib(event.current_limit_bytes)} to {_mib(event.recommended_limit_bytes)}.",
                link=dashboard,
            )
        )
    if isinstance(event, PodPendingClassified):
        return fit(
            Message(
                **common,
                cluster_id=event.cluster_id,
                severity="warning",
                title=f"Pod {event.namespace}/{event.pod} pending: "
                f"{event.category.replace('_', ' ')}",
                body="The scheduler cannot place it; see the cluster's events for details.",
                link=dashboard,
            )
        )
    if isinstance(event, ReportReady):
        span = ""
        if event.period_start and event.period_end:
            span = f" {event.period_start:%Y-%m-%d} to {event.period_end:%Y-%m-%d}"
        link = event.location if event.location.startswith(("http://", "https://")) else dashboard
        return fit(
            Message(
                **common,
                severity="info",
                title=f"Weekly report{span}",
                body=f"The report is ready ({len(event.files)} files).",
                link=link,
                report_location=event.location,
                report_files=list(event.files),
            )
        )
    raise TypeError(f"{type(event).__name__} is not a notification")
