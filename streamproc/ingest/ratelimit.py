"""Per-agent rate limit: a token bucket in Redis, shared by every ingest process.

One Lua script refills the bucket by the time elapsed (Redis ``TIME``, so ingest processes on
several hosts agree on the clock) and grants tokens (one per event), or says how long until
there would be enough.

Leases: a request that needs ``cost`` tokens asks the bucket for at least ``cost`` and at most
``cost + lease`` (``lease`` = the rate times ``lease_s``, 50 ms by default); what it gets beyond
its cost is kept in this process for ``lease_ttl_s`` and serves the agent's next requests with
no round trip to Redis. Tokens are always taken from the shared bucket before they are spent,
so the agents' rates are never exceeded, across any number of processes. The price is the
other way: tokens a process holds and does not spend within ``lease_ttl_s`` are lost, and
while one process holds some, another may answer 429 a little early. At most one lease
(``lease`` tokens) per agent per process is held at a time, unless requests of one agent
miss the local tokens concurrently; a request the bucket refused is still served from what an
earlier request of the same call leased. ``lease_s=0`` turns leases off (every request asks Redis).

Requests that reach Redis while a call is in flight share the next call
(``_batch.Batcher``), each against its own agent's bucket, in arrival order.

``FailureThrottle`` is the other limit: failed authentications (unknown tokens at the API,
refused dashboard logins) per client address, a token bucket each, kept in this process.
Nothing about a failing client is written to Redis: a flood of garbage must not cost Redis
more than the lookups the throttle lets through.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

import redis.asyncio as aioredis

from streamproc._batch import Batcher
from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = ("FailureThrottle", "RateLimiter")

# KEYS: one bucket hash per request (repeated for an agent with several requests).
# ARGV: rate (tokens/s), burst, then per request: the least it needs, the most it takes.
# Returns per request: tokens granted (>= the least) and 0, or 0 and the wait in ms.
_BUCKETS = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local ttl = math.ceil(burst * 1000 / rate) + 1000
local out = {}
for i = 1, #KEYS do
  local need, most = tonumber(ARGV[2 * i + 1]), tonumber(ARGV[2 * i + 2])
  local b = redis.call('HMGET', KEYS[i], 'tokens', 'ms')
  local tokens = tonumber(b[1]) or burst
  local last = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - last) * rate / 1000)
  local granted, wait = 0, 0
  if tokens >= need then
    granted = math.min(most, math.floor(tokens))
    tokens = tokens - granted
  else
    wait = math.ceil((need - tokens) * 1000 / rate)
  end
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ms', tostring(now))
  redis.call('PEXPIRE', KEYS[i], ttl)
  out[2 * i - 1] = granted
  out[2 * i] = wait
end
return out
""")


class RateLimiter:
    """``await take(agent, n)`` → 0 when allowed, else the seconds to wait (Retry-After)."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        rate_per_s: float,
        burst: int,
        lease_s: float = 0.05,
        lease_ttl_s: float = 1.0,
    ) -> None:
        self.client, self.keys, self.rate_per_s, self.burst = client, keys, rate_per_s, burst
        #: Extra tokens a request asks for, to serve the agent's next requests locally.
        self.lease = min(burst, math.floor(rate_per_s * lease_s))
        self.lease_ttl_s = lease_ttl_s
        #: agent → (tokens held here, until when)
        self._held: dict[str, tuple[int, float]] = {}
        self._batcher: Batcher[tuple[str, int], tuple[int, int]] = Batcher(
            self._take_many, max_size=500, name="streamproc-rate-limit"
        )

    async def take(self, agent: str, cost: int) -> int:
        if not self.rate_per_s:
            return 0
        held, until = self._held.get(agent, (0, 0.0))
        if held >= cost and until > time.monotonic():
            self._held[agent] = (held - cost, until)
            return 0
        granted, wait_ms = await self._batcher.submit((agent, cost))
        held, until = self._held.get(agent, (0, 0.0))
        now = time.monotonic()
        if until <= now:
            held = 0
        if wait_ms:
            # an earlier request of the same call may have leased what this one needs
            if held >= cost:
                self._held[agent] = (held - cost, until)
                return 0
            return max(1, math.ceil(wait_ms / 1000))
        if granted > cost:
            if len(self._held) > 100_000:  # agents that went quiet
                self._held = {a: h for a, h in self._held.items() if h[1] > now}
            self._held[agent] = (held + granted - cost, now + self.lease_ttl_s)
        return 0

    async def _take_many(self, requests: list[tuple[str, int]]) -> list[tuple[int, int]]:
        keys = [self.keys.rate_limit(agent) for agent, _ in requests]
        args: list[float] = [self.rate_per_s, self.burst]
        for _, cost in requests:
            args += [cost, cost + self.lease]
        reply = await _BUCKETS(self.client, keys, args)
        return [(int(reply[i]), int(reply[i + 1])) for i in range(0, len(reply), 2)]


class FailureThrottle:
    """Failed attempts per client (an IP address): a token bucket each, in this process.

    Each failure spends a token; a client with none left waits ``retry_after_s(client)``
    seconds (Retry-After) while the bucket refills at ``refill_per_s``. A client that never
    fails costs nothing; at most ``max_clients`` are remembered (the least recently seen go
    first, which only forgives them). With N processes behind one port a client gets N
    buckets: the limit bounds the work per process, which is what it protects.
    """

    def __init__(
        self,
        *,
        burst: int,
        refill_per_s: float,
        max_clients: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or refill_per_s <= 0 or max_clients < 1:
            raise ValueError("FailureThrottle needs burst >= 1, refill_per_s > 0, max_clients >= 1")
        self.burst, self.refill_per_s, self.max_clients = burst, refill_per_s, max_clients
        self._clock = clock
        #: client → (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, client: str, now: float) -> float:
        tokens, at = self._buckets.get(client, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.refill_per_s)

    def retry_after_s(self, client: str) -> int:
        """0 while ``client`` may fail again; else the whole seconds until it may."""
        if client not in self._buckets:
            return 0
        tokens = self._tokens(client, self._clock())
        if tokens >= 1:
            return 0
        return max(1, math.ceil((1 - tokens) / self.refill_per_s))

    def failed(self, client: str) -> int:
        """Count one failure of ``client``; then what ``retry_after_s`` says."""
        now = self._clock()
        tokens = max(0.0, self._tokens(client, now) - 1)
        self._buckets[client] = (tokens, now)
        self._buckets.move_to_end(client)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return 0 if tokens >= 1 else max(1, math.ceil((1 - tokens) / self.refill_per_s))
