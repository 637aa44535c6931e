"""The ticker's leader lease: one holder at a time, with a fencing token.

Acquire = ``SET lease NX PX ttl`` and ``INCR fence`` in one Lua script; the lease's value is
``<node>/<fence>``. Renew = compare-and-extend, release = compare-and-delete (Lua). The holder
also keeps a local deadline (measured from *before* each successful call, minus a margin for
clock drift) and stops acting as leader when it passes, even if Redis cannot be reached to
tell it so. The lease alone is not enough (pauses, failover): the fencing token travels in each
tick and guards the fired-time state, and tick ids are deterministic.
"""

from __future__ import annotations

import time

import redis.asyncio as aioredis

from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = ("Lease",)

# KEYS: lease, fence. ARGV: node, ttl_ms. Returns the new fence, or 0 when held by another.
_ACQUIRE = Lua("""
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local fence = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '/' .. fence, 'XX', 'PX', ARGV[2])
return fence
""")
# KEYS: lease. ARGV: token, ttl_ms.
_RENEW = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
""")
_RELEASE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class Lease:
    """A leader lease held by ``node``; ``fence`` is non-zero while held."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, node: str, *, ttl_ms: int, drift_ms: int = 0
    ) -> None:
        if ttl_ms < 100:
            raise ValueError("lease ttl_ms must be >= 100")
        self.client, self.keys, self.node, self.ttl_ms = client, keys, node, ttl_ms
        #: Safety margin subtracted from the local deadline (clock drift, scheduling).
        self.drift_ms = drift_ms or max(10, ttl_ms // 10)
        self.fence = 0
        self._deadline = 0.0

    @property
    def token(self) -> str:
        return f"{self.node}/{self.fence}"

    def held(self) -> bool:
        """True while this process may act as leader (local deadline not passed)."""
        return self.fence != 0 and time.monotonic() < self._deadline

    def remaining_s(self) -> float:
        return max(0.0, self._deadline - time.monotonic()) if self.fence else 0.0

    def _extend_from(self, started: float) -> None:
        self._deadline = started + (self.ttl_ms - self.drift_ms) / 1000

    async def acquire(self) -> bool:
        """Try once to take the lease; True when this process now holds it."""
        started = time.monotonic()
        fence = int(
            await _ACQUIRE(
                self.client,
                [self.keys.ticker_lease(), self.keys.ticker_fence()],
                [self.node, self.ttl_ms],
            )
        )
        if fence:
            self.fence = fence
            self._extend_from(started)
        return bool(fence)

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) when another holds it now."""
        if not self.fence:
            return False
        started = time.monotonic()
        ok = int(await _RENEW(self.client, [self.keys.ticker_lease()], [self.token, self.ttl_ms]))
        if ok:
            self._extend_from(started)
        else:
            self.lose()
        return bool(ok)

    async def release(self) -> None:
        """Give the lease up (only if still ours), so a standby takes over at once."""
        if self.fence:
            token = self.token
            self.lose()
            await _RELEASE(self.client, [self.keys.ticker_lease()], [token])

    def lose(self) -> None:
        self.fence = 0
        self._deadline = 0.0
