"""Periodic tick events emitted by the ticker (``streamproc ticker``).

Every schedule in ``producers/schedules.py`` emits one typed tick to the topic ``ticks``; a
concern handles the tick types it cares about and the runtime acks the others unread. The
event ``id`` is deterministic (schedule name + scheduled time), so two leaders, or a leader
that fires again after a crash, publish one tick. The base class ``Tick`` is the engine's
(``streamproc.schedule``), re-exported here.
"""

from __future__ import annotations

from streamproc.schedule import Tick

__all__ = (
    "TICK_TYPES",
    "AdFatigueTick",
    "DiscoveryTick",
    "HibernationTick",
    "QaCleanupTick",
    "ResourceMonitorTick",
    "TempCleanupTick",
    "Tick",
    "WeeklyReportTick",
)


class DiscoveryTick(Tick, frozen=True, kw_only=True, tag="tick.discovery"):
    """Scan AWS accounts (WORKLOADS §1): every 5 min, one at a time."""


class HibernationTick(Tick, frozen=True, kw_only=True, tag="tick.hibernation"):
    """Apply cluster hibernation schedules (WORKLOADS §1): every minute."""


class ResourceMonitorTick(Tick, frozen=True, kw_only=True, tag="tick.resource_monitor"):
    """Sample CPU, memory, disk, GPU (WORKLOADS §3): every minute."""


class AdFatigueTick(Tick, frozen=True, kw_only=True, tag="tick.ad_fatigue"):
    """Ad-fatigue monitoring (WORKLOADS §3): every 6 h."""


class TempCleanupTick(Tick, frozen=True, kw_only=True, tag="tick.cleanup_temp"):
    """Remove temp files older than 7 days / over the size cap (WORKLOADS §3): daily 02:00."""


class QaCleanupTick(Tick, frozen=True, kw_only=True, tag="tick.cleanup_qa"):
    """QA agents' daily cleanup (WORKLOADS §5): daily 03:00."""


class WeeklyReportTick(Tick, frozen=True, kw_only=True, tag="tick.weekly_report"):
    """Aggregate 7 days and render the weekly report (WORKLOADS §1): Mondays 09:00."""


#: The typed ticks of the seed schedules (registered in ``schemas.REGISTRY``).
TICK_TYPES: tuple[type[Tick], ...] = (
    DiscoveryTick,
    HibernationTick,
    ResourceMonitorTick,
    AdFatigueTick,
    TempCleanupTick,
    QaCleanupTick,
    WeeklyReportTick,
)
