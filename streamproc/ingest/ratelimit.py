"""Per-agent rate limit: a token bucket in Redis, shared by every ingest process.

One Lua script refills the bucket by the time elapsed (Redis ``TIME``, so ingest processes on
several hosts agree on the clock), takes ``cost`` tokens (one per event) or says how long
until there would be enough.
"""

from __future__ import annotations

import math

import redis.asyncio as aioredis

from streamproc.keys import Keys

__all__ = ("RateLimiter",)

# KEYS[1] bucket hash. ARGV: rate (tokens/s), burst, cost. Returns {allowed, wait_ms}.
_BUCKET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ms')
local tokens = tonumber(b[1]) or burst
local last = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
local allowed, wait = 0, 0
if tokens >= cost then
  tokens = tokens - cost
  allowed = 1
else
  wait = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ms', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait}
"""


class RateLimiter:
    """``await take(agent, n)`` → 0 when allowed, else the seconds to wait (Retry-After)."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, *, rate_per_s: float, burst: int
    ) -> None:
        self.keys, self.rate_per_s, self.burst = keys, rate_per_s, burst
        self._script = client.register_script(_BUCKET_LUA)

    async def take(self, agent: str, cost: int) -> int:
        if not self.rate_per_s:
            return 0
        allowed, wait_ms = await self._script(
            keys=[self.keys.rate_limit(agent)], args=[self.rate_per_s, self.burst, cost]
        )
        if allowed:
            return 0
        return max(1, math.ceil(int(wait_ms) / 1000))
