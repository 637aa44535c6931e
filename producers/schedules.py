"""The ticker's schedule table (like a beat schedule): what fires when, in which time zone.

Each row emits a typed tick (``schemas/ticks.py``) to the topic ``ticks``; the concern that
does the work handles that tick type. Interval schedules are aligned to the Unix epoch, so
"every 5 min" fires at :00, :05, :10 ... ; cron schedules use wall-clock time in ``TZ``.

Missed ticks (after downtime): ``latest`` (the default) fires the latest missed time once;
``skip`` drops what is older than the grace; ``catch_up`` fires up to ``catch_up_max`` of
them in order. Run ``streamproc ticker --list`` to see the next fire times.
"""

from __future__ import annotations

from schemas.ticks import (
    AdFatigueTick,
    DiscoveryTick,
    HibernationTick,
    QaCleanupTick,
    ResourceMonitorTick,
    TempCleanupTick,
    WeeklyReportTick,
)
from streamproc.schedule import Schedule, cron, every

__all__ = ("SCHEDULES", "TZ")

#: The zone of the wall-clock (cron) schedules.
TZ = "UTC"

# fmt: off
SCHEDULES: tuple[Schedule, ...] = (
    #        name                trigger                        tick event            after downtime
    Schedule(name="discovery",        trigger=every("5 min"),          event=DiscoveryTick,       missed="latest"),  # noqa: E501
    Schedule(name="hibernation",      trigger=every("1 min"),          event=HibernationTick,     missed="latest"),  # noqa: E501
    Schedule(name="resource-monitor", trigger=every("1 min"),          event=ResourceMonitorTick, missed="skip"),  # noqa: E501
    Schedule(name="ad-fatigue",       trigger=every("6 h"),            event=AdFatigueTick,       missed="latest"),  # noqa: E501
    Schedule(name="temp-cleanup",     trigger=cron("daily 02:00", tz=TZ), event=TempCleanupTick,  missed="latest"),  # noqa: E501
    Schedule(name="qa-cleanup",       trigger=cron("daily 03:00", tz=TZ), event=QaCleanupTick,    missed="latest"),  # noqa: E501
    Schedule(name="weekly-report",    trigger=cron("Mon 09:00", tz=TZ),   event=WeeklyReportTick, missed="latest", grace_s=300),  # noqa: E501
)
# fmt: on
