"""The delivery log: every attempt to deliver a notification, and how it went.

Two places, written together in one pipeline:

- ``<p>:state:notify:log``: a stream of every attempt, trimmed to about ``log_maxlen``
  entries (``redis-cli XREVRANGE <p>:state:notify:log + - COUNT 20``);
- ``<p>:state:notify:attempts:<notification id>``: a list of that notification's attempts
  (at most 200), kept ``log_ttl_s``: what ``streamproc notifications log ID`` and
  ``GET /v1/notifications/{id}/deliveries`` read, without scanning the stream.

Statuses: ``sent``; ``retry`` (transient failure, retried with backoff); ``rate_limited``
(429: waited out, no attempt used); ``held`` (the destination's breaker was open: not called);
``failed`` (permanent: dead-lettered with the response); ``dead_lettered`` (retries used up);
``skipped`` (the subscription was removed, or the delivery was already sent).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter

from streamproc.keys import Keys

__all__ = ("ATTEMPTS", "Attempt", "DeliveryLog")

_PER_NOTIFICATION = 200
ATTEMPTS = Counter(
    "streamproc_notify_attempts",
    "Delivery attempts by channel and outcome (sent, retry, rate_limited, held, failed, skipped)",
    ["channel", "status"],
)


class Attempt(msgspec.Struct, frozen=True, kw_only=True):
    notification_id: str
    delivery_id: str
    subscription_id: str
    channel: str
    #: Masked: no secrets (a Slack URL shows its host only).
    destination: str
    status: str
    http_status: int = 0
    latency_ms: float = 0.0
    error: str = ""
    #: The engine's attempt number (0 = first) and deliveries of the entry.
    attempt: int = 0
    deliveries: int = 1
    #: SES message id, for emails.
    reference: str = ""
    at: str = msgspec.field(
        default_factory=lambda: datetime.now(UTC).isoformat(timespec="milliseconds")
    )


class DeliveryLog:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, maxlen: int, ttl_s: int) -> None:
        self.client, self.keys, self.maxlen, self.ttl_s = client, keys, maxlen, ttl_s
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(Attempt)

    def _stream(self) -> str:
        return self.keys.state("notify", "log")

    def _list(self, notification_id: str) -> str:
        return self.keys.state("notify", "attempts", notification_id)

    async def record(
        self, attempt: Attempt, *, sent_key: str | None = None, sent_ttl_s: int = 0
    ) -> None:
        """Append the attempt; with ``sent_key``, also mark the delivery sent (one round trip)."""
        ATTEMPTS.labels(attempt.channel or "-", attempt.status).inc()
        raw = self._encoder.encode(attempt)
        lst = self._list(attempt.notification_id)
        async with self.client.pipeline(transaction=False) as pipe:
            if sent_key is not None:
                pipe.set(sent_key, attempt.at, ex=sent_ttl_s)
            pipe.xadd(self._stream(), {"attempt": raw}, maxlen=self.maxlen, approximate=True)
            pipe.rpush(lst, raw)
            pipe.ltrim(lst, -_PER_NOTIFICATION, -1)
            pipe.expire(lst, self.ttl_s)
            await pipe.execute()

    def effects(
        self, attempt: Attempt, *, sent_key: str, sent_ttl_s: int
    ) -> list[tuple[str | bytes | int, ...]]:
        """The same writes as ``record`` (with the sent mark) as effects of the handled event:
        they apply once, atomically with its ack, and cost no round trip of their own. The log
        stream is trimmed by ``trim`` (effects cannot say MAXLEN)."""
        ATTEMPTS.labels(attempt.channel or "-", attempt.status).inc()
        raw = self._encoder.encode(attempt)
        lst = self._list(attempt.notification_id)
        return [
            ("SET", sent_key, attempt.at, "EX", sent_ttl_s),
            ("XADD", self._stream(), "*", "attempt", raw),
            ("RPUSH", lst, raw),
            ("LTRIM", lst, -_PER_NOTIFICATION, -1),
            ("EXPIRE", lst, self.ttl_s),
        ]

    async def trim(self) -> None:
        """Keep about ``maxlen`` entries in the log stream (XTRIM ~: whole macro nodes)."""
        await self.client.xtrim(self._stream(), maxlen=self.maxlen, approximate=True)

    async def for_notification(self, notification_id: str) -> list[Attempt]:
        raw: Any = await self.client.lrange(self._list(notification_id), 0, -1)
        return self._decode(raw)

    async def recent(self, count: int = 50) -> list[Attempt]:
        rows: Any = await self.client.xrevrange(self._stream(), count=count)
        return self._decode(f[b"attempt"] for _, f in rows if b"attempt" in f)

    def _decode(self, raws: Iterable[bytes]) -> list[Attempt]:
        out = []
        for r in raws:
            try:
                out.append(self._decoder.decode(r))
            except msgspec.DecodeError:  # written by something else: skip, never crash a reader
                continue
        return out
