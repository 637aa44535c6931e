"""Partition ownership: the live consumers of a group share its topics' partitions.

Each partition of the group's partitioned topics has a lease (``Keys.partition_lease``: the
consumer's name, PX = ``min_idle_ms``; a name is held by one live process at a time,
``Keys.consumer_lease``, so a replica restarted under its name gets its partitions back),
and the group a members set (``Keys.owners``: name → when its membership lapses). Both
carry the tag ``{own:<group>}``, so one script (``BALANCE``) runs each step on one node,
also on a Redis Cluster. Every second (or renewal period, if shorter) each consumer runs a
step: it renews its membership and its leases, drops the members whose membership lapsed,
and computes its share of the ``P`` partitions among the ``n`` live members sorted by name:
``P // n``, one more for the first ``P % n`` of them (the shares add up to ``P``). Below its
share it takes free partitions; above it, it gives back the surplus — but only after it has
finished with them.

A partition owned by this consumer is in one of three states:

``adopting``
    Just taken. Not read yet while the group's pending list of its streams holds entries of
    another consumer (one that died, or gave the partition up before finishing): the reclaim
    path takes them over once their owner stopped renewing them (``min_idle_ms``); then the
    partition is read. So the entries of a key are not run out of order at a handover.
``active``
    Read (new entries, retries) and reclaimed.
``draining``
    Surplus: no longer read; given back once nothing of it is in flight here and this
    consumer's own pending list of its streams is empty.

Both waits are bounded (``3 * min_idle_ms``, at least ``grace_s``): a partition is then read
(or given back) anyway and a warning says so; at-least-once and dedup still hold, only the
per-key order across the handover may not. A lease lost to a stall longer than
``min_idle_ms`` is dropped at the next step.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis.asyncio as aioredis
import structlog

from streamproc._lua import Lua
from streamproc.consumer._reader import Reader
from streamproc.keys import Keys

__all__ = ("BALANCE", "Ownership")

log = structlog.get_logger("streamproc.consumer")

# One ownership step of a group. KEYS[1] members zset, KEYS[2..] the partition leases (one
# tag). ARGV: consumer name, ttl ms, indices into KEYS of leases to give back
# (space-separated), "1" to leave the group. Returns {share, {indices of the leases held}}.
BALANCE = Lua(
    r"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me, ttl = ARGV[1], tonumber(ARGV[2])
for idx in string.gmatch(ARGV[3], '%d+') do
  local k = KEYS[tonumber(idx)]
  if redis.call('GET', k) == me then redis.call('DEL', k) end
end
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[1], me)
  return {0, {}}
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, me)
redis.call('PEXPIRE', KEYS[1], 2 * ttl)
local names = redis.call('ZRANGE', KEYS[1], 0, -1)
table.sort(names)
local rank, n = 0, #names
for i, m in ipairs(names) do
  if m == me then rank = i - 1 end
end
local p = #KEYS - 1
local share = math.floor(p / n)
if rank < p % n then share = share + 1 end
local mine, free = {}, {}
for i = 2, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v == me then
    redis.call('PEXPIRE', KEYS[i], ttl)
    mine[#mine + 1] = i
  elseif not v then
    free[#free + 1] = i
  end
end
local j = 1
while #mine < share and j <= #free do
  redis.call('SET', KEYS[free[j]], me, 'PX', ttl)
  mine[#mine + 1] = free[j]
  j = j + 1
end
return {share, mine}
"""
)

ADOPTING, ACTIVE, DRAINING = "adopting", "active", "draining"


class Ownership:
    """The partitions one consumer owns, and its steps to keep the group balanced."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        keys: Keys,
        group: str,
        partitions: Sequence[str],
        ttl_ms: int,
        bound_s: float,
        reader: Reader,
    ) -> None:
        self.client, self.keys, self.group, self.reader = client, keys, group, reader
        self.partitions = list(partitions)
        self.ttl_ms, self.bound_s = ttl_ms, bound_s
        self.state: dict[str, str] = {}  # partition -> adopting | active | draining
        self._since: dict[str, float] = {}  # partition -> monotonic time of its state
        self.share = 0
        self.handovers = 0  # partitions given back
        self._keys = [keys.owners(group)] + [keys.partition_lease(group, p) for p in partitions]

    def _streams(self, partition: str) -> tuple[str, str]:
        return self.keys.stream(partition), self.keys.retry_stream(partition, self.group)

    def in_state(self, *states: str) -> list[str]:
        return [p for p in self.partitions if self.state.get(p) in states]

    def streams_of(self, partitions: Iterable[str]) -> set[str]:
        return {s for p in partitions for s in self._streams(p)}

    async def step(self, name: str) -> bool:
        """Renew, balance, take and give back. Returns whether the set read changed."""
        before = set(self.in_state(ACTIVE))
        ready = await self._finished(self.in_state(DRAINING))
        give = [self.partitions.index(p) + 2 for p in ready]
        share, held = await self._run(name, " ".join(map(str, give)))
        now = time.monotonic()
        for p in ready:
            self.state.pop(p, None)
            self.handovers += 1
            log.info("partition_given_back", group=self.group, partition=p)
        owned = {self.partitions[int(i) - 2] for i in held}
        for p in list(self.state):
            if p not in owned:
                log.warning("partition_lease_lost", group=self.group, partition=p)
                del self.state[p]
        for p in self.partitions:
            if p in owned and p not in self.state:
                self._set(p, ADOPTING, now)
                log.info("partition_taken", group=self.group, partition=p)
        self.share = share
        # above the share: drain the surplus (the last ones first); at or below: keep all
        surplus = len(owned) - share
        draining = self.in_state(DRAINING)
        for p in draining[: max(0, len(draining) - max(surplus, 0))]:
            self._set(p, ACTIVE, now)  # needed again (a member left)
        surplus -= len(self.in_state(DRAINING))
        for p in reversed(self.in_state(ADOPTING, ACTIVE)):
            if surplus <= 0:
                break
            self._set(p, DRAINING, now)
            surplus -= 1
        for p in await self._adopted(self.in_state(ADOPTING)):
            self._set(p, ACTIVE, now)
        return set(self.in_state(ACTIVE)) != before

    async def leave(self, name: str) -> None:
        """Give back every lease and leave the members (at stop)."""
        give = [self.partitions.index(p) + 2 for p in self.state]
        await BALANCE(
            self.client,
            self._keys,
            [name, self.ttl_ms, " ".join(map(str, give)), "1"],
        )
        self.state.clear()

    async def _run(self, name: str, give: str) -> tuple[int, list[Any]]:
        reply: Any = await BALANCE(self.client, self._keys, [name, self.ttl_ms, give, "0"])
        return int(reply[0]), list(reply[1])

    def _set(self, partition: str, state: str, now: float) -> None:
        if self.state.get(partition) != state:
            self.state[partition] = state
            self._since[partition] = now

    def _overdue(self, partition: str) -> bool:
        return time.monotonic() - self._since.get(partition, 0.0) > self.bound_s

    async def _pending_by(self, partitions: list[str]) -> dict[str, dict[str, int]]:
        """Per partition: consumer name -> its pending entries on the partition's streams."""
        if not partitions:
            return {}
        async with self.client.pipeline(transaction=False) as pipe:
            for p in partitions:
                for s in self._streams(p):
                    pipe.xpending(s, self.group)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        out: dict[str, dict[str, int]] = {}
        for i, p in enumerate(partitions):
            counts = out.setdefault(p, {})
            for r in replies[2 * i : 2 * i + 2]:
                if isinstance(r, Exception):  # NOGROUP: nothing pending there
                    continue
                for c in r.get("consumers") or ():
                    n = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                    counts[n] = counts.get(n, 0) + int(c["pending"])
        return out

    async def _finished(self, draining: list[str]) -> list[str]:
        """The draining partitions this consumer is done with (or waited on long enough)."""
        reader = self.reader
        quiet = [
            p
            for p in draining
            if not any(reader.held.get(s) for s in self._streams(p))
            and not reader.reading_now(self._streams(p))
        ]
        pending = await self._pending_by(quiet)
        done: list[str] = []
        for p in draining:
            mine = pending.get(p, {}).get(reader.name, 0) if p in quiet else 1
            if mine == 0:
                done.append(p)
            elif self._overdue(p):
                log.warning("partition_given_back_unfinished", group=self.group, partition=p)
                done.append(p)
            elif p in quiet:  # pending here but not held: read them again (with 0)
                for s in self._streams(p):
                    reader.recover(s)
        return done

    async def _adopted(self, adopting: list[str]) -> list[str]:
        """The adopting partitions no other consumer has pending entries of any more."""
        pending = await self._pending_by(adopting)
        out: list[str] = []
        for p in adopting:
            others = {c: n for c, n in pending.get(p, {}).items() if c != self.reader.name and n}
            if not others:
                out.append(p)
            elif self._overdue(p):
                log.warning(
                    "partition_read_before_handover", group=self.group, partition=p, **others
                )
                out.append(p)
        return out
