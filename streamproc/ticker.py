"""The ticker: periodic events that fire once, whatever the number of replicas.

Every ``streamproc ticker`` process runs ``Ticker.run()``. One holds the lease (see
``streamproc._lease``) and fires; the others poll for the lease every ``standby_poll_ms`` and
take over when it expires (at most ``lease_ttl_ms`` + one poll after the leader died) or at
once when the leader stops gracefully (it releases the lease).

The leader keeps, per schedule, the last scheduled time it dealt with (hash
``<p>:ticker:{ticker}:last``, epoch ms); at each due time it applies the schedule's missed-tick
policy to the times in ``(last, now]`` (``streamproc.schedule.plan_fires``), publishes the ticks
through the Producer and then records the latest due time, guarded by the fencing token. Tick
ids are ``uuid5(schedule@scheduled ms)`` and the Producer dedups by event id, so a tick that
two leaders fire, or that a leader fires again after a crash between publish and record, is in
the stream once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge, Histogram

from streamproc._aio import stop, wait_event
from streamproc._backoff import Backoff, backoff_delay_s
from streamproc._lease import Lease
from streamproc._lua import Lua
from streamproc.connection import REDIS_DOWN
from streamproc.errors import ConfigError, PublishError
from streamproc.event import Event
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.schedule import Schedule, from_ms, plan_fires, tick_id
from streamproc.scheduler import RuntimeFirer

__all__ = ("Ticker", "TickerSettings", "TickerStats")

log = structlog.get_logger("streamproc.ticker")

TICKS_FIRED = Counter(
    "streamproc_ticks_fired",
    "Ticks published by this leader (a duplicate of another leader's included)",
    ["schedule"],
)
TICKS_SKIPPED = Counter(
    "streamproc_ticks_skipped", "Scheduled times passed over by a missed-tick policy", ["schedule"]
)
TICK_LATENESS = Histogram(
    "streamproc_tick_lateness_seconds",
    "Publish time minus scheduled time of on-time ticks",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0, 5.0),
)
TICKER_LEADER = Gauge("streamproc_ticker_leader", "1 while this process holds the ticker lease")

#: The ``schedule`` label of runtime schedules' ticks (one label for all: names are unbounded).
RUNTIME_LABEL = "(runtime)"

#: What makes one leader step fail (it retries with backoff while it holds the lease).
_TICK_FAILURES: tuple[type[BaseException], ...] = (*REDIS_DOWN, PublishError)

# KEYS: lease, last. ARGV: token, name1, ms1, name2, ms2 ... Records only under our lease and
# only forwards. Returns 0 when the lease is no longer ours (a newer leader exists).
_RECORD = Lua("""
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[2], ARGV[i])
  if (not cur) or tonumber(cur) < tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
end
return 1
""")


class TickerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    #: This replica's name in the lease (unique per process: host-pid by default).
    node: str = "ticker"
    #: A dead leader is replaced within this time (+ one standby poll).
    lease_ttl_ms: int = 10_000
    #: The leader renews every this often (default ttl / 3).
    renew_every_ms: int = 0
    #: Standbys try to take the lease every this often (default ttl / 5).
    standby_poll_ms: int = 0
    #: Fire runtime schedules (``streamproc.scheduler``) as well as the static table.
    runtime: bool = True
    #: The leader looks for runtime schedules at least this often (one may be added with an
    #: earlier time than any it knows of), and fires at most this many per script call.
    runtime_poll_ms: int = 250
    runtime_batch: int = 500
    #: Between two runtime steps at least this long: at hundreds of fires per second the
    #: ticks due meanwhile go out in one script call rather than one call each (it bounds
    #: how late a runtime tick can be made by this alone).
    runtime_min_step_ms: int = 20

    def __post_init__(self) -> None:
        if self.lease_ttl_ms < 300:
            raise ConfigError("TickerSettings.lease_ttl_ms must be >= 300")
        if self.renew_every_ms < 0 or self.standby_poll_ms < 0:
            raise ConfigError("TickerSettings: renew_every_ms and standby_poll_ms must be >= 0")
        if self.renew_every_ms and self.renew_every_ms * 2 > self.lease_ttl_ms:
            raise ConfigError("TickerSettings.renew_every_ms must be at most half the lease TTL")
        if not 10 <= self.runtime_poll_ms <= 60_000 or not 1 <= self.runtime_batch <= 10_000:
            raise ConfigError("TickerSettings: runtime_poll_ms 10..60000, runtime_batch 1..10000")
        if not 0 <= self.runtime_min_step_ms <= self.runtime_poll_ms:
            raise ConfigError("TickerSettings.runtime_min_step_ms: 0..runtime_poll_ms")

    @property
    def renew_s(self) -> float:
        return (self.renew_every_ms or self.lease_ttl_ms // 3) / 1000

    @property
    def poll_s(self) -> float:
        return (self.standby_poll_ms or self.lease_ttl_ms // 5) / 1000


class TickerStats:
    """Counters since start (asserted on in tests, read by the benchmark)."""

    def __init__(self) -> None:
        self.fired = self.duplicates = self.skipped = self.terms = 0
        #: Of ``fired``: runtime schedules' ticks.
        self.runtime_fired = 0
        #: Lateness of on-time ticks in ms (the latest 10 000).
        self.lateness_ms: deque[float] = deque(maxlen=10_000)


class Ticker:
    """Fires the schedules' ticks while it holds the lease; stands by otherwise."""

    def __init__(
        self,
        schedules: Sequence[Schedule],
        *,
        client: aioredis.Redis,
        producer: Producer,
        keys: Keys,
        settings: TickerSettings | None = None,
    ) -> None:
        names = [s.name for s in schedules]
        if len(set(names)) != len(names):
            raise ConfigError(f"schedule names must be unique: {names}")
        self.settings = s = settings or TickerSettings()
        if not schedules and not s.runtime:
            raise ConfigError("the ticker needs at least one schedule (or runtime schedules)")
        self.schedules = tuple(schedules)
        self.client, self.producer, self.keys = client, producer, keys
        self.lease = Lease(client, keys, s.node, ttl_ms=s.lease_ttl_ms)
        #: Fires the runtime schedules (None when ``settings.runtime`` is off).
        self.runtime = (
            RuntimeFirer(
                client,
                keys,
                producer.codec,
                self.lease,
                node=s.node,
                batch=s.runtime_batch,
                poll_s=s.runtime_poll_ms / 1000,
                min_step_s=s.runtime_min_step_ms / 1000,
            )
            if s.runtime
            else None
        )
        self.stats = TickerStats()
        self._last: dict[str, datetime] = {}
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()

    # ------------------------------------------------------------------ control

    def stop(self) -> None:
        """Finish the current step, release the lease and return from ``run()``."""
        self._stop.set()
        self._wake.set()

    @property
    def is_leader(self) -> bool:
        return self.lease.held()

    async def run(self) -> None:
        backoff = Backoff(cap_s=2.0)
        try:
            while not self._stop.is_set():
                try:
                    if await self.lease.acquire():
                        backoff.reset()
                        await self._lead()
                        continue
                    backoff.reset()
                except REDIS_DOWN as e:
                    if backoff.attempt == 0:
                        log.warning("ticker_redis_unavailable", error=str(e))
                    await self._sleep(_next_delay_s(backoff))
                    continue
                await self._sleep(self.settings.poll_s)
        finally:
            TICKER_LEADER.set(0)
            with contextlib.suppress(*REDIS_DOWN):
                await self.lease.release()

    async def _sleep(self, seconds: float) -> None:
        await wait_event(self._wake, seconds)
        if not self._stop.is_set():
            self._wake.clear()

    # ------------------------------------------------------------------ leading

    async def _lead(self) -> None:
        self.stats.terms += 1
        TICKER_LEADER.set(1)
        log.info("ticker_leader", node=self.settings.node, fence=self.lease.fence)
        renewer = asyncio.create_task(self._renew_loop())
        try:
            await self.load_state()
            backoff = Backoff(cap_s=1.0)
            while self.lease.held() and not self._stop.is_set():
                try:
                    await self.fire_due()
                    delay = self.next_due_s()
                    if self.runtime is not None:
                        await self.fire_runtime()
                        delay = min(delay, await self.runtime.next_due_s())
                    backoff.reset()
                except _TICK_FAILURES as e:
                    log.error("tick_failed", error=str(e))
                    delay = _next_delay_s(backoff)
                await self._sleep(min(delay, self.lease.remaining_s()))
        finally:
            await stop(renewer)
            TICKER_LEADER.set(0)
            if not self._stop.is_set():
                log.warning("ticker_lease_lost", node=self.settings.node)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.renew_s)
            try:
                if not await self.lease.renew():
                    self._wake.set()
                    return
            except REDIS_DOWN as e:
                # Not renewed: the local deadline runs out and the fire loop stops by itself.
                log.warning("ticker_renew_failed", error=str(e), left_s=self.lease.remaining_s())

    async def load_state(self) -> None:
        """Read the last fired times; a schedule seen for the first time starts from now."""
        raw: dict[Any, Any] = await self.client.hgetall(self.keys.ticker_last())
        now = datetime.now(UTC)
        self._last = {}
        fresh: list[Any] = []
        for s in self.schedules:
            ms = raw.get(s.name.encode())
            if ms is None:
                self._last[s.name] = now
                fresh += (s.name, int(now.timestamp() * 1000))
            else:
                self._last[s.name] = from_ms(int(ms))
        if fresh:
            await self._record_fired(fresh)

    async def _record_fired(self, pairs: list[Any]) -> bool:
        ok = int(
            await _RECORD(
                self.client,
                [self.keys.ticker_lease(), self.keys.ticker_last()],
                [self.lease.token, *pairs],
            )
        )
        if not ok:
            log.warning("ticker_fenced_off", fence=self.lease.fence)
            self.lease.lose()
            self._wake.set()
        return bool(ok)

    async def fire_runtime(self, now: datetime | None = None) -> int:
        """One step of the runtime schedules; the number of ticks written."""
        if self.runtime is None:
            return 0
        r = await self.runtime.fire_due(now)
        self.stats.fired += r.fired
        self.stats.runtime_fired += r.fired
        self.stats.skipped += r.skipped
        if r.fired:
            TICKS_FIRED.labels(RUNTIME_LABEL).inc(r.fired)
        if r.skipped:
            TICKS_SKIPPED.labels(RUNTIME_LABEL).inc(r.skipped)
        for late_ms in r.lateness_ms:
            self.stats.lateness_ms.append(late_ms)
            TICK_LATENESS.observe(max(late_ms / 1000, 0.0))
        return r.fired

    def next_due_s(self) -> float:
        """Seconds until the earliest next scheduled time of the static table (60 s when it is
        empty: the runtime schedules say when they are due)."""
        if not self.schedules:
            return 60.0
        now = datetime.now(UTC)
        nxt = min(s.trigger.next_after(max(self._last[s.name], now)) for s in self.schedules)
        return max(0.0, (nxt - now).total_seconds())

    async def fire_due(self, now: datetime | None = None) -> list[Event]:
        """One step: publish the due ticks of every schedule and record them. Returns them.

        A no-op unless this process holds the lease. ``now`` is for tests.
        """
        if not self.lease.held():
            return []
        now = now or datetime.now(UTC)
        events: list[Event] = []
        record: list[Any] = []
        passed: dict[str, int] = {}
        for s in self.schedules:
            fire, skipped, latest = plan_fires(s, self._last[s.name], now)
            if latest is None:
                continue
            passed[s.name] = skipped
            for i, at in enumerate(fire):
                events.append(self._tick(s, at, skipped if i == len(fire) - 1 else 0, now))
            record += (s.name, int(latest.timestamp() * 1000))
        if not record:
            return []
        if not self.lease.held():  # the lease may have run out while we computed
            return []
        produced = await self.producer.append(events)
        published_at = time.time()
        dups = sum(p.duplicate for p in produced)
        self.stats.fired += len(events) - dups
        self.stats.duplicates += dups
        for e in events:
            TICKS_FIRED.labels(getattr(e, "schedule", "")).inc()
            if not getattr(e, "catch_up", False):
                late_s = published_at - getattr(e, "scheduled_for").timestamp()  # noqa: B009
                self.stats.lateness_ms.append(late_s * 1000)
                TICK_LATENESS.observe(max(late_s, 0.0))
        for name, n in passed.items():
            if n:
                self.stats.skipped += n
                TICKS_SKIPPED.labels(name).inc(n)
                log.info("ticks_missed", schedule=name, passed_over=n)
        if await self._record_fired(record):
            for i in range(0, len(record), 2):
                self._last[record[i]] = from_ms(record[i + 1])
        return events

    def _tick(self, s: Schedule, at: datetime, missed: int, now: datetime) -> Event:
        on_time = (now - at).total_seconds() <= s.grace_s
        factory: Any = s.event
        event: Event = factory(
            id=tick_id(s.name, at),
            key=s.key or s.name,
            source=f"ticker:{self.settings.node}",
            schedule=s.name,
            scheduled_for=at,
            fence=self.lease.fence,
            missed=missed,
            catch_up=not on_time,
        )
        return event


def _next_delay_s(backoff: Backoff) -> float:
    backoff.attempt += 1
    return backoff_delay_s(backoff.attempt, backoff.base_s, backoff.cap_s)
