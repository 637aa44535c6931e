"""Hibernation schedules: the week matrix, its two syntaxes, and the decision (pure, no I/O).

A schedule's ``week`` is 168 characters, one per hour of the week in the cluster's own time
zone, Monday 00:00 first: ``1`` = sleep, ``0`` = awake. Slot ``weekday * 24 + hour`` (Monday
= 0) of the *local* time decides.

**Rules** (``streamproc hibernation set --sleep ... --awake ...``): ``DAYS HOURS``.

- ``DAYS``: ``mon``, ``mon-fri``, ``sat,sun``, ``fri-mon`` (wraps), ``daily``/``all``,
  ``weekdays``, ``weekends``.
- ``HOURS``: ``START-END``, whole hours, ``START`` in 0..23, ``END`` in 1..24: from
  ``START:00`` up to (not including) ``END:00``. ``END <= START`` runs past midnight into the
  next day: ``mon-fri 20-08`` sleeps Monday 20:00 to Tuesday 08:00 ... Friday 20:00 to
  Saturday 08:00. ``0-24`` is the whole day.

Every slot starts awake; ``--sleep`` rules are applied in order, then ``--awake`` rules carve
exceptions out of them (``--sleep 'daily 0-24' --awake 'mon-fri 9-17'``).

**Matrix** (``--matrix FILE``, or the API's ``matrix``): 7 lines, Monday first, of 24 hour
characters: ``1``/``S``/``s`` sleep, ``0``/``.`` awake; spaces are ignored (group the hours as
you like), and blank lines and lines starting with ``#`` are skipped.

**Decision**: a cluster should be asleep at instant ``t`` when the slot of ``t`` and the slot
of ``t + prewarm`` are both sleep: within ``prewarm_min`` (30) minutes of waking it is woken
early (pre-warm). Both instants are real (UTC) time converted with zoneinfo, so DST is right
by construction: on the spring-forward day the skipped local hour's slot is never evaluated,
on the fall-back day the repeated hour's slot holds for two real hours, and the pre-warm is
30 real minutes before the first awake local time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from streamproc.errors import ConfigError

__all__ = (
    "CLUSTER_RE",
    "DAYS",
    "Schedule",
    "Slots",
    "apply_rules",
    "grid",
    "new_schedule",
    "parse_matrix",
    "slot_of",
    "wants_sleep",
)

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
#: An EKS cluster name (1-100 characters, letters, digits, '-', '_').
CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
_ACCOUNT_RE = re.compile(r"[0-9]{12}")
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
#: An Auto Scaling group name (AWS allows 1-255 characters; no ':' so it is not an ARN).
_ASG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-/@+=]{0,254}")
_RULE_RE = re.compile(r"\s*([a-z,\-]+)\s+(\d{1,2})\s*-\s*(\d{1,2})\s*", re.I)
_DAY_ALIASES = {
    "daily": DAYS,
    "all": DAYS,
    "weekdays": DAYS[:5],
    "weekends": DAYS[5:],
}
_SLEEP_CHARS = frozenset("1Ss")
_AWAKE_CHARS = frozenset("0.")
#: The most explicit ASGs a schedule may list.
MAX_ASGS = 50


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One cluster's hibernation schedule, as stored."""

    cluster: str
    account: str
    region: str
    tz: str
    #: 168 characters, Monday 00:00 first (local time): "1" sleep, "0" awake.
    week: str
    #: Explicit Auto Scaling group names; empty = the groups tagged with the cluster's name.
    asgs: tuple[str, ...] = ()
    prewarm_min: int = 30
    #: Set by ``remove`` while the cluster sleeps: it is woken, then the schedule is deleted.
    removing: bool = False
    updated_at: str = ""
    updated_by: str = ""


def _days(spec: str) -> list[int]:
    out: list[int] = []
    for part in spec.lower().split(","):
        if part in _DAY_ALIASES:
            out += [DAYS.index(d) for d in _DAY_ALIASES[part]]
            continue
        first, sep, last = part.partition("-")
        if first not in DAYS or (sep and last not in DAYS):
            raise ConfigError(
                f"unknown day {part[:20]!r}: use mon..sun, ranges (mon-fri), lists (sat,sun), "
                "daily, weekdays or weekends"
            )
        a = DAYS.index(first)
        b = DAYS.index(last) if sep else a
        out += [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    return out


def _rule_slots(rule: str) -> list[int]:
    """The slots one ``DAYS START-END`` rule covers."""
    if not isinstance(rule, str) or len(rule) > 100:
        raise ConfigError("a rule is text of at most 100 characters, e.g. 'mon-fri 20-08'")
    m = _RULE_RE.fullmatch(rule)
    if m is None:
        raise ConfigError(f"{rule[:60]!r} is not 'DAYS START-END' (e.g. 'mon-fri 20-08')")
    start, end = int(m.group(2)), int(m.group(3))
    if not 0 <= start <= 23 or not 0 <= end <= 24:
        raise ConfigError(f"{rule[:60]!r}: hours are START 0..23 and END 1..24")
    if end == 0:
        end = 24  # "20-0": until midnight
    if start == end:
        raise ConfigError(f"{rule[:60]!r}: START and END are the same hour (0-24 is all day)")
    slots: list[int] = []
    for day in _days(m.group(1)):
        base = day * 24
        if end > start:
            slots += range(base + start, base + end)
        else:  # past midnight into the next day (the week wraps from Sunday to Monday)
            slots += range(base + start, base + 24)
            slots += [(base + 24 + h) % 168 for h in range(end)]
    return slots


def apply_rules(sleep: Iterable[str], awake: Iterable[str] = ()) -> str:
    """The week (168 characters) of ``--sleep`` rules, then ``--awake`` exceptions."""
    week = ["0"] * 168
    for i, group in enumerate((sleep, awake)):
        rules = list(group)
        if len(rules) > 50:
            raise ConfigError("at most 50 rules of each kind")
        for rule in rules:
            for s in _rule_slots(rule):
                week[s] = "1" if i == 0 else "0"
    return "".join(week)


def parse_matrix(lines: Sequence[str]) -> str:
    """The week of a 7-line matrix (Monday first, 24 hour characters a line)."""
    rows = [
        line.replace(" ", "").replace("\t", "")
        for line in lines
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(rows) != 7:
        raise ConfigError(f"the matrix has {len(rows)} day lines; it needs 7 (Monday first)")
    out = []
    for day, row in zip(DAYS, rows, strict=True):
        if len(row) != 24:
            raise ConfigError(f"matrix line {day}: {len(row)} hours; it needs 24")
        for hour, c in enumerate(row):
            if c in _SLEEP_CHARS:
                out.append("1")
            elif c in _AWAKE_CHARS:
                out.append("0")
            else:
                raise ConfigError(
                    f"matrix line {day}, hour {hour}: {c!r} is neither sleep (1, S) nor awake "
                    "(0, .)"
                )
    return "".join(out)


def zone(tz: str) -> ZoneInfo:
    """The IANA zone ``tz``; ``ConfigError`` for an unknown or malformed one."""
    if not isinstance(tz, str) or not 1 <= len(tz) <= 64 or ".." in tz or tz.startswith("/"):
        raise ConfigError(f"tz: {str(tz)[:64]!r} is not an IANA time zone name")
    try:
        return ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError) as e:
        raise ConfigError(f"tz: unknown time zone {tz[:64]!r} (e.g. Europe/Berlin)") from e


def new_schedule(
    *,
    cluster: str,
    account: str,
    region: str,
    tz: str,
    week: str,
    asgs: Sequence[str] = (),
    prewarm_min: int = 30,
    updated_by: str = "",
    now: datetime,
) -> Schedule:
    """A checked schedule; ``ConfigError("field: reason")`` otherwise."""
    if not isinstance(cluster, str) or not CLUSTER_RE.fullmatch(cluster):
        raise ConfigError(f"cluster: {str(cluster)[:40]!r} is not a cluster name")
    if not isinstance(account, str) or not _ACCOUNT_RE.fullmatch(account):
        raise ConfigError(f"account: {str(account)[:40]!r} is not a 12-digit AWS account id")
    if not isinstance(region, str) or not _REGION_RE.fullmatch(region):
        raise ConfigError(f"region: {str(region)[:40]!r} is not a region name (eu-west-1)")
    zone(tz)
    if not isinstance(week, str) or len(week) != 168 or set(week) - {"0", "1"}:
        raise ConfigError("week: 168 characters of 0 (awake) and 1 (sleep)")
    if isinstance(asgs, str) or len(asgs) > MAX_ASGS:
        raise ConfigError(f"asgs: at most {MAX_ASGS} Auto Scaling group names")
    for name in asgs:
        if not isinstance(name, str) or not _ASG_RE.fullmatch(name):
            raise ConfigError(f"asgs: {str(name)[:40]!r} is not an Auto Scaling group name")
    if not isinstance(prewarm_min, int) or not 0 <= prewarm_min <= 180:
        raise ConfigError("prewarm_min: 0 to 180 minutes")
    return Schedule(
        cluster=cluster,
        account=account,
        region=region,
        tz=tz,
        week=week,
        asgs=tuple(dict.fromkeys(asgs)),
        prewarm_min=prewarm_min,
        updated_at=now.isoformat(timespec="seconds"),
        updated_by=updated_by[:100],
    )


def slot_of(at: datetime, tz: ZoneInfo) -> int:
    """The week slot (0..167) of the aware instant ``at`` in zone ``tz``."""
    local = at.astimezone(tz)
    return local.weekday() * 24 + local.hour


class Slots:
    """Slots of one instant per (zone, pre-warm): computed once per tick, not per cluster."""

    __slots__ = ("_at", "_cache", "_zones")

    def __init__(self, at: datetime) -> None:
        self._at = at
        self._cache: dict[tuple[str, int], tuple[int, int]] = {}
        self._zones: dict[str, ZoneInfo] = {}

    def of(self, tz: str, prewarm_min: int) -> tuple[int, int]:
        """(slot now, slot ``prewarm_min`` later) in ``tz``."""
        key = (tz, prewarm_min)
        found = self._cache.get(key)
        if found is None:
            z = self._zones.get(tz)
            if z is None:
                z = self._zones[tz] = zone(tz)
            later = self._at + timedelta(minutes=prewarm_min)
            found = self._cache[key] = (slot_of(self._at, z), slot_of(later, z))
        return found


def wants_sleep(schedule: Schedule, slots: Slots) -> bool:
    """Whether the cluster should be asleep at the instant of ``slots``."""
    if schedule.removing:
        return False
    now, later = slots.of(schedule.tz, schedule.prewarm_min)
    week = schedule.week
    return week[now] == "1" and week[later] == "1"


def grid(week: str) -> list[str]:
    """The week as 7 printable lines: ``mon 000000 00.... `` style (``#`` sleep, ``.`` awake)."""
    out = [("    " + "".join(f"{h:<7}" for h in range(0, 24, 6))).rstrip()]
    for d, day in enumerate(DAYS):
        row = week[d * 24 : d * 24 + 24].replace("1", "#").replace("0", ".")
        out.append(f"{day} " + " ".join(row[i : i + 6] for i in range(0, 24, 6)))
    return out
