"""Producer: appends typed events to their topic streams.

``publish`` goes through one Lua script that checks the producer-side dedup marker, XADDs and
sets the marker, atomically: publishing an event id (or idempotency key) twice within the window
returns the first entry id and adds nothing. Before writing, the producer looks at the lag of
the groups reading the topic (cached briefly) and waits, then raises BackpressureError, while a
group is above the high watermark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from streamproc._backoff import Backoff
from streamproc._lua import Lua, with_scripts
from streamproc.codec import WIRE_FIELDS, Codec
from streamproc.connection import REDIS_DOWN
from streamproc.errors import BackpressureError, PublishError
from streamproc.event import Event
from streamproc.keys import Keys
from streamproc.settings import ProducerSettings

__all__ = ("Producer",)

log = structlog.get_logger("streamproc.producer")

# One call per batch and topic. KEYS: stream, then one dedup marker per event.
# ARGV: window_ms, fields per event (n), then n field/value pairs per event, in KEYS order.
# Returns {added, id, added, id, ...}: added = 0 when the marker already held the first id.
_PUBLISH = Lua("""
local window, n = ARGV[1], tonumber(ARGV[2])
local out, a = {}, 3
for k = 2, #KEYS do
  local first = redis.call('GET', KEYS[k])
  if first then
    out[#out + 1] = 0
    out[#out + 1] = first
  else
    local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, a, a + 2 * n - 1))
    redis.call('SET', KEYS[k], id, 'PX', window)
    out[#out + 1] = 1
    out[#out + 1] = id
  end
  a = a + 2 * n
end
return out
""")


class Producer:
    """Publishes events; safe to share between tasks of one event loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        codec: Codec[Any],
        keys: Keys,
        settings: ProducerSettings | None = None,
        *,
        retry_timeout_s: float = 10.0,
    ) -> None:
        self.client, self.codec, self.keys = client, codec, keys
        self.settings = settings or ProducerSettings()
        self.retry_timeout_s = retry_timeout_s
        self._lag_cache: dict[str, tuple[float, str, int]] = {}
        self.duplicates = 0

    async def publish(self, event: Event, *, idempotency_key: str | None = None) -> str:
        """Append one event; return its entry id (the first one's, for a duplicate)."""
        [entry_id] = await self.publish_many([event], idempotency_keys=[idempotency_key])
        return entry_id

    async def publish_many(
        self,
        events: Sequence[Event],
        *,
        idempotency_keys: Sequence[str | None] | None = None,
    ) -> list[str]:
        """Append events in one pipeline; return their entry ids in order."""
        if not events:
            return []
        if idempotency_keys is not None and len(idempotency_keys) != len(events):
            raise ValueError("idempotency_keys must match events one to one")
        topics = {e.topic for e in events}
        backoff = Backoff(cap_s=1.0)
        deadline = time.monotonic() + self.retry_timeout_s
        while True:
            try:
                for topic in topics:
                    await self.wait_for_capacity(topic)
                return await self._write(events, idempotency_keys)
            except REDIS_DOWN as e:
                # Safe to send again: the dedup marker makes a repeated XADD a no-op, and with
                # producer dedup off consumers still drop the copy by event id.
                if time.monotonic() >= deadline:
                    raise PublishError(f"Redis unavailable for {self.retry_timeout_s}s: {e}") from e
                if backoff.attempt == 0:
                    log.warning("publish_retrying", error=str(e))
                await backoff.sleep()

    async def _write(
        self, events: Sequence[Event], idempotency_keys: Sequence[str | None] | None
    ) -> list[str]:
        try:
            return await with_scripts(
                self.client, [_PUBLISH], lambda: self._send(events, idempotency_keys)
            )
        except ResponseError as e:
            raise PublishError(f"Redis refused the write: {e}") from e

    async def _send(
        self, events: Sequence[Event], idempotency_keys: Sequence[str | None] | None
    ) -> list[str]:
        s = self.settings
        encode = self.codec.encode
        if not s.dedup_window_ms:
            async with self.client.pipeline(transaction=False) as pipe:
                for event in events:
                    pipe.xadd(self.keys.stream(event.topic), encode(event))  # type: ignore[arg-type]
                replies = await pipe.execute()
            return [r.decode() for r in replies]
        # one script call per topic, in publish order within each topic
        by_topic: dict[str, list[int]] = {}
        for i, event in enumerate(events):
            by_topic.setdefault(event.topic, []).append(i)
        async with self.client.pipeline(transaction=False) as pipe:
            for topic, idx in by_topic.items():
                marker = self.keys.published_prefix(topic)
                keys: list[Any] = [self.keys.stream(topic)]
                args: list[Any] = [s.dedup_window_ms, len(WIRE_FIELDS)]
                for i in idx:
                    event = events[i]
                    dedup_id = (idempotency_keys[i] if idempotency_keys else None) or event.id
                    keys.append(marker + dedup_id)
                    for pair in encode(event).items():
                        args += pair
                _PUBLISH.queue(pipe, keys, args)
            replies = await pipe.execute()
        out: list[str] = [""] * len(events)
        for idx, reply in zip(by_topic.values(), replies, strict=True):
            for j, i in enumerate(idx):
                if not reply[2 * j]:
                    self.duplicates += 1
                out[i] = reply[2 * j + 1].decode()
        return out

    async def group_backlog(self, topic: str) -> tuple[str, int]:
        """The group with the most entries waiting on ``topic`` (lag + pending), cached."""
        now = time.monotonic()
        cached = self._lag_cache.get(topic)
        if cached and cached[0] > now:
            return cached[1], cached[2]
        worst = ("", 0)
        try:
            groups = await self.client.xinfo_groups(self.keys.stream(topic))
        except ResponseError:  # no such key: nobody reads it yet
            groups = []
        for g in groups:
            backlog = int(g.get("lag") or 0) + int(g.get("pending") or 0)
            if backlog > worst[1]:
                worst = (g["name"].decode() if isinstance(g["name"], bytes) else g["name"], backlog)
        self._lag_cache[topic] = (now + self.settings.lag_cache_ms / 1000, *worst)
        return worst

    async def wait_for_capacity(self, topic: str) -> None:
        """Return when every group on ``topic`` is under the watermark; else BackpressureError."""
        s = self.settings
        group, backlog = await self.group_backlog(topic)
        if backlog <= s.high_watermark:
            return
        started = time.monotonic()
        log.warning("backpressure_engaged", topic=topic, group=group, backlog=backlog)
        while True:
            waited = time.monotonic() - started
            if waited >= s.backpressure_timeout_s:
                raise BackpressureError(topic, group, backlog, s.high_watermark, waited)
            await asyncio.sleep(max(s.lag_cache_ms, 10) / 1000)
            group, backlog = await self.group_backlog(topic)
            if backlog <= s.high_watermark:
                log.info("backpressure_released", topic=topic, waited_s=round(waited, 3))
                return
