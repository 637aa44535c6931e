"""Per-agent rate limit: a token bucket in Redis, shared by every ingest process.

One Lua script refills the bucket by the time elapsed (Redis ``TIME``, so ingest processes on
several hosts agree on the clock), takes ``cost`` tokens (one per event) or says how long
until there would be enough. Requests that arrive while a call is in flight go together in
the next call (``_batch.Batcher``): one script run for many requests, each against its own
agent's bucket in arrival order.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from streamproc._batch import Batcher
from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = ("RateLimiter",)

# KEYS: one bucket hash per request (repeated for an agent with several requests).
# ARGV: rate (tokens/s), burst, then the cost of each request. Returns each request's wait in
# ms (0 = allowed and taken).
_BUCKETS = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl = math.ceil(burst * 1000 / rate) + 1000
local out = {}
for i = 1, #KEYS do
  local cost = tonumber(ARGV[i + 2])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  local tokens = tonumber(b[1]) or burst
  local last = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
  local wait = 0
  if tokens >= cost then
    tokens = tokens - cost
  else
    wait = math.ceil((cost - tokens) * 1000 / rate)
  end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ms', tostring(now))
  redis.call('PEXPIRE', KEYS[i], ttl)
  out[i] = wait
end
return out
""")


class RateLimiter:
    """``await take(agent, n)`` → 0 when allowed, else the seconds to wait (Retry-After)."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, rate_per_s: float, burst: int
    ) -> None:
        self.client, self.keys, self.rate_per_s, self.burst = client, keys, rate_per_s, burst
        self._batcher: Batcher[tuple[str, int], int] = Batcher(
            self._take_many, max_size=500, name="streamproc-rate-limit"
        )

    async def take(self, agent: str, cost: int) -> int:
        if not self.rate_per_s:
            return 0
        wait_ms = await self._batcher.submit((agent, cost))
        return max(1, math.ceil(wait_ms / 1000)) if wait_ms else 0

    async def _take_many(self, requests: list[tuple[str, int]]) -> list[int]:
        keys = [self.keys.rate_limit(agent) for agent, _ in requests]
        args = [self.rate_per_s, self.burst, *(cost for _, cost in requests)]
        return [int(w) for w in await _BUCKETS(self.client, keys, args)]
