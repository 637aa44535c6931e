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
from streamproc.settings import RetryPolicy, _Settings

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from streamproc.producer import Producer

__all__ = (
    "Background",
    "Concern",
    "Context",
    "DeadLetterInfo",
    "Handler",
    "Limits",
    "OnDeadLetter",
    "Scope",
)

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
    #: The consumer's client and key builder, to record the outcome (e.g. a task's status).
    redis: aioredis.Redis
    keys: Keys


#: Called once per dead letter, after it was written; its errors are logged, never raised.
OnDeadLetter = Callable[[DeadLetterInfo], Awaitable[None]]
#: Work a concern runs beside each of its consumers while it runs (a heartbeat, a load
#: monitor): called with the consumer's Scope-like ``Scope`` (topic ""), cancelled at stop.
Background = Callable[["Scope"], Awaitable[None]]

_HANDLER_LOG = structlog.get_logger("streamproc.handler")


class Limits(_Settings, frozen=True, kw_only=True):
    """When a group is in trouble: what colours its dashboard row and makes ``inspect`` exit 1
    (``streamproc.inspect.judge``, docs/operating.md "Busy is not stuck").

    A pending entry is *stuck* when no consumer touched it (delivered or renewed it) for
    ``stuck_after_s``: its idle time, not its age. A live consumer renews the entries it holds
    every ``min_idle_ms / 3`` (10 s by default) however long the handler runs, so a long task
    stays *busy*; an entry whose owner died or hangs stops being renewed and becomes stuck.
    ``stuck_after_s`` must stay above the renewal period (``min_idle_ms / 3``). A group with
    more than ``max_backlog`` entries not finished (lag + pending) has a *backlog*.
    """

    #: Idle time (since delivery or the last renewal) past which a pending entry is stuck.
    stuck_after_s: float = 60.0
    #: Entries not finished (lag + pending, over the group's topics) past which it is behind.
    max_backlog: int = 100

    def __post_init__(self) -> None:
        self._positive("stuck_after_s", "max_backlog")


@dataclass(frozen=True, kw_only=True)
class Concern:
    """One consumer group: which topics it reads and how it handles each event type."""

    group: str
    topics: tuple[str, ...]
    #: Handler per event class; event types on the topics without a handler are acked unread.
    handlers: Mapping[type[Event], Handler]
    #: Handlers running at once in one consumer process. Above 1, events run in any order
    #: unless ``ordered`` is set: then events of one key still run one after another.
    concurrency: int = 10
    #: Per-key order (docs/writing-an-app.md, "Per-key order"): within this consumer, entries
    #: of a topic with the same event ``key`` are handled one after another in stream order,
    #: different keys in parallel up to ``concurrency``. Events with an empty key are not
    #: ordered. Across consumer processes of the group, order needs one owner per key
    #: (partitions); the retry holds below are kept by every consumer.
    ordered: bool = False
    #: With ``ordered``: a keyed entry that is retried (or deferred) holds back the later
    #: entries of its key, parked in Redis behind it, until it is acked or dead-lettered
    #: (a dead letter lets the rest go on). False: the later entries go on meanwhile and the
    #: retry runs when it is due, out of order.
    hold_on_retry: bool = True
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    #: Exceptions that mean "will never succeed": dead-lettered at once, never retried.
    permanent_errors: tuple[type[BaseException], ...] = ()
    #: Overrides of ConsumerSettings for this group (e.g. ``{"min_idle_ms": 60_000}``).
    settings: Mapping[str, Any] = field(default_factory=dict)
    #: Told about every entry of this group the engine dead-lettered (see DeadLetterInfo).
    on_dead_letter: OnDeadLetter | None = None
    #: Runs beside each consumer of the group from its start to its stop; if it raises, the
    #: error is logged and it is started again a second later.
    background: Background | None = None
    #: When the group is stuck or behind (dashboard colours, ``inspect``'s exit code).
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_name("group", self.group)
        if not self.topics:
            raise ConfigError(f"concern {self.group!r} reads no topics")
        for t in self.topics:
            check_name("topic", t)
        if self.concurrency < 1:
            raise ConfigError(f"concern {self.group!r}: concurrency must be >= 1")
        if not self.hold_on_retry and not self.ordered:
            raise ConfigError(f"concern {self.group!r}: hold_on_retry=False needs ordered=True")
        min_idle_ms = self.settings.get("min_idle_ms")
        if (
            isinstance(min_idle_ms, int | float)
            and self.limits.stuck_after_s * 1000 <= min_idle_ms / 3
        ):
            stuck_s, period_s = self.limits.stuck_after_s, min_idle_ms / 3000
            raise ConfigError(
                f"concern {self.group!r}: limits.stuck_after_s ({stuck_s:g}) must be above "
                f"the renewal period, min_idle_ms / 3 ({period_s:g} s): else a busy handler "
                "reads as stuck"
            )
        for event_type in self.handlers:
            if event_type.topic not in self.topics:
                raise ConfigError(
                    f"concern {self.group!r} handles {event_type.type_name()!r}, published to "
                    f"topic {event_type.topic!r}, which it does not read"
                )


class Scope:
    """What every event of one topic in one consumer shares (built once, not per event)."""

    __slots__ = ("consumer", "group", "keys", "producer", "redis", "topic")

    def __init__(
        self,
        topic: str,
        group: str,
        consumer: str,
        redis: aioredis.Redis,
        producer: Producer,
        keys: Keys,
    ) -> None:
        self.topic, self.group, self.consumer = topic, group, consumer
        self.redis, self.producer, self.keys = redis, producer, keys


class Context:
    """What a handler gets beside its event: where it came from, and ways to act.

    ``topic``, ``group``, ``consumer``, ``redis``, ``producer`` and ``keys`` are shared by
    every event of the topic (one ``Scope``); ``entry_id``, ``attempt`` and ``deliveries`` are
    this event's. ``log`` is one shared logger: the event's topic, group, entry id and event
    id are added to every line by streamproc.logs.merge_event_context while the handler runs.
    """

    __slots__ = ("_effects", "_scope", "attempt", "deliveries", "entry_id", "event_id")

    log = _HANDLER_LOG

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
        event_id: str = "",
    ) -> None:
        self._scope = Scope(topic, group, consumer, redis, producer, keys)
        self.entry_id, self.attempt, self.deliveries = entry_id, attempt, deliveries
        self.event_id = event_id
        self._effects: list[tuple[str | bytes | int | float, ...]] = []

    @classmethod
    def for_event(
        cls, scope: Scope, entry_id: str, attempt: int, deliveries: int, event_id: str
    ) -> Context:
        """The runtime's constructor: no keyword parsing, shared scope (about 4x cheaper)."""
        ctx = cls.__new__(cls)
        ctx._scope, ctx.entry_id, ctx.attempt, ctx.deliveries = scope, entry_id, attempt, deliveries
        ctx.event_id = event_id
        ctx._effects = []
        return ctx

    @property
    def topic(self) -> str:
        return self._scope.topic

    @property
    def group(self) -> str:
        return self._scope.group

    @property
    def consumer(self) -> str:
        return self._scope.consumer

    @property
    def redis(self) -> aioredis.Redis:
        return self._scope.redis

    @property
    def producer(self) -> Producer:
        return self._scope.producer

    @property
    def keys(self) -> Keys:
        return self._scope.keys

    def effect(self, *command: str | bytes | int | float) -> None:
        """Queue a Redis command to run atomically with this event's ack and dedup mark.

        It runs once per event id within the dedup window, even if the handler runs again
        after a crash: the way to make Redis-side effects exactly-once. The commands Redis
        would refuse are found before any of the event's effects is written, so they apply
        all together or not at all (the settle script validates command, arity, argument and
        key types). Supported: single-key SET, APPEND, INCR/DECR(BY), INCRBYFLOAT, DEL,
        UNLINK, (P)EXPIRE, HSET, HSETNX, HDEL, HINCRBY(FLOAT), SADD, SREM, ZADD, ZINCRBY,
        ZREM, LPUSH, RPUSH, LTRIM, XADD with ``*``. Keys named here should share the
        topic's hash tag to run on Redis Cluster.
        """
        if not command:
            raise ValueError("effect needs a command")
        self._effects.append(command)
