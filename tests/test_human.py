"""Times and intervals for people (``streamproc._human``): ISO-8601 UTC plus how far from now,
intervals as ``every 6 h``."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from streamproc import _human

NOW = datetime(2026, 12, 1, 20, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("delta_s", "text"),
    [
        (45, "2026-12-01T20:00:45Z (in 45 s)"),
        (-180, "2026-12-01T19:57:00Z (3 min ago)"),
        (0.4, "2026-12-01T20:00:00Z (now)"),
        (6 * 3600, "2026-12-02T02:00:00Z (in 6 h)"),
        (-3 * 86400, "2026-11-28T20:00:00Z (3 d ago)"),
    ],
)
def test_an_instant_is_iso_utc_and_how_far_from_now(delta_s: float, text: str) -> None:
    assert _human.when(NOW + timedelta(seconds=delta_s), NOW) == text


def test_when_takes_iso_text_any_zone_and_shows_other_text_as_is() -> None:
    assert _human.when("2026-12-01T20:00:45.123Z", NOW) == "2026-12-01T20:00:45Z (in 45 s)"
    plus_one = datetime(2026, 12, 1, 21, 0, 45, tzinfo=timezone(timedelta(hours=1)))
    assert _human.when(plus_one, NOW) == "2026-12-01T20:00:45Z (in 45 s)"
    assert _human.when(None, NOW) == _human.when("", NOW) == "-"
    assert _human.when("soon\x1b[2J", NOW) == "soon\\x1b[2J"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (6 * 3600, "every 6 h"),
        (300, "every 5 min"),
        (30, "every 30 s"),
        (90, "every 90 s"),
        (5400, "every 90 min"),
        (86400, "every 1 d"),
        (0.5, "every 0.5 s"),
        (8899.41, "every 2.47 h"),
    ],
)
def test_an_interval_reads_every_n_units(seconds: float, text: str) -> None:
    assert _human.every(seconds) == text


def test_a_triggers_seconds_become_units_and_a_cron_line_stays() -> None:
    assert _human.trigger("every 21600s (offset 117.2s)") == "every 6 h (offset 1.95 min)"
    assert _human.trigger("every 300s") == "every 5 min"
    assert _human.trigger("cron '0 9 * * 1' UTC") == "cron '0 9 * * 1' UTC"
