"""The typed events of streamproc's applications, and the one registry of all of them."""

from __future__ import annotations

from typing import Any

from schemas.cluster import NodeNotReady, OOMKilled, PodPending, SpotInterruption
from schemas.notify import Notification, PodPendingClassified, RightSizingRecommendation
from schemas.ticks import Tick
from streamproc.codec import Registry

__all__ = (
    "REGISTRY",
    "NodeNotReady",
    "Notification",
    "OOMKilled",
    "PodPending",
    "PodPendingClassified",
    "RightSizingRecommendation",
    "SpotInterruption",
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
        Tick,
    ]
)
