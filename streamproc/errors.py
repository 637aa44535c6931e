"""streamproc's exceptions: one base class, and the decisions handlers can signal."""

from __future__ import annotations

__all__ = (
    "BackpressureError",
    "ConfigError",
    "ConsumerNameTaken",
    "DecodeError",
    "Permanent",
    "PublishError",
    "RedisUnavailable",
    "RedisUrlError",
    "Retry",
    "ServerTooOld",
    "StreamprocError",
    "UnsafeServerConfig",
)


class StreamprocError(Exception):
    """Base class of every error streamproc raises on purpose."""


class ConfigError(StreamprocError, ValueError):
    """A setting, environment variable or CLI argument has a bad value."""


class ConsumerNameTaken(ConfigError):
    """Another live process uses this consumer name in the group (it would re-run its work)."""


class ServerTooOld(StreamprocError):
    """The Redis server is older than the oldest version streamproc supports."""


class UnsafeServerConfig(StreamprocError):
    """The Redis server is configured in a way that breaks streamproc's guarantees.

    Today: a ``maxmemory-policy`` other than ``noeviction`` (see ``check_eviction``).
    """


class RedisUnavailable(StreamprocError):
    """Redis could not be reached (connection refused, reset or timed out)."""


class RedisUrlError(ConfigError):
    """The Redis URL names no usable Redis: malformed (scheme, port, database index) or a
    database index the server does not have. The CLI exits 3 for it, as for an unreachable
    Redis: either way there is no Redis to work with, and waiting will not bring one."""


class PublishError(StreamprocError):
    """An event could not be published."""


class BackpressureError(PublishError):
    """A group reading the topic is too far behind; publish waited and gave up."""

    def __init__(self, topic: str, group: str, lag: int, watermark: int, waited_s: float) -> None:
        self.topic, self.group, self.lag, self.watermark = topic, group, lag, watermark
        self.waited_s = waited_s
        super().__init__(
            f"backpressure on topic {topic!r}: group {group!r} has {lag} entries waiting "
            f"(lag + pending), above the high watermark {watermark}; waited {waited_s:.2f}s"
        )


class DecodeError(StreamprocError):
    """A stream entry is not a valid event. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class Retry(StreamprocError):
    """Raised by a handler: try this event again later (after ``delay_s`` if given).

    The retry uses one of the concern's ``max_retries`` attempts, unless ``counts`` is False
    (see ``Defer``).
    """

    def __init__(
        self, reason: str = "retry requested", *, delay_s: float | None = None, counts: bool = True
    ) -> None:
        self.delay_s, self.counts = delay_s, counts
        super().__init__(reason)


class Defer(Retry):
    """Raised by a handler: not now, try again in ``delay_s``, without using an attempt.

    For waits that say nothing about the event: a circuit breaker is open, a destination
    asked to slow down (429 Retry-After). The event is rescheduled like a retry (same delayed
    set, same ``attempt``), so a wait of any length never dead-letters it.
    """

    def __init__(self, reason: str, *, delay_s: float) -> None:
        super().__init__(reason, delay_s=max(delay_s, 0.0), counts=False)


class Permanent(StreamprocError):
    """Raised by a handler: this event can never succeed; dead-letter it now."""
