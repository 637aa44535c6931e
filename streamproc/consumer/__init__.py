"""The consumer runtime: reader, handlers, settler and upkeep of one consumer group member.

``Consumer`` is the public entry; ``outcomes`` are what ``after_settle`` hooks see.
"""

from streamproc.consumer.outcomes import (
    Acked,
    DeadLettered,
    Empty,
    Entry,
    Outcome,
    RetryLater,
    Settled,
    Skipped,
)
from streamproc.consumer.runtime import Consumer
from streamproc.consumer.stats import LATENCY_BUCKETS_S, ConsumerStats

__all__ = (
    "LATENCY_BUCKETS_S",
    "Acked",
    "Consumer",
    "ConsumerStats",
    "DeadLettered",
    "Empty",
    "Entry",
    "Outcome",
    "RetryLater",
    "Settled",
    "Skipped",
)
