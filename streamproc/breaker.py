"""A circuit breaker per outside destination, shared by every replica through Redis.

Each destination (a webhook host, Slack, SES in a region, an AWS account's API) has one hash
``<p>:breaker:<name>``; all state changes are Lua scripts on Redis' clock (``TIME``), so
replicas agree without a leader and clocks that drift do not matter:

- **closed**: calls go through. A failure adds one to ``failures``; a success resets it.
  ``threshold`` consecutive failures open the breaker.
- **open**: calls are refused for ``cooldown_s``; the caller waits (a handler raises
  ``BreakerOpen``, a ``Defer``: the event is rescheduled without using a retry attempt).
- **half-open**: after the cool-down one caller, across all replicas, is let through as the
  probe (it holds the probe for ``probe_s``); a success closes the breaker, a failure opens
  it again for another cool-down. The others wait (and look again after at most a
  cool-down). A probe that fails is the destination's failure, not the event's: ``guarded``
  raises ``BreakerOpen`` for it too, so a long outage dead-letters nothing.

Besides failures, a destination can ask to be left alone (HTTP 429 with Retry-After):
``hold(seconds)`` makes every replica wait that long without counting a failure.

The happy path costs one script call (``admit``); ``success()`` writes only when there was
something to reset. ``streamproc inspect`` and the ``streamproc_breaker_*`` metrics show each
breaker's state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
import redis.asyncio as aioredis
from prometheus_client import Counter, Gauge

from streamproc._lua import Lua, with_scripts
from streamproc.errors import Defer
from streamproc.keys import Keys

__all__ = ("PROBE", "RESET", "Breaker", "BreakerOpen", "BreakerState", "breaker_states")

#: ``Breaker.admit`` answers: go (nothing to report on success), go and report success (there
#: are failures to reset), go as the half-open probe (report either way).
CLEAN, RESET, PROBE = 0, 1, 2

STATE = Gauge(
    "streamproc_breaker_state",
    "Circuit breaker state as this process last saw it: 0 closed, 1 half-open, 2 open",
    ["breaker"],
)
TRANSITIONS = Counter(
    "streamproc_breaker_transitions",
    "Circuit breaker state changes made by this process",
    ["breaker", "to"],
)
REFUSED = Counter(
    "streamproc_breaker_refused",
    "Calls the breaker held back (open, probe in flight, or a destination's hold)",
    ["breaker"],
)
_LEVEL = {"closed": 0, "half_open": 1, "open": 2}

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] breaker hash, KEYS[2] index zset. ARGV: cooldown ms, probe ms, name.
# Returns {verdict, wait ms, state, failures}: verdict 1 go, 2 go as the probe, 0 wait.
_ADMIT = Lua(
    _NOW
    + """
local h = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probe_until', 'hold_until',
                     'failures')
local state = h[1] or 'closed'
local failures = tonumber(h[5] or '0')
local hold = tonumber(h[4] or '0')
if hold > now then return {0, hold - now, state, failures} end
if state == 'closed' then return {1, 0, state, failures} end
if state == 'open' then
  local ready = tonumber(h[2] or '0') + tonumber(ARGV[1])
  if now < ready then return {0, ready - now, state, failures} end
else
  local probe = tonumber(h[3] or '0')
  if now < probe then return {0, math.min(probe - now, tonumber(ARGV[1])), state, failures} end
end
redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe_until', now + tonumber(ARGV[2]),
           'changed_at', now)
redis.call('ZADD', KEYS[2], now, ARGV[3])
return {2, 0, 'half_open', failures}
"""
)

# KEYS[1] breaker hash, KEYS[2] index zset. ARGV: ok (1/0), threshold, error, name.
# Returns {state before, state after}.
_RECORD = Lua(
    _NOW
    + """
local before = redis.call('HGET', KEYS[1], 'state') or 'closed'
local after = before
if ARGV[1] == '1' then
  after = 'closed'
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', 0, 'probe_until', 0)
else
  local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
  redis.call('HSET', KEYS[1], 'last_error', ARGV[3], 'failed_at', now)
  if before == 'half_open' or (before == 'open') or failures >= tonumber(ARGV[2]) then
    after = 'open'
    if before ~= 'open' then
      redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now, 'probe_until', 0)
    end
  end
end
if after ~= before then
  redis.call('HSET', KEYS[1], 'changed_at', now)
end
redis.call('ZADD', KEYS[2], now, ARGV[4])
return {before, after}
"""
)

# KEYS[1] breaker hash, KEYS[2] index zset. ARGV: hold ms, name, reason. Returns the hold end.
_HOLD = Lua(
    _NOW
    + """
local until_ms = now + tonumber(ARGV[1])
local have = tonumber(redis.call('HGET', KEYS[1], 'hold_until') or '0')
if until_ms > have then
  redis.call('HSET', KEYS[1], 'hold_until', until_ms, 'hold_reason', ARGV[3])
else
  until_ms = have
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return until_ms
"""
)


class BreakerOpen(Defer):
    """Raised by ``Breaker.admit``: the destination is not to be called for ``delay_s``."""

    def __init__(self, name: str, state: str, delay_s: float, why: str = "") -> None:
        self.breaker, self.state = name, state
        why = f" ({why})" if why else ""
        super().__init__(f"breaker {name!r} is {state}{why}: wait {delay_s:.1f}s", delay_s=delay_s)


class BreakerState(msgspec.Struct, frozen=True, kw_only=True):
    """One breaker as stored (times are Redis' clock, epoch ms; 0 = never)."""

    name: str
    state: str = "closed"
    failures: int = 0
    opened_at: int = 0
    changed_at: int = 0
    hold_until: int = 0
    last_error: str = ""


class Breaker:
    """The breaker of one destination (cheap to build; the state is in Redis)."""

    __slots__ = ("_index", "_key", "client", "cooldown_s", "name", "probe_s", "threshold")

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        name: str,
        *,
        threshold: int = 5,
        cooldown_s: float = 30.0,
        probe_s: float = 30.0,
    ) -> None:
        if threshold < 1 or cooldown_s <= 0 or probe_s <= 0:
            raise ValueError("breaker threshold >= 1, cooldown_s > 0 and probe_s > 0")
        self.client, self.name = client, name
        self.threshold, self.cooldown_s, self.probe_s = threshold, cooldown_s, probe_s
        self._key, self._index = keys.breaker(name), keys.breakers()

    async def admit(self) -> int:
        """``CLEAN`` (call away; nothing to report on success), ``RESET`` (report success:
        there are failures to reset) or ``PROBE`` (the half-open probe: report either way).

        Raises ``BreakerOpen`` with the wait when the destination must not be called now.
        A half-open breaker lets one caller through as the probe: that caller must report
        ``success()`` or ``failure()`` (a probe never reported is given up after ``probe_s``).
        """
        _, reply = await self.ask_with(lambda pipe: None)
        return self.verdict(reply)

    async def ask_with(self, queue: Callable[[Any], None]) -> tuple[list[Any], Any]:
        """One round trip: the commands ``queue`` adds to a pipeline, then the admission
        question. Returns their replies and the breaker's, for ``verdict``."""

        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                queue(pipe)
                _ADMIT.queue(
                    pipe,
                    [self._key, self._index],
                    [int(self.cooldown_s * 1000), int(self.probe_s * 1000), self.name],
                )
                return list(await pipe.execute())

        replies = await with_scripts(self.client, [_ADMIT], send)
        return replies[:-1], replies[-1]

    def verdict(self, reply: Any) -> int:
        """The admission (``CLEAN``, ``RESET``, ``PROBE``) from ``ask_with``'s breaker reply;
        raises ``BreakerOpen`` when the caller must wait."""
        verdict, wait_ms, state, failures = reply
        state = state.decode() if isinstance(state, bytes) else str(state)
        STATE.labels(self.name).set(_LEVEL.get(state, 0))
        if not int(verdict):
            REFUSED.labels(self.name).inc()
            raise BreakerOpen(self.name, state, int(wait_ms) / 1000)
        if int(verdict) == 2:
            TRANSITIONS.labels(self.name, "half_open").inc()
            return PROBE
        return RESET if int(failures) > 0 else CLEAN

    async def success(self) -> None:
        await self._record(True, "")

    async def failure(self, error: str) -> None:
        await self._record(False, error[:300])

    async def hold(self, seconds: float, reason: str = "") -> float:
        """Make every replica wait ``seconds`` before calling (Retry-After); the end, epoch s."""
        until = await _HOLD(
            self.client,
            [self._key, self._index],
            [max(int(seconds * 1000), 1), self.name, reason[:200]],
        )
        return int(until) / 1000

    async def _record(self, ok: bool, error: str) -> None:
        before, after = await _RECORD(
            self.client,
            [self._key, self._index],
            ["1" if ok else "0", self.threshold, error, self.name],
        )
        after = after.decode() if isinstance(after, bytes) else str(after)
        STATE.labels(self.name).set(_LEVEL.get(after, 0))
        if after != (before.decode() if isinstance(before, bytes) else str(before)):
            TRANSITIONS.labels(self.name, after).inc()


async def breaker_states(client: aioredis.Redis, keys: Keys, *, limit: int = 200) -> list[Any]:
    """Every breaker that has been used, most recently changed first (for ``inspect``)."""
    names: list[bytes] = await client.zrevrange(keys.breakers(), 0, limit - 1)  # type: ignore[assignment]
    if not names:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for n in names:
            pipe.hgetall(keys.breaker(n.decode()))
        rows: list[dict[bytes, bytes]] = await pipe.execute()
    out = []
    for n, raw in zip(names, rows, strict=True):
        f = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        out.append(
            BreakerState(
                name=n.decode(),
                state=f.get("state", "closed"),
                failures=int(f.get("failures", 0)),
                opened_at=int(f.get("opened_at", 0)),
                changed_at=int(f.get("changed_at", 0)),
                hold_until=int(f.get("hold_until", 0)),
                last_error=f.get("last_error", ""),
            )
        )
    return out
