"""Schedules: when a periodic tick is due (pure functions, no I/O), and the tick event.

An application's schedule table is a sequence of ``Schedule`` rows (``App(schedules=...)``);
each fires a ``Tick`` subclass of the application's own to the topic ``ticks``, and the
ticker role (``streamproc.ticker``) publishes it.

Two kinds, both in a time zone:

- ``every("5m")``: every fixed interval, aligned to the Unix epoch (plus an optional offset),
  so every replica computes the same instants. Intervals are absolute time: DST does not
  move them.
- ``cron("0 9 * * 1")`` or ``cron("Mon 09:00")`` / ``cron("daily 02:00")``: wall-clock times
  in the schedule's zone (croniter over naive local times, then zoneinfo). A wall time that
  does not exist (spring forward) fires at the same UTC offset as before the change, i.e. one
  hour later on the clock (02:30 -> 03:30); a wall time that occurs twice (fall back) fires
  once, at its first occurrence.

Missed-tick policies (what to fire for scheduled times that passed while no leader fired):
``skip`` fires the latest only if it is still within the schedule's grace, ``latest`` (the
default) fires the latest once, ``catch_up`` fires the latest ``catch_up_max`` in order.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import ClassVar, Literal, Protocol
from zoneinfo import ZoneInfo

from croniter import croniter

from streamproc.errors import ConfigError
from streamproc.event import Event
from streamproc.keys import check_name

__all__ = (
    "Cron",
    "Every",
    "MissedPolicy",
    "Planned",
    "Schedule",
    "Tick",
    "Trigger",
    "cron",
    "due_times",
    "every",
    "from_ms",
    "plan_fires",
    "tick_id",
    "tick_id_ms",
)

MissedPolicy = Literal["skip", "latest", "catch_up"]

_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}
_INTERVAL_RE = re.compile(r"^\s*(?:every\s+)?(\d+(?:\.\d+)?)\s*([a-z]+)\s*$", re.I)
_DAYS = {"mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6, "sun": 0}
_SHORT_RE = re.compile(
    r"^\s*(mon|tue|wed|thu|fri|sat|sun|daily)[a-z]*\s+(\d{1,2}):(\d{2})\s*$", re.I
)
_TICK_NS = uuid.UUID("0b7f4c1e-2a63-4f0e-9d8a-5c3e1f7a2b94")
#: Cron candidates are searched this far around an instant (covers a DST shift).
_DST_SLACK = timedelta(hours=3)


class Tick(Event, frozen=True, kw_only=True, tag="tick"):
    """A schedule fired. ``id`` is deterministic: schedule name + scheduled time.

    Applications subclass it per schedule (``class WeeklyReportTick(Tick, tag="tick.weekly")``)
    so a concern handles the ticks it cares about and the others are acked unread.
    """

    topic: ClassVar[str] = "ticks"
    #: Only the ticker fires ticks (and operators, by ``/v1/schedules`` or ``streamproc
    #: publish``): a posted one would run a scan, a report or a cleanup on anyone's say.
    external: ClassVar[bool] = False
    schedule: str
    scheduled_for: datetime
    #: The leader's fencing token when it fired.
    fence: int = 0
    #: Scheduled times passed over before this one (missed-tick policy), 0 when on time.
    missed: int = 0
    #: True when fired by a catch-up after downtime rather than on time.
    catch_up: bool = False


def tick_id(schedule: str, at: datetime) -> str:
    """The deterministic event id of ``schedule``'s tick for scheduled time ``at``."""
    return tick_id_ms(schedule, _ms(at))


_TICK_NS_BYTES = _TICK_NS.bytes


def tick_id_ms(schedule: str, at_ms: int) -> str:
    """``tick_id`` of a time in epoch ms: ``uuid5(namespace, "<schedule>@<ms>")`` as text,
    computed without building a ``uuid.UUID`` (the ticker's hot path)."""
    b = bytearray(hashlib.sha1(_TICK_NS_BYTES + f"{schedule}@{at_ms}".encode()).digest()[:16])
    b[6] = (b[6] & 0x0F) | 0x50
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


@dataclass(frozen=True)
class Every:
    """Every ``interval_s`` seconds, at ``epoch + offset_s + k * interval_s``."""

    interval_s: float
    offset_s: float = 0.0

    def __post_init__(self) -> None:
        if self.interval_s < 0.01:
            raise ConfigError(f"interval must be >= 10 ms, got {self.interval_s}s")

    def next_after(self, t: datetime) -> datetime:
        step_ms = round(self.interval_s * 1000)
        base = _ms(t) - round(self.offset_s * 1000)
        return from_ms((base // step_ms + 1) * step_ms + round(self.offset_s * 1000))

    def latest(self, after: datetime, upto: datetime, n: int) -> tuple[list[datetime], int]:
        """Up to ``n`` latest times in ``(after, upto]`` (oldest first) and how many there are."""
        step_ms = round(self.interval_s * 1000)
        off = round(self.offset_s * 1000)
        first = (_ms(after) - off) // step_ms + 1
        last = (_ms(upto) - off) // step_ms
        count = max(0, last - first + 1)
        ks = range(max(first, last - n + 1), last + 1)
        return [from_ms(k * step_ms + off) for k in ks], count

    def __str__(self) -> str:
        return f"every {self.interval_s:g}s"


@dataclass(frozen=True)
class Cron:
    """A cron expression evaluated on wall-clock time in ``tz``."""

    expr: str
    tz: str = "UTC"
    zone: ZoneInfo = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            zone = ZoneInfo(self.tz)
        except Exception as e:
            raise ConfigError(f"unknown time zone {self.tz!r}") from e
        if not croniter.is_valid(self.expr):
            raise ConfigError(f"invalid cron expression {self.expr!r}")
        object.__setattr__(self, "zone", zone)

    def _local(self, t: datetime) -> datetime:
        return t.astimezone(self.zone).replace(tzinfo=None)

    def _utc(self, naive: datetime) -> datetime:
        # fold=0: a repeated wall time is its first occurrence; a missing one keeps the
        # offset from before the change (so it lands one hour later on the clock).
        return naive.replace(tzinfo=self.zone, fold=0).astimezone(UTC)

    def _forward(self, start_local: datetime) -> Iterator[datetime]:
        it = croniter(self.expr, start_local)
        while True:
            yield it.get_next(datetime)

    def _backward(self, start_local: datetime) -> Iterator[datetime]:
        it = croniter(self.expr, start_local)
        while True:
            yield it.get_prev(datetime)

    def next_after(self, t: datetime) -> datetime:
        best: datetime | None = None
        horizon: datetime | None = None
        for naive in self._forward(self._local(t) - _DST_SLACK):
            if horizon is not None and naive > horizon:
                break
            at = self._utc(naive)
            if at > t and (best is None or at < best):
                best = at
                horizon = naive + _DST_SLACK
        assert best is not None  # croniter always yields a next time
        return best

    def latest(self, after: datetime, upto: datetime, n: int) -> tuple[list[datetime], int]:
        """Up to ``n`` latest times in ``(after, upto]`` (oldest first), and a count (capped)."""
        found: set[datetime] = set()
        stop = self._local(after) - _DST_SLACK
        for naive in self._backward(self._local(upto) + _DST_SLACK):
            if naive < stop:
                break
            at = self._utc(naive)
            if after < at <= upto:
                found.add(at)
            if len(found) > n and naive < self._local(min(found)) - _DST_SLACK:
                break
        ordered = sorted(found)
        return ordered[-n:] if n else [], len(ordered)

    def __str__(self) -> str:
        return f"cron {self.expr!r} {self.tz}"


Trigger = Every | Cron


def every(spec: str | float, *, offset_s: float = 0.0) -> Every:
    """``every("5 min")``, ``every("1s")``, ``every("6h")`` or seconds as a number."""
    if isinstance(spec, int | float):
        return Every(float(spec), offset_s)
    m = _INTERVAL_RE.match(spec)
    unit = m.group(2).lower() if m else ""
    if unit.endswith("s") and unit not in _UNITS:
        unit = unit[:-1]
    if not m or unit not in _UNITS:
        raise ConfigError(f"bad interval {spec!r}: expected e.g. '5 min', '1s', '6h'")
    return Every(float(m.group(1)) * _UNITS[unit], offset_s)


def cron(spec: str, *, tz: str = "UTC") -> Cron:
    """A cron string (``"0 9 * * 1"``) or a short form: ``"Mon 09:00"``, ``"daily 02:00"``."""
    m = _SHORT_RE.match(spec)
    if m:
        day, hour, minute = m.group(1).lower()[:3], int(m.group(2)), int(m.group(3))
        if hour > 23 or minute > 59:
            raise ConfigError(f"bad time in {spec!r}")
        dow = "*" if day == "dai" else str(_DAYS[day])
        return Cron(f"{minute} {hour} * * {dow}", tz)
    return Cron(spec, tz)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """One row of the schedule table: what fires when, and what to do after downtime."""

    name: str
    trigger: Trigger
    #: The tick it fires: ``Tick`` or a subclass (registered in the application's registry).
    event: type[Tick]
    #: Missed ticks: ``skip``, ``latest`` (default) or ``catch_up`` (up to ``catch_up_max``).
    missed: MissedPolicy = "latest"
    catch_up_max: int = 10
    #: A tick this late or less counts as on time (``skip`` still fires it).
    grace_s: float = 30.0
    #: Ordering key of the ticks (default: the schedule name).
    key: str = ""

    def __post_init__(self) -> None:
        check_name("schedule", self.name)
        if not (isinstance(self.event, type) and issubclass(self.event, Tick)):
            raise ConfigError(
                f"schedule {self.name!r}: {getattr(self.event, '__name__', self.event)!r} is not "
                "a tick event (a subclass of streamproc.schedule.Tick)"
            )
        if self.missed not in ("skip", "latest", "catch_up"):
            raise ConfigError(f"schedule {self.name!r}: unknown missed policy {self.missed!r}")
        if self.catch_up_max < 1 or self.grace_s < 0:
            raise ConfigError(f"schedule {self.name!r}: catch_up_max >= 1 and grace_s >= 0")


class Planned(Protocol):
    """What planning needs of a schedule: a static ``Schedule`` or a runtime one."""

    @property
    def trigger(self) -> Trigger: ...
    @property
    def missed(self) -> MissedPolicy: ...
    @property
    def catch_up_max(self) -> int: ...
    @property
    def grace_s(self) -> float: ...


def due_times(s: Planned, after: datetime, now: datetime) -> tuple[list[datetime], int]:
    """Scheduled times in ``(after, now]``: up to ``catch_up_max`` latest, and their count."""
    return s.trigger.latest(after, now, max(s.catch_up_max, 1))


def plan_fires(
    s: Planned, after: datetime, now: datetime
) -> tuple[list[datetime], int, datetime | None]:
    """What to fire now: (times to fire, oldest first; times passed over; latest due time).

    The caller records the latest due time as fired, whether it fired or was skipped.
    """
    times, count = due_times(s, after, now)
    if not times:
        return [], 0, None
    latest = times[-1]
    if s.missed == "catch_up":
        fire = times[-s.catch_up_max :]
    elif s.missed == "skip":
        fire = [latest] if (now - latest).total_seconds() <= s.grace_s else []
    else:
        fire = [latest]
    return fire, count - len(fire), latest
