"""What a consumer did since it started: counters per outcome and an ack-latency histogram."""

from __future__ import annotations

import bisect

__all__ = ("LATENCY_BUCKETS_S", "ConsumerStats")

#: Upper bounds (seconds) of the ack-latency histogram buckets; the last bucket is +Inf.
LATENCY_BUCKETS_S = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
LATENCY_BOUNDS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)


class ConsumerStats:
    """Counters since start (exported as metrics, asserted on in tests). Each settled entry
    is counted once, by what the settle script reports it did, not by what was asked:

    - ``acked``: handled and acked (its effects applied); ``refused``: the entry was no
      longer pending when its settle arrived (another settle acked it and applied its effects:
      a redelivery, a resent settle, a consumer that took it over); ``redeliver``: no longer
      pending and not yet delivered again by the group (recreated after NOGROUP, or moved
      back): nothing applied now, its next delivery applies it;
    - ``retried`` / ``dead_lettered``: a retry scheduled / a dead letter written by this
      consumer; ``already_scheduled``: a failure whose retry or dead letter a copy of the same
      settle had written already; ``effect_errors``: events whose effects Redis refused
      (then retried or dead-lettered like a handler error);
    - ``empty``: payload trimmed, acked unread; ``skipped``: no handler for its type;
      ``read``: entries taken in (new, recovered, reclaimed); ``reclaimed``: of those, taken
      from another consumer; ``lost``: held entries a renewal found owned by someone else;
      ``parked``: entries of an ordered group parked behind their key's retrying head.

    ``latency_counts[i]`` counts acked events whose time from XADD (the entry id's
    milliseconds, Redis' clock) to their ack was at most ``LATENCY_BUCKETS_S[i]`` and above
    the bucket before; the last slot is above every bound. ``latency_sum_s`` is their sum.
    """

    __slots__ = (
        "acked",
        "already_scheduled",
        "dead_lettered",
        "effect_errors",
        "empty",
        "latency_counts",
        "latency_sum_s",
        "lost",
        "parked",
        "read",
        "reclaimed",
        "redeliver",
        "refused",
        "retried",
        "skipped",
    )

    def __init__(self) -> None:
        self.read = self.acked = self.redeliver = self.retried = self.dead_lettered = 0
        self.reclaimed = self.empty = self.skipped = self.refused = self.lost = 0
        self.already_scheduled = self.effect_errors = self.parked = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0

    def as_dict(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in self.__slots__
            if name not in ("latency_counts", "latency_sum_s")
        }

    def observe_ack(self, entry_id: bytes, now_ms: float) -> None:
        """Record publish-to-ack latency from the entry id's time (no clock of our own)."""
        latency_ms = max(0.0, now_ms - int(entry_id[: entry_id.index(b"-")]))
        self.latency_counts[bisect.bisect_left(LATENCY_BOUNDS_MS, latency_ms)] += 1
        self.latency_sum_s += latency_ms / 1000
