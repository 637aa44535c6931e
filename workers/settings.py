"""Settings of worker monitoring, from ``STREAMPROC_WORKERS_<FIELD>`` (docs/workers.md)."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from schemas.workers import REGION_RE
from streamproc.config import settings_from_env

__all__ = ("WorkerSettings", "from_env")


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``STREAMPROC_WORKERS_<FIELD>``."""

    #: False: poll ticks are acked without polling, no schedule is added, nothing discovered.
    enabled: bool = True
    #: Seconds between two polls of a worker without its own ``interval_s``.
    interval_s: int = 300
    #: Percent; a worker's own thresholds override them.
    cpu_threshold: float = 90.0
    memory_threshold: float = 90.0
    #: An alert episode ends when the value falls below ``threshold - recovery_margin``.
    recovery_margin: float = 5.0
    #: Instances with this tag key (any value) are imported by discovery.
    discover_tag: str = "streamproc:worker"
    #: Run discovery (and the schedule resync) when a consume process starts.
    discover_on_start: bool = True
    #: Regions searched with the base credentials; empty = ``STREAMPROC_AWS_REGION``.
    #: Registered accounts (``streamproc accounts``) are searched in their own regions.
    discover_regions: tuple[str, ...] = ()
    #: The ``cluster_id`` of alert notifications: "" reaches the '*' subscribers.
    alert_cluster_id: str = ""
    #: ``worker-events`` (metrics, status changes) is kept to about this many entries.
    events_maxlen: int = 100_000

    def __post_init__(self) -> None:
        if not 5 <= self.interval_s <= 86_400:
            raise ValueError("interval_s must be within 5..86400")
        for name in ("cpu_threshold", "memory_threshold"):
            if not 0 < getattr(self, name) <= 100:
                raise ValueError(f"{name} must be within 0 (excluded)..100")
        if not 0 <= self.recovery_margin < 100:
            raise ValueError("recovery_margin must be within 0..100 (excluded)")
        if not 1 <= len(self.discover_tag) <= 128:
            raise ValueError("discover_tag: 1 to 128 characters")
        for r in self.discover_regions:
            if not REGION_RE.fullmatch(r):
                raise ValueError(f"discover_regions: {r[:40]!r} is not a region name")
        if not 1_000 <= self.events_maxlen <= 100_000_000:
            raise ValueError("events_maxlen must be within 1000..100000000")
        if len(self.alert_cluster_id) > 256:
            raise ValueError("alert_cluster_id: at most 256 characters")


def from_env(env: Mapping[str, str]) -> WorkerSettings:
    return settings_from_env(WorkerSettings, "STREAMPROC_WORKERS_", env)
