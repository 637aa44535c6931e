"""How a schedule and its state are shown (CLI and API alike)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from spot._schedule import Schedule, Slots, wants_sleep
from spot.hibernation_store import SleepRecord

__all__ = ("next_change", "public", "state_of")


def next_change(schedule: Schedule, now: datetime, asleep: bool) -> datetime | None:
    """When the cluster's wanted state next differs from ``asleep`` (5-minute steps, 8 days)."""
    t = now.replace(second=0, microsecond=0)
    t -= timedelta(minutes=t.minute % 5)
    for _ in range(8 * 24 * 12):
        t += timedelta(minutes=5)
        if wants_sleep(schedule, Slots(t)) != asleep:
            return t
    return None


def state_of(rec: SleepRecord | None) -> str:
    if rec is None:
        return "awake"
    return "asleep" if rec.complete else "going-to-sleep"


def public(s: Schedule, rec: SleepRecord | None, now: datetime) -> dict[str, Any]:
    out = msgspec.structs.asdict(s)
    out["asgs"] = list(s.asgs)
    out["matrix"] = [s.week[d * 24 : d * 24 + 24] for d in range(7)]
    del out["week"]
    out["state"] = state_of(rec)
    out["wants_sleep_now"] = wants_sleep(s, Slots(now))
    nxt = next_change(s, now, rec is not None)
    out["next_change"] = nxt.isoformat(timespec="minutes") if nxt else None
    if rec is not None:
        out["remembered"] = {k: msgspec.structs.asdict(v) for k, v in rec.asgs.items()}
        out["asleep_since"] = datetime.fromtimestamp(rec.since_ms / 1000, UTC).isoformat(
            timespec="seconds"
        )
        out["instances_asleep"] = rec.instances
        out["usd_per_hour_saved"] = rec.usd_per_hour
    return out
