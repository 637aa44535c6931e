"""Slots of a task queue and its types: the order within one runner, the limits across all.

- ``PriorityGate``: a semaphore in one process whose free slots go to the most urgent, then
  the oldest, waiter (the shared gate of ``streamproc._gate``, counting).
- ``QueueSlots``: a task type's concurrency *and* its queue's, across every runner process,
  handed out in priority order across processes. Running tasks hold leases in a Redis sorted
  set per queue and per type (renewed while the task runs, expiring ``SLOT_TTL_S`` after a
  runner died); tasks waiting for a slot are listed in a second sorted set scored by
  (priority, age), and a slot goes to a waiter only when fewer waiters rank before it than
  slots are free. A waiter that stops asking (its runner died) leaves the list after
  ``WAITER_TTL_S``. So a critical task read by one runner takes the next free slot before a
  low one another runner read earlier.

  A waiter asks again after a backoff (20 ms, doubling to 1 s), or at once when a task of its
  queue gives its slots back in the same process (``_FREED``): in one runner a freed slot
  is taken again without waiting out a poll. A slot freed by another runner process is seen
  at the next poll (up to 1 s later): no pub/sub connection per runner for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import redis.asyncio as aioredis
import structlog

from streamproc import _gate
from streamproc._aio import stop
from streamproc._backoff import backoff_delay_s
from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = ("SLOT_TTL_S", "WAITER_TTL_S", "PriorityGate", "QueueSlots", "wait_order")

log = structlog.get_logger("streamproc.tasks")

#: A running task's slot lease: renewed every third of it; a dead runner's slot frees after it.
SLOT_TTL_S = 30.0
#: A waiter not heard of for this long (its runner died) stops holding its place.
WAITER_TTL_S = 5.0

# KEYS: queue slots, queue waiting, queue deadline, type slots, type waiting, type deadline.
# ARGV: member, queue limit (0: none), type limit, lease ms, waiter ms, order.
# 1: the member holds (or renewed) its slots; 0: it waits (its place is kept).
_TAKE = Lua("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local m, qlimit, tlimit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, wttl, order = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
for _, k in ipairs({2, 5}) do
  local gone = redis.call('ZRANGEBYSCORE', KEYS[k + 1], '-inf', now)
  for _, g in ipairs(gone) do
    redis.call('ZREM', KEYS[k], g)
    redis.call('ZREM', KEYS[k + 1], g)
  end
end
for _, k in ipairs(KEYS) do redis.call('PEXPIRE', k, 2 * lease) end
if redis.call('ZSCORE', KEYS[4], m) then
  redis.call('ZADD', KEYS[4], now + lease, m)
  if qlimit > 0 then redis.call('ZADD', KEYS[1], now + lease, m) end
  return 1
end
redis.call('ZADD', KEYS[5], order, m)
redis.call('ZADD', KEYS[6], now + wttl, m)
if redis.call('ZRANK', KEYS[5], m) >= tlimit - redis.call('ZCARD', KEYS[4]) then
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
  return 0
end
if qlimit > 0 then
  redis.call('ZADD', KEYS[2], order, m)
  redis.call('ZADD', KEYS[3], now + wttl, m)
  if redis.call('ZRANK', KEYS[2], m) >= qlimit - redis.call('ZCARD', KEYS[1]) then return 0 end
  redis.call('ZADD', KEYS[1], now + lease, m)
  redis.call('ZREM', KEYS[2], m)
  redis.call('ZREM', KEYS[3], m)
end
redis.call('ZADD', KEYS[4], now + lease, m)
redis.call('ZREM', KEYS[5], m)
redis.call('ZREM', KEYS[6], m)
return 1
""")
# Same KEYS. ARGV: member. Gives back the slots and the places of ``member``.
_GIVE = Lua("""
for _, k in ipairs(KEYS) do redis.call('ZREM', k, ARGV[1]) end
return 1
""")


def wait_order(rank: int, created_ms: int) -> int:
    """The waiting score: priority rank (0 = critical) first, then age (older first)."""
    return rank * 10**13 + max(0, min(created_ms, 10**13 - 1))


class PriorityGate(_gate.PriorityGate[None]):
    """A task type's gate in one runner process: ``limit`` slots, the most urgent waiter first.

    The shared gate (``streamproc._gate``) as a counting semaphore. ``slot(rank, seq)`` counts
    urgency down, as ``PRIORITIES`` lists it (0 = critical first); among equal ranks the lower
    ``seq`` (the task id, time-ordered: the oldest task) goes first.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(itertools.repeat(None, limit))

    def slot(self, rank: int, seq: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Hold one slot for the body: the lowest rank, then the lowest seq, is served first."""
        return self.hold(-rank, tiebreak=seq)


class _Freed:
    """Wakes this process's waiters of a queue when a task of it gives its slots back here."""

    def __init__(self) -> None:
        self._waiting: dict[str, set[asyncio.Event]] = {}

    @contextlib.contextmanager
    def listen(self, queue_key: str) -> Iterator[asyncio.Event]:
        event = asyncio.Event()
        waiting = self._waiting.setdefault(queue_key, set())
        waiting.add(event)
        try:
            yield event
        finally:
            waiting.discard(event)
            if not waiting:
                self._waiting.pop(queue_key, None)

    def wake(self, queue_key: str) -> None:
        for event in self._waiting.get(queue_key, ()):
            event.set()


_FREED = _Freed()


class QueueSlots:
    """One task type's slots within its queue, across every runner process (see module doc)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        queue: str,
        task_type: str,
        queue_limit: int | None,
        type_limit: int,
        ttl_s: float = SLOT_TTL_S,
        waiter_ttl_s: float = WAITER_TTL_S,
        poll_base_s: float = 0.02,
        poll_cap_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.keys = [
            keys.task_slots(queue, t, part)
            for t in (None, task_type)
            for part in ("slots", "waiting", "deadline")
        ]
        self.queue_limit, self.type_limit = queue_limit or 0, type_limit
        self.ttl_ms, self.waiter_ms = int(ttl_s * 1000), int(waiter_ttl_s * 1000)
        #: The longest wait between asks: under a fifth of the waiter TTL, so that a waiter's
        #: place never lapses while it waits.
        self.poll_cap_s = min(poll_cap_s, self.waiter_ms / 5000)
        self.poll_base_s = min(poll_base_s, self.poll_cap_s)

    async def take(self, member: str, order: int) -> bool:
        """Take (or renew) ``member``'s slots now; False: it waits, its place kept a while."""
        args = [member, self.queue_limit, self.type_limit, self.ttl_ms, self.waiter_ms, order]
        return bool(await _TAKE(self.redis, self.keys, args))

    async def give(self, member: str) -> None:
        await _GIVE(self.redis, self.keys, [member])
        _FREED.wake(self.keys[0])

    async def _wait(self, member: str, order: int) -> None:
        """Ask until the slots are taken: after a backoff, or at once when a task of the queue
        gives its slots back in this process. The event is cleared before each ask, so a give
        that lands while the ask is under way still wakes the wait after it."""
        attempt = 0
        with _FREED.listen(self.keys[0]) as freed:
            while True:
                freed.clear()
                if await self.take(member, order):
                    return
                attempt += 1
                delay = backoff_delay_s(attempt, self.poll_base_s, self.poll_cap_s)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(freed.wait(), delay)

    @contextlib.asynccontextmanager
    async def hold(self, member: str, order: int) -> AsyncIterator[None]:
        """Wait for the slots, keep them renewed while the body runs, then give them back."""
        try:
            await self._wait(member, order)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.give(member)  # leave the waiting list (a shutdown, Redis down)
            raise
        renewer = asyncio.create_task(self._renew(member, order))
        try:
            yield
        finally:
            await stop(renewer)
            try:
                await self.give(member)
            except Exception as e:  # Redis down: the lease expires by itself
                log.warning("task_slot_release_failed", key=self.keys[3], error=str(e))

    async def _renew(self, member: str, order: int) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            try:
                if not await self.take(member, order):
                    log.error("task_slot_lost", key=self.keys[3], member=member)
            except Exception as e:  # Redis down: try again at the next interval
                log.warning("task_slot_renew_failed", key=self.keys[3], error=str(e))
