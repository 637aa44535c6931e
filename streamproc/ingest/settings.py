"""Settings of the ingest service: frozen, keyword-only, validated at construction."""

from __future__ import annotations

from streamproc.errors import ConfigError
from streamproc.settings import _Settings

__all__ = ("IngestSettings",)


class IngestSettings(_Settings, frozen=True, kw_only=True):
    #: Largest request body accepted (after any Content-Encoding is undone), in bytes.
    max_body_bytes: int = 4 << 20
    #: Request body bytes one process holds at once (read, not yet answered); past it new
    #: bodies get 503 with Retry-After. At least ``max_body_bytes``.
    max_inflight_bytes: int = 32 << 20
    #: A request's whole body must arrive within this (else 408 and the connection closes).
    body_read_timeout_s: float = 30.0
    #: A request's headers must arrive within this from its first byte, and a new
    #: connection's first request within this from the connect; else the connection closes.
    header_read_timeout_s: float = 10.0
    #: An idle connection between requests is closed after this.
    keepalive_timeout_s: float = 75.0
    #: Open connections per process (also kept below the open-files limit); a new one past
    #: it closes the longest idle connection, or is closed when every one is busy.
    max_connections: int = 2048
    #: Most events in one request (JSON array, NDJSON lines or msgpack array).
    max_batch: int = 1000
    #: Per-agent token bucket: events per second refilled; 0 turns rate limiting off.
    rate_events_per_s: float = 5000.0
    #: Per-agent token bucket size (the largest burst); at least ``max_batch``.
    rate_burst: int = 10_000
    #: Each process leases this many seconds' worth of an agent's rate from the shared bucket
    #: and spends it without asking Redis (held at most 1 s; never over the rate); 0 = off.
    rate_lease_s: float = 0.05
    #: How long a token lookup is reused in memory: the bound on how late a revocation acts.
    auth_cache_s: float = 5.0
    #: How long a publish may retry while Redis is unreachable before the request gets 503.
    publish_timeout_s: float = 2.0
    #: Retry-After (seconds) sent with 503 answers.
    retry_after_s: int = 1
    #: On shutdown, in-flight requests get this long to finish.
    shutdown_grace_s: float = 10.0
    #: How long a task's status hash is kept after its last change.
    task_ttl_s: int = 24 * 3600

    def __post_init__(self) -> None:
        self._positive("max_body_bytes", "max_batch", "rate_burst", "publish_timeout_s")
        self._positive("max_inflight_bytes", "body_read_timeout_s", "header_read_timeout_s")
        self._positive("keepalive_timeout_s", "max_connections")
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ConfigError(
                f"IngestSettings.max_inflight_bytes ({self.max_inflight_bytes}) must be >= "
                f"max_body_bytes ({self.max_body_bytes}), or the largest body could never pass"
            )
        self._positive("retry_after_s", "shutdown_grace_s", "task_ttl_s")
        self._positive("rate_events_per_s", "auth_cache_s", "rate_lease_s", allow_zero=True)
        if self.rate_events_per_s and self.rate_burst < self.max_batch:
            raise ConfigError(
                f"IngestSettings.rate_burst ({self.rate_burst}) must be >= max_batch "
                f"({self.max_batch}), or a full batch could never pass the rate limit"
            )
