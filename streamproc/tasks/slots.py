"""Slots of a task type: the order within one runner process, the limit across all of them.

- ``PriorityGate``: a semaphore in one process whose free slots go to the most urgent, then
  the oldest, waiter (the shared gate of ``streamproc._gate``, counting).
- ``GlobalSlots``: the type's concurrency across every runner process, as leases in a Redis
  sorted set (``Keys.task_slots``), renewed while the task runs and expiring ``SLOT_TTL_S``
  after a runner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import structlog

from streamproc import _gate
from streamproc._backoff import Backoff
from streamproc._lua import Lua

__all__ = ("SLOT_TTL_S", "GlobalSlots", "PriorityGate")

log = structlog.get_logger("streamproc.tasks")

#: A running task's slot lease: renewed every third of it; a dead runner's slot frees after it.
SLOT_TTL_S = 30.0

# KEYS[1] slots zset. ARGV: member, limit, ttl ms. Drops expired leases; takes (or renews) the
# member's lease if it holds one or a slot is free. Returns 1 if held, 0 if all are taken.
_TAKE_SLOT = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], 2 * ttl)
  return 1
end
return 0
""")


class PriorityGate(_gate.PriorityGate[None]):
    """A task type's gate in one runner process: ``limit`` slots, the most urgent waiter first.

    The shared gate (``streamproc._gate``) as a counting semaphore. ``slot(rank, seq)`` counts
    urgency down, as ``PRIORITIES`` lists it (0 = critical first); among equal ranks the lower
    ``seq`` (the task id, time-ordered: the oldest task) goes first. ``take``/``give``, inherited,
    count it up (a higher priority first).
    """

    def __init__(self, limit: int) -> None:
        super().__init__(itertools.repeat(None, limit))

    def slot(self, rank: int, seq: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one slot for the body: the lowest rank, then the lowest seq, is served first."""
        return self.hold(-rank, tiebreak=seq)


class GlobalSlots:
    """A task type's concurrency across every runner process: leases in a Redis sorted set."""

    def __init__(
        self, redis: aioredis.Redis, key: str, limit: int, *, ttl_s: float = SLOT_TTL_S
    ) -> None:
        self.redis, self.key, self.limit, self.ttl_ms = redis, key, limit, int(ttl_s * 1000)

    async def take(self, member: str) -> bool:
        """Take (or renew) ``member``'s slot now; False if every slot is held."""
        return bool(await _TAKE_SLOT(self.redis, [self.key], [member, self.limit, self.ttl_ms]))

    @contextlib.asynccontextmanager
    async def hold(self, member: str) -> AsyncIterator[None]:
        """Wait for a slot, keep it renewed while the body runs, then give it back."""
        backoff = Backoff(base_s=0.05, cap_s=1.0)  # jittered: several runners poll
        while not await self.take(member):
            await backoff.sleep()
        renewer = asyncio.create_task(self._renew(member))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            try:
                await self.redis.zrem(self.key, member)
            except Exception as e:  # Redis down: the lease expires by itself
                log.warning("task_slot_release_failed", key=self.key, error=str(e))

    async def _renew(self, member: str) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.take(member):
                    log.error("task_slot_lost", key=self.key, member=member)
            except Exception as e:  # Redis down: try again at the next interval
                log.warning("task_slot_renew_failed", key=self.key, error=str(e))
