"""Settings objects: frozen, keyword-only, validated at construction.

The engine takes these plain objects; only the entry point (``streamproc.config``) reads the
environment. Units are in the names (``_ms``, ``_s``).
"""

from __future__ import annotations

from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import msgspec

from streamproc.errors import ConfigError, RedisUrlError

__all__ = ("ConsumerSettings", "ProducerSettings", "RedisSettings", "RetryPolicy")


class _Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    def _positive(self, *names: str, allow_zero: bool = False) -> None:
        for name in names:
            value = getattr(self, name)
            if value < 0 or (value == 0 and not allow_zero):
                bound = ">= 0" if allow_zero else "> 0"
                raise ConfigError(f"{type(self).__name__}.{name} must be {bound}, got {value!r}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> Any:
        """Build from a plain mapping; unknown keys and wrong types are ConfigErrors."""
        try:
            return msgspec.convert(values, cls, strict=False)
        except msgspec.ValidationError as e:
            raise ConfigError(f"{cls.__name__}: {e}") from None


_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")


class RedisSettings(_Settings, frozen=True, kw_only=True):
    #: ``redis+cluster://host:port`` (``rediss+cluster://`` with TLS) connects to a Redis
    #: Cluster through any one of its nodes; the others are discovered.
    url: str = "redis://127.0.0.1:6379/0"
    #: Socket timeout for ordinary commands. Readers use ``block_ms`` well under it.
    socket_timeout_s: float = 5.0
    connect_timeout_s: float = 2.0
    max_connections: int = 64
    #: Prefix of every key (see ``streamproc.keys``).
    key_prefix: str = "sp"
    #: Start even when Redis' ``maxmemory-policy`` is not ``noeviction``. Under ``volatile-*``
    #: Redis evicts the TTL keys dedup, leases and task state live in; under ``allkeys-*`` the
    #: streams too. Only for a Redis that never reaches ``maxmemory``.
    allow_eviction: bool = False
    #: ``used_memory / maxmemory`` at or above this is high: ingest logs ``redis_memory_high``
    #: (once per episode), ``check`` and ``inspect`` exit 1 (``streamproc.inspect.memory``).
    memory_alert_ratio: float = 0.8
    #: How often the ingest reads ``INFO memory`` for its gauges and the alert.
    memory_sample_s: float = 5.0

    def __post_init__(self) -> None:
        _check_url(self.url)
        self._positive("socket_timeout_s", "connect_timeout_s", "max_connections")
        if not 0 < self.memory_alert_ratio <= 1:  # NaN too
            raise ConfigError(
                f"RedisSettings.memory_alert_ratio must be > 0 and <= 1, "
                f"got {self.memory_alert_ratio!r}"
            )
        if not 0 < self.memory_sample_s < float("inf"):
            raise ConfigError(
                f"RedisSettings.memory_sample_s must be > 0, got {self.memory_sample_s!r}"
            )

    @property
    def cluster(self) -> bool:
        """The URL names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
        return self.url.startswith(("redis+cluster://", "rediss+cluster://"))


def _check_url(url: str) -> None:
    """RedisUrlError unless ``url`` has a known scheme, a numeric port and a numeric database
    index (redis-py reads ``/notanumber`` as database 0 and fails on a bad port only when it
    connects, with a traceback); the password never appears in the message."""
    if not url.startswith(_SCHEMES):
        raise RedisUrlError(
            f"Redis URL {url!r} must start with redis://, rediss://, unix://, "
            "redis+cluster:// or rediss+cluster://"
        )
    parts = urlsplit(url)
    shown = url if parts.password is None else url.replace(f":{parts.password}@", ":***@", 1)
    if parts.scheme != "unix":
        try:
            parts.port  # noqa: B018 - urllib checks the port when it is read
        except ValueError as e:
            raise RedisUrlError(f"Redis URL {shown!r}: bad port ({e})") from None
    db_texts = parse_qs(parts.query).get("db", [])
    if parts.scheme != "unix" and parts.path.strip("/"):
        db_texts.append(parts.path.strip("/"))
    for db in db_texts:
        if not (db.isascii() and db.isdigit()):
            raise RedisUrlError(
                f"Redis URL {shown!r}: the database index must be a number, got {db!r}"
            )
        if parts.scheme.endswith("+cluster") and int(db) != 0:
            raise RedisUrlError(f"Redis URL {shown!r}: a Redis Cluster has database 0 only")


class RetryPolicy(_Settings, frozen=True, kw_only=True):
    """Exponential backoff with jitter: ``min(cap, base * 2**(attempt-1))`` x U(0.5, 1)."""

    max_retries: int = 3
    base_s: float = 1.0
    cap_s: float = 60.0

    def __post_init__(self) -> None:
        self._positive("max_retries", allow_zero=True)
        self._positive("base_s", "cap_s")
        if self.cap_s < self.base_s:
            raise ConfigError(f"RetryPolicy.cap_s ({self.cap_s}) is below base_s ({self.base_s})")


class ProducerSettings(_Settings, frozen=True, kw_only=True):
    #: Producer-side dedup window by event id / idempotency key; 0 = off. A record lives one
    #: to two windows (generations). 24 h: a client's retry of a request after a long outage
    #: (Stripe keeps idempotency keys 24 h) and a handler's re-run that publishes the same
    #: derived id (retries reach hours) are both inside it; a lost reply of this producer's
    #: own write needs far less and is recognised by its sequence (seconds).
    dedup_window_ms: int = 24 * 3600 * 1000
    #: Per-topic windows (topic name -> ms; 0 = off for that topic), over ``dedup_window_ms``.
    dedup_windows: dict[str, int] = msgspec.field(default_factory=dict)
    #: Shard hashes of a first dedup generation (later ones are sized from the one before):
    #: about 24 records a hash keep Redis' compact encoding and its scans short (a record's
    #: lookup reads the whole listpack), so ~ expected events per window / 24.
    dedup_shards: int = 2048
    #: Backpressure: a group whose lag + pending exceeds this blocks publishing to the topic.
    high_watermark: int = 100_000
    #: How long ``publish`` waits for the lag to fall before raising BackpressureError.
    backpressure_timeout_s: float = 5.0
    #: How long the groups' lag read with XINFO GROUPS is reused.
    lag_cache_ms: int = 250
    #: Group commit: callers that publish while a write is in flight go out together in the
    #: next write, up to this many events (a larger single call still goes alone).
    coalesce_max_events: int = 2_000
    #: ``leader``: a publish returns once the master wrote it (replication is asynchronous:
    #: a failover right after may lose it). ``replicated``: it returns once ``min_replicas``
    #: replicas have it too (WAIT on the same connection, per master written), and raises
    #: PublishError when they did not confirm within ``replica_timeout_ms`` (the event is on
    #: the master; publishing it again is deduplicated).
    durability: Literal["leader", "replicated"] = "leader"
    min_replicas: int = 1
    replica_timeout_ms: int = 1_000

    def __post_init__(self) -> None:
        self._positive("dedup_window_ms", "lag_cache_ms", allow_zero=True)
        self._positive("dedup_shards")
        for topic, ms in self.dedup_windows.items():
            if ms < 0:
                raise ConfigError(f"ProducerSettings.dedup_windows[{topic!r}] must be >= 0")
        self._positive("high_watermark", "backpressure_timeout_s", "coalesce_max_events")
        self._positive("min_replicas", "replica_timeout_ms")


class ConsumerSettings(_Settings, frozen=True, kw_only=True):
    #: This consumer's name in the group; stable across restarts of the same replica.
    consumer: str = "c1"
    #: Events read but not yet settled, at most (the in-flight bound).
    max_in_flight: int = 256
    #: Entries asked for per XREADGROUP.
    batch: int = 100
    #: XREADGROUP BLOCK; keep well under RedisSettings.socket_timeout_s.
    block_ms: int = 1000
    #: Entries idle this long, whose owner stopped renewing them, are reclaimed.
    min_idle_ms: int = 30_000
    #: An entry delivered more often than this is poison and goes to the DLQ.
    max_deliveries: int = 5
    #: Consumer-side dedup window by event id; 0 = off.
    dedup_window_ms: int = 24 * 3600 * 1000
    #: Finish in-flight work within this time on shutdown, then cancel it.
    grace_s: float = 10.0
    #: Consumers that own nothing and were idle this long are removed from the group.
    consumer_expiry_ms: int = 3_600_000
    #: Safe trimming of the group's topics every this often; 0 = off.
    trim_interval_ms: int = 30_000
    #: Hard length cap per stream applied by the trimmer; 0 = none. It may cut entries a
    #: group has not acked, and then says so (error log + metric).
    hard_maxlen: int = 0
    #: Every this often the consumer writes its ack-latency histogram to Redis (``Keys.latency``)
    #: for the dashboard; 0 = never.
    stats_interval_ms: int = 5_000
    #: How long a failed entry's marker keeps a resent settle (or a second consumer that ran
    #: the same entry) from scheduling its retry or dead letter twice.
    fail_mark_ms: int = 24 * 3600 * 1000
    #: When another live process holds this consumer name in the group: "refuse" to start
    #: (ConsumerNameTaken), or take the first free "<name>-2", "<name>-3" … ("suffix").
    name_taken: Literal["refuse", "suffix"] = "refuse"
    #: Partitioned topics: the group's live consumers share the partitions, each reading only
    #: those it holds a lease on (``streamproc.consumer._ownership``); False = every consumer
    #: reads every partition (no per-key order across processes).
    own_partitions: bool = True

    def __post_init__(self) -> None:
        from streamproc.keys import check_name

        check_name("consumer", self.consumer)
        self._positive("max_in_flight", "batch", "block_ms", "min_idle_ms", "grace_s")
        self._positive("max_deliveries", "consumer_expiry_ms", "fail_mark_ms")
        self._positive(
            "dedup_window_ms",
            "trim_interval_ms",
            "hard_maxlen",
            "stats_interval_ms",
            allow_zero=True,
        )
        if self.min_idle_ms < 3 * 100:
            raise ConfigError(
                "ConsumerSettings.min_idle_ms must be >= 300 (heartbeats renew at 1/3)"
            )
