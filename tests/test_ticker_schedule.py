"""Schedules as pure functions: intervals, cron short forms, DST, missed-tick policies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from producers.schedules import SCHEDULES
from schemas.ticks import Tick
from streamproc.errors import ConfigError
from streamproc.schedule import Schedule, cron, every, plan_fires, tick_id

T0 = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def sched(**kw: object) -> Schedule:
    return Schedule(name="s", trigger=every(1), event=Tick, **kw)  # type: ignore[arg-type]


def test_interval_times_are_aligned_to_the_epoch() -> None:
    e = every("5 min")
    assert e.interval_s == 300
    assert e.next_after(T0 + timedelta(seconds=1)) == T0 + timedelta(minutes=5)
    assert e.next_after(T0) == T0 + timedelta(minutes=5)  # strictly after
    times, count = e.latest(T0, T0 + timedelta(minutes=31), 2)
    assert times == [T0 + timedelta(minutes=25), T0 + timedelta(minutes=30)]
    assert count == 6


@pytest.mark.parametrize(
    ("spec", "seconds"), [("1s", 1), ("every 5 min", 300), ("6h", 21600), ("250ms", 0.25)]
)
def test_interval_spellings(spec: str, seconds: float) -> None:
    assert every(spec).interval_s == seconds


@pytest.mark.parametrize("spec", ["5 fortnights", "", "min"])
def test_bad_intervals_are_refused(spec: str) -> None:
    with pytest.raises(ConfigError):
        every(spec)


def test_cron_short_forms() -> None:
    assert cron("Mon 09:00").expr == "0 9 * * 1"
    assert cron("daily 02:00").expr == "0 2 * * *"
    monday = cron("Mon 09:00").next_after(T0)  # 2026-11-23 is a Monday, 12:00 is past 09:00
    assert monday == datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
    with pytest.raises(ConfigError):
        cron("61 * * * *")
    with pytest.raises(ConfigError):
        cron("Mon 09:00", tz="Mars/Olympus")


def test_cron_across_spring_forward_fires_once_an_hour_later_on_the_clock() -> None:
    """02:30 does not exist on 2026-03-08 in New York: it fires at 03:30 EDT (07:30Z)."""
    c = cron("30 2 * * *", tz="America/New_York")
    t = datetime(2026, 3, 6, 12, tzinfo=UTC)
    fired = []
    for _ in range(3):
        t = c.next_after(t)
        fired.append(t)
    assert fired == [
        datetime(2026, 3, 7, 7, 30, tzinfo=UTC),  # 02:30 EST
        datetime(2026, 3, 8, 7, 30, tzinfo=UTC),  # 03:30 EDT, the skipped 02:30
        datetime(2026, 3, 9, 6, 30, tzinfo=UTC),  # 02:30 EDT
    ]


def test_cron_across_fall_back_fires_the_repeated_time_once() -> None:
    """01:30 happens twice on 2026-11-01 in New York: one tick, at the first (EDT)."""
    c = cron("30 1 * * *", tz="America/New_York")
    times, count = c.latest(
        datetime(2026, 10, 31, 12, tzinfo=UTC), datetime(2026, 11, 2, 12, tzinfo=UTC), 10
    )
    assert times == [
        datetime(2026, 11, 1, 5, 30, tzinfo=UTC),
        datetime(2026, 11, 2, 6, 30, tzinfo=UTC),
    ]
    assert count == 2


def test_weekly_cron_keeps_wall_time_across_dst_in_berlin() -> None:
    c = cron("Mon 09:00", tz="Europe/Berlin")
    before = c.next_after(datetime(2026, 3, 20, tzinfo=UTC))
    after = c.next_after(before)
    assert before == datetime(2026, 3, 23, 8, 0, tzinfo=UTC)  # CET, UTC+1
    assert after == datetime(2026, 3, 30, 7, 0, tzinfo=UTC)  # CEST, UTC+2


def test_half_hourly_cron_in_the_spring_gap_is_strictly_increasing() -> None:
    c = cron("*/30 * * * *", tz="America/New_York")
    t = datetime(2026, 3, 8, 6, 0, tzinfo=UTC)
    seen = []
    for _ in range(5):
        t = c.next_after(t)
        seen.append(t)
    assert seen == sorted(set(seen))
    assert seen[0] == datetime(2026, 3, 8, 6, 30, tzinfo=UTC)


def test_missed_policy_latest_fires_the_latest_once() -> None:
    fire, passed, latest = plan_fires(sched(), T0, T0 + timedelta(seconds=10.5))
    assert fire == [T0 + timedelta(seconds=10)]
    assert (passed, latest) == (9, T0 + timedelta(seconds=10))


def test_missed_policy_skip_drops_what_is_past_its_grace() -> None:
    s = sched(missed="skip", grace_s=0.2)
    assert plan_fires(s, T0, T0 + timedelta(seconds=10.5))[:2] == ([], 10)
    on_time = plan_fires(s, T0, T0 + timedelta(seconds=10.1))[0]
    assert on_time == [T0 + timedelta(seconds=10)]


def test_missed_policy_catch_up_is_bounded_and_in_order() -> None:
    s = sched(missed="catch_up", catch_up_max=3)
    fire, passed, _ = plan_fires(s, T0, T0 + timedelta(seconds=10.5))
    assert fire == [T0 + timedelta(seconds=n) for n in (8, 9, 10)]
    assert passed == 7


def test_nothing_due_before_the_next_time() -> None:
    assert plan_fires(sched(), T0, T0 + timedelta(seconds=0.9)) == ([], 0, None)


def test_tick_ids_are_deterministic_per_schedule_and_time() -> None:
    assert tick_id("a", T0) == tick_id("a", T0)
    assert tick_id("a", T0) != tick_id("b", T0)
    assert tick_id("a", T0) != tick_id("a", T0 + timedelta(milliseconds=1))


def test_seed_schedule_table() -> None:
    by_name = {s.name: s for s in SCHEDULES}
    assert set(by_name) == {
        "discovery", "hibernation", "resource-monitor", "ad-fatigue",
        "temp-cleanup", "qa-cleanup", "weekly-report",
    }  # fmt: skip
    assert by_name["weekly-report"].trigger.next_after(T0).weekday() == 0
    assert all(s.event.topic == "ticks" for s in SCHEDULES)


def test_schedule_needs_a_tick_event() -> None:
    from schemas.cluster import SpotInterruption

    with pytest.raises(ConfigError):
        Schedule(name="x", trigger=every(1), event=SpotInterruption)  # type: ignore[arg-type]
