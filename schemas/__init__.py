"""The typed events of this repository's application, and the one registry of all of them.

``Tick`` (``streamproc.schedule``) and the task requests (``streamproc.tasks.events``) are the
engine's; they are re-exported here so the application's code reads from one place.
"""

from __future__ import annotations

from typing import Any

from schemas import hibernation, hosts, inventory, metrics, qa, workers
from schemas.cluster import NodeNotReady, OOMKilled, PodPending, SpotInterruption
from schemas.notify import (
    DeliveryRequested,
    Message,
    Notification,
    PodPendingClassified,
    RightSizingRecommendation,
)
from schemas.renders import RenderDone, RenderProgress, RenderRequested, ReportReady
from schemas.tasks import TASK_EVENTS, TaskRequested
from schemas.ticks import TICK_TYPES, Tick
from streamproc.codec import Registry

__all__ = (
    "REGISTRY",
    "DeliveryRequested",
    "Message",
    "NodeNotReady",
    "Notification",
    "OOMKilled",
    "PodPending",
    "PodPendingClassified",
    "RightSizingRecommendation",
    "SpotInterruption",
    "TaskRequested",
    "Tick",
)

REGISTRY: Registry[Any] = Registry(
    [
        SpotInterruption,
        OOMKilled,
        NodeNotReady,
        PodPending,
        Notification,
        RightSizingRecommendation,
        PodPendingClassified,
        DeliveryRequested,
        Tick,
        *TICK_TYPES,
        *(RenderRequested, RenderProgress, RenderDone, ReportReady),
        *TASK_EVENTS,
        *inventory.TYPES,
        *hibernation.TYPES,
        *hosts.TYPES,
        *metrics.TYPES,
        *workers.TYPES,
        *qa.TYPES,
    ]
)
