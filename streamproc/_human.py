"""Times and intervals as the CLI's text output shows them to people.

One form everywhere: an instant is ISO-8601 UTC to the second plus how far from now,
``2026-12-01T20:00:00Z (in 45 s)`` or ``(3 min ago)``; an interval is ``every 6 h``,
``every 5 min``, ``every 30 s``. JSON output (``--json``) keeps plain ISO-8601 and numbers.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from streamproc.printable import printable

__all__ = ("amount", "duration", "every", "iso", "relative", "trigger", "when")

#: (below this many seconds, unit size in seconds, unit) for distances from now.
_SPANS = ((90, 1, "s"), (90 * 60, 60, "min"), (36 * 3600, 3600, "h"))
#: Exact units for intervals, largest first.
_UNITS = ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"))


def iso(at: datetime) -> str:
    """``2026-12-01T20:00:00Z``: UTC, to the second (a naive time is taken as UTC)."""
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``6 h``, ``2 d``: rounded, in the largest unit that reads well."""
    s = abs(seconds)
    for limit, size, unit in _SPANS:
        if s < limit:
            return f"{s / size:.0f} {unit}"
    return f"{s / 86400:.0f} d"


def relative(at: datetime, now: datetime) -> str:
    """``in 45 s``, ``3 min ago``, ``now`` (within a second)."""
    s = (at - now).total_seconds()
    if abs(s) < 1:
        return "now"
    return f"in {duration(s)}" if s > 0 else f"{duration(s)} ago"


def when(at: datetime | str | None, now: datetime) -> str:
    """``2026-12-01T20:00:00Z (in 45 s)``; ``-`` for none; text that is not an ISO-8601
    time is shown as it is (control characters escaped)."""
    if at is None or at == "":
        return "-"
    if isinstance(at, str):
        text = at
        try:
            at = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return printable(text)
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return f"{iso(at)} ({relative(at, now)})"


def amount(seconds: float) -> str:
    """``6 h``, ``5 min``, ``90 s``, ``2.47 h``: a whole number of the largest unit that
    divides it, else the largest unit it reaches, to two decimals."""
    for size, unit in _UNITS:
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g} {unit}"
    for size, unit in _UNITS:
        if seconds >= size:
            return f"{round(seconds / size, 2):g} {unit}"
    return f"{round(seconds, 3):g} s"


def every(interval_s: float) -> str:
    """``every 6 h``, ``every 5 min``, ``every 30 s``, ``every 1.5 h``."""
    return f"every {amount(interval_s)}"


_SECONDS_RE = re.compile(r"\b(every|offset) (\d+(?:\.\d+)?)s\b")


def trigger(text: str) -> str:
    """A schedule's trigger text (``every 21600s (offset 117.2s)``, ``cron '0 9 * * 1' UTC``)
    with its intervals for people: ``every 6 h (offset 117.2 s)``; a cron line as it is."""

    def human(m: re.Match[str]) -> str:
        seconds = float(m.group(2))
        return f"{m.group(1)} {amount(seconds)}"

    return _SECONDS_RE.sub(human, text)
