"""What a concern declares: its group, topics, handlers, concurrency and failure policy.

A concern is one consumer group. ``consumers/`` holds one module per concern, each exposing a
``CONCERN``; the runtime (``streamproc.consumer``) does the rest.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from streamproc.errors import ConfigError
from streamproc.event import Event
from streamproc.keys import Keys, check_name
from streamproc.settings import RetryPolicy

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streamproc.producer import Producer

__all__ = ("Concern", "Context", "DeadLetterInfo", "Handler", "OnDeadLetter")

Handler = Callable[[Any, "Context"], Awaitable[None]]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetterInfo:
    """What the engine tells a concern about an entry it dead-lettered.

    Given to ``Concern.on_dead_letter`` after the dead letter is in the DLQ stream, whatever
    the reason: a handler's ``Permanent`` or last retry, poison (too many deliveries), an
    undecodable entry or an effect Redis refused. ``fields`` are the entry's raw fields;
    ``event_id`` and ``event_type`` are their ``id`` and ``type`` when those are UTF-8.
    """

    topic: str
    group: str
    entry_id: str
    event_id: str | None
    event_type: str | None
    fields: Mapping[bytes, bytes]
    #: Why: "permanent", "retries_exhausted", "poison", "effect_failed" or a decode reason.
    reason: str
    error_type: str
    detail: str


#: Called once per dead letter, after it was written; its errors are logged, never raised.
OnDeadLetter = Callable[[DeadLetterInfo], Awaitable[None]]

_HANDLER_LOG = structlog.get_logger("streamproc.handler")


@dataclass(frozen=True, kw_only=True)
class Concern:
    """One consumer group: which topics it reads and how it handles each event type."""

    group: str
    topics: tuple[str, ...]
    #: Handler per event class; event types on the topics without a handler are acked unread.
    handlers: Mapping[type[Event], Handler]
    #: Handlers running at once in one consumer process (per-key order is not kept above 1).
    concurrency: int = 10
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Exceptions that mean "will never succeed": dead-lettered at once, never retried.
    permanent_errors: tuple[type[BaseException], ...] = ()
    #: Overrides of ConsumerSettings for this group (e.g. ``{"min_idle_ms": 60_000}``).
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Told about every entry of this group the engine dead-lettered (see DeadLetterInfo).
    on_dead_letter: OnDeadLetter | None = None

    def __post_init__(self) -> None:
        check_name("group", self.group)
        if not self.topics:
            raise ConfigError(f"concern {self.group!r} reads no topics")
        for t in self.topics:
            check_name("topic", t)
        if self.concurrency < 1:
            raise ConfigError(f"concern {self.group!r}: concurrency must be >= 1")
        for event_type in self.handlers:
            if event_type.topic not in self.topics:
                raise ConfigError(
                    f"concern {self.group!r} handles {event_type.type_name()!r}, published to "
                    f"topic {event_type.topic!r}, which it does not read"
                )


class Context:
    """What a handler gets beside its event: where it came from, and ways to act."""

    __slots__ = (
        "_effects",
        "attempt",
        "consumer",
        "deliveries",
        "entry_id",
        "group",
        "keys",
        "log",
        "producer",
        "redis",
        "topic",
    )

    def __init__(
        self,
        *,
        topic: str,
        group: str,
        consumer: str,
        entry_id: str,
        attempt: int,
        deliveries: int,
        redis: aioredis.Redis,
        producer: Producer,
        keys: Keys,
    ) -> None:
        self.topic, self.group, self.consumer = topic, group, consumer
        self.entry_id, self.attempt, self.deliveries = entry_id, attempt, deliveries
        self.redis, self.producer, self.keys = redis, producer, keys
        # One shared logger: the event's topic, group, entry id and event id are added to
        # every line by streamproc.logs.merge_event_context while the handler runs.
        self.log = _HANDLER_LOG
        self._effects: list[tuple[str | bytes | int | float, ...]] = []

    def effect(self, *command: str | bytes | int | float) -> None:
        """Queue a Redis command to run atomically with this event's ack and dedup mark.

        It runs once per event id within the dedup window, even if the handler runs again
        after a crash: the way to make Redis-side effects exactly-once. Keys named here
        should share the topic's hash tag to run on Redis Cluster.
        """
        if not command:
            raise ValueError("effect needs a command")
        self._effects.append(command)
