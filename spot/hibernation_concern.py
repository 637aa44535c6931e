"""The ``hibernation`` concern: on every ``tick.hibernation``, put clusters to sleep and wake
them by their schedules, audit every action, and record what sleeping saved.

One tick at a time across replicas (a lease, ``_Lease``; a tick that finds it held by another
is deferred 5 s, without using an attempt). One tick, in order:

1. **One pipeline of reads**: the schedules' version, the newest tick done, the sleep records.
   Schedules are decoded again only when their version changed (``Runtime`` keeps them).
   A tick not newer than the newest one done is stale (a replay, a late retry): it does nothing.
2. **Decide** (pure, ``decide``): the slot of the tick's *scheduled* time (not the clock, so a
   replay decides the same) in each cluster's zone; slots are computed once per zone.
3. **Act** only for clusters whose state changes: per account and region, one paginated
   DescribeAutoScalingGroups, then UpdateAutoScalingGroup per node group (clusters in
   parallel, ``aws_concurrency``). Going to sleep, the sizes are remembered *before* the first
   group is touched, and never overwritten by an attempt that finds a group at 0 already; a
   wake restores them. A failure (AccessDenied, throttling, an open breaker, a group that is
   gone) leaves that cluster as it is, is audited (not for an open breaker) and logged; the
   next tick, a minute later, tries again. The other clusters go on.
4. **Effects** (written once, atomically with the tick's ack): the sleep records completed or
   deleted, the audit entries, the newest tick done, and the savings of the clusters that
   slept through the interval since the previous tick (``hibernated_instance_hours`` and
   ``savings_usd`` in the day's metrics hash, read by the weekly report). A replay therefore
   never counts twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from schemas.metrics import add_figures
from schemas.ticks import HibernationTick
from spot import _asg
from spot._schedule import Schedule, Slots, wants_sleep
from spot.aws import Account, AccountStore, Aws, AwsSettings
from spot.hibernation_store import (
    AUDIT_MAXLEN,
    AsgSizes,
    HibernationKeys,
    SleepRecord,
    audit_fields,
    decode_record,
    sizes_text,
)
from spot.prices import hourly_usd
from streamproc._aio import stop
from streamproc._lua import Lua
from streamproc.breaker import BreakerOpen
from streamproc.concern import Concern, Context
from streamproc.errors import ConfigError, Defer, Permanent, Retry

__all__ = ("CONCERN", "HibernationSettings", "Runtime", "decide", "runtime", "use")

log = structlog.get_logger("spot.hibernation")

_SCHEDULE = msgspec.json.Decoder(Schedule)
_ZERO = "min=0 max=0 desired=0"


class HibernationSettings(msgspec.Struct, frozen=True, kw_only=True):
    """``STREAMPROC_HIBERNATION_<FIELD>``."""

    #: Clusters acted on at once within a tick.
    aws_concurrency: int = 16
    #: Savings count the time since the previous tick, at most this long (a tick missed for
    #: hours, the ticker down, is not counted as hours asleep).
    max_gap_s: float = 600.0
    #: One tick at a time across replicas: the lease's TTL, renewed every third of it.
    lease_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if not 1 <= self.aws_concurrency <= 256:
            raise ValueError("aws_concurrency within 1..256")
        if not 0 < self.max_gap_s <= 86_400:
            raise ValueError("max_gap_s within 0..86400")
        if not 1 <= self.lease_ttl_s <= 3600:
            raise ValueError("lease_ttl_s within 1..3600")


# KEYS: lease. ARGV: token, ttl_ms. 1 when this token holds it now (taken, or already ours).
_TAKE = Lua("""
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
""")
# KEYS: lease. ARGV: token, ttl_ms. Extends (renew) or shortens (release) the lease if ours.
_EXPIRE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
""")
#: Released leases live this much longer: the tick's settle (its effects) lands first.
_SETTLE_MS = 2000


class _Lease:
    """One hibernation tick at a time across replicas (``<p>:state:hibernation:lease``).

    Without it two replicas handling two ticks could both put one cluster to sleep, the second
    finding its groups at 0 already. The token is the consumer's name (unique in the group, and
    its concern handles one tick at a time), so the same consumer takes it again. Released by
    shortening it to ``_SETTLE_MS``: the tick's effects are written with its ack, after the
    handler.
    """

    def __init__(self, ctx: Context, key: str, ttl_s: float) -> None:
        self.redis, self.key = ctx.redis, key
        self.token = ctx.consumer
        self.ttl_ms = int(ttl_s * 1000)

    async def take(self) -> bool:
        return bool(await _TAKE(self.redis, [self.key], [self.token, self.ttl_ms]))

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled or lost."""
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            if not await _EXPIRE(self.redis, [self.key], [self.token, self.ttl_ms]):
                log.warning("hibernation_lease_lost", key=self.key)
                return

    async def release(self) -> None:
        await _EXPIRE(self.redis, [self.key], [self.token, _SETTLE_MS])


@dataclass
class Change:
    cluster: str
    #: "sleep", "wake" or "prewarm" (woken early: its wake is within the pre-warm window).
    action: str


@dataclass
class _Outcome:
    effects: list[tuple[str | bytes | int | float, ...]] = field(default_factory=list)


def decide(
    schedules: Mapping[str, Schedule], records: Mapping[str, SleepRecord], at: datetime
) -> list[Change]:
    """What changes at ``at``: clusters to put to sleep, to wake, to pre-warm (pure)."""
    slots = Slots(at)
    out: list[Change] = []
    for cluster, s in schedules.items():
        try:
            want = wants_sleep(s, slots)
        except ConfigError:  # a zone this host's tzdata lacks: leave the cluster alone
            continue
        rec = records.get(cluster)
        if want:
            if rec is None or not rec.complete:
                out.append(Change(cluster, "sleep"))
        elif rec is not None:
            now, _ = slots.of(s.tz, s.prewarm_min)
            out.append(Change(cluster, "prewarm" if s.week[now] == "1" else "wake"))
    for cluster in records.keys() - schedules.keys():  # schedule deleted by hand: wake it
        out.append(Change(cluster, "wake"))
    return out


class Runtime:
    """What this process's hibernation concern keeps: the AWS client and decoded schedules."""

    def __init__(self, aws: Aws, settings: HibernationSettings | None = None) -> None:
        self.aws = aws
        self.settings = settings or HibernationSettings()
        #: schedules key -> (version, schedules)
        self._schedules: dict[str, tuple[bytes | None, dict[str, Schedule]]] = {}

    async def schedules(
        self, client: Any, hk: HibernationKeys, version: bytes | None
    ) -> dict[str, Schedule]:
        cached = self._schedules.get(hk.schedules)
        if cached is not None and cached[0] == version and version is not None:
            return cached[1]
        raw: Any = await client.hgetall(hk.schedules)
        out: dict[str, Schedule] = {}
        for k, v in raw.items():
            try:
                out[k.decode()] = _SCHEDULE.decode(v)
            except msgspec.DecodeError:
                log.warning("hibernation_schedule_unreadable", cluster=k.decode()[:100])
        if len(self._schedules) > 64:
            self._schedules.clear()
        self._schedules[hk.schedules] = (version, out)
        return out


_runtime: Runtime | None = None


def use(rt: Runtime | None) -> None:
    """Set the runtime (tests, ``configure_from_env``); None = built from defaults on use."""
    global _runtime
    _runtime = rt


def runtime() -> Runtime:
    global _runtime
    if _runtime is None:
        _runtime = Runtime(Aws(AwsSettings()))
    return _runtime


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def savings(
    records: Mapping[str, SleepRecord], at_ms: int, last_ms: int, max_gap_s: float
) -> tuple[float, float]:
    """(instance-hours, USD) saved since the previous tick by the clusters asleep through it."""
    hours = usd = 0.0
    for rec in records.values():
        if not rec.complete:
            continue
        start = max(last_ms, rec.since_ms)
        if start <= 0 or start >= at_ms:
            continue
        h = min(at_ms - start, max_gap_s * 1000) / 3_600_000
        hours += rec.instances * h
        usd += rec.usd_per_hour * h
    return hours, usd


class _Tick:
    """One tick's work on the clusters that change."""

    def __init__(self, tick: HibernationTick, ctx: Context, rt: Runtime) -> None:
        self.tick, self.ctx, self.rt = tick, ctx, rt
        self.hk = HibernationKeys(ctx.keys)
        self.who = f"{ctx.group}/{ctx.consumer}"
        self.at = tick.scheduled_for
        self.accounts = AccountStore(ctx.redis, ctx.keys)
        self._account_cache: dict[str, Account | None] = {}
        self._groups: dict[tuple[str, str], asyncio.Task[list[dict[str, Any]]]] = {}

    def audit(self, out: _Outcome, action: str, cluster: str, **kw: str) -> None:
        fields = audit_fields(
            who=self.who, action=action, cluster=cluster, at=self.at, tick=self.tick.id, **kw
        )
        out.effects.append(("XADD", self.hk.audit, "*", *fields))

    async def account(self, account_id: str) -> Account:
        if account_id not in self._account_cache:
            self._account_cache[account_id] = await self.accounts.get(account_id)
        found = self._account_cache[account_id]
        if found is None:
            raise Permanent(f"account {account_id} is not registered (streamproc accounts add)")
        return found

    async def groups(self, account: Account, region: str) -> list[dict[str, Any]]:
        """Every ASG of (account, region): one paginated describe per tick, shared."""
        key = (account.id, region)
        task = self._groups.get(key)
        if task is None:
            task = self._groups[key] = asyncio.ensure_future(
                self.rt.aws.call(
                    self.ctx.redis,
                    self.ctx.keys,
                    account,
                    "autoscaling",
                    region,
                    _asg.describe_all,
                )
            )
        return await task

    async def set_sizes(self, account: Account, region: str, name: str, s: AsgSizes) -> None:
        await self.rt.aws.call(
            self.ctx.redis,
            self.ctx.keys,
            account,
            "autoscaling",
            region,
            lambda c: _asg.set_sizes(c, name, min=s.min, max=s.max, desired=s.desired),
        )

    async def sleep(self, s: Schedule, rec: SleepRecord | None, out: _Outcome) -> None:
        account = await self.account(s.account)
        found = _asg.cluster_groups(await self.groups(account, s.region), s.cluster, s.asgs)
        if not found:
            how = ", ".join(s.asgs) if s.asgs else "tagged with the cluster's name"
            raise Permanent(f"no Auto Scaling group in {s.account}/{s.region} ({how})")
        if rec is not None and (rec.account, rec.region) != (s.account, s.region):
            rec = None  # remembered for another place: never mixed with these groups
        remembered = dict(rec.asgs) if rec is not None else {}
        for g in found:  # first sizes win: a retry that finds a group at 0 keeps the old ones
            remembered.setdefault(g["AutoScalingGroupName"], _asg.sizes_of(g))
        instances = sum(v.desired for v in remembered.values())
        usd = sum(v.desired * hourly_usd(v.instance_type, v.lifecycle) for v in remembered.values())
        record = SleepRecord(
            account=s.account,
            region=s.region,
            asgs=remembered,
            since_ms=_ms(self.at),
            tick=self.tick.id,
            instances=instances,
            usd_per_hour=round(usd, 6),
        )
        # Remembered before any group is touched (a direct write, not an effect).
        await self.ctx.redis.hset(self.hk.asleep, s.cluster, msgspec.json.encode(record))
        zero = AsgSizes(min=0, max=0, desired=0)
        for g in found:
            name = g["AutoScalingGroupName"]
            live = _asg.sizes_of(g)
            if (live.min, live.max, live.desired) != (0, 0, 0):
                await self.set_sizes(account, s.region, name, zero)
            self.audit(
                out,
                "sleep",
                s.cluster,
                asg=name,
                before=sizes_text(remembered[name]),
                after=_ZERO,
                detail=f"{remembered[name].instance_type} {remembered[name].lifecycle}".strip(),
            )
        done = msgspec.structs.replace(record, complete=True)
        out.effects.append(("HSET", self.hk.asleep, s.cluster, msgspec.json.encode(done)))

    async def wake(self, cluster: str, action: str, rec: SleepRecord, out: _Outcome) -> None:
        account = await self.account(rec.account)
        live = _asg.by_name(await self.groups(account, rec.region))
        for name, sizes in sorted(rec.asgs.items()):
            g = live.get(name)
            if g is None:
                raise Permanent(f"Auto Scaling group {name} is gone: cannot restore {name}")
            now = _asg.sizes_of(g)
            if (now.min, now.max, now.desired) != (sizes.min, sizes.max, sizes.desired):
                await self.set_sizes(account, rec.region, name, sizes)
            self.audit(
                out, action, cluster, asg=name, before=sizes_text(now), after=sizes_text(sizes)
            )
        out.effects.append(("HDEL", self.hk.asleep, cluster))

    async def run(
        self,
        change: Change,
        schedule: Schedule | None,
        rec: SleepRecord | None,
        sem: asyncio.Semaphore,
    ) -> _Outcome:
        out = _Outcome()
        async with sem:
            try:
                if change.action == "sleep" and schedule is not None:
                    await self.sleep(schedule, rec, out)
                elif rec is not None:
                    await self.wake(change.cluster, change.action, rec, out)
            except BreakerOpen as e:  # not audited: one line per cluster a minute is noise
                log.warning("hibernation_deferred", cluster=change.cluster, reason=str(e)[:200])
                return _Outcome()
            except (Retry, Permanent) as e:
                log.warning(
                    "hibernation_failed",
                    cluster=change.cluster,
                    action=change.action,
                    error=str(e)[:300],
                )
                failed = _Outcome()
                self.audit(failed, "failed", change.cluster, detail=f"{change.action}: {e}")
                return failed
        return out


async def on_tick(tick: HibernationTick, ctx: Context) -> None:
    rt = runtime()
    hk = HibernationKeys(ctx.keys)
    lease = _Lease(ctx, hk.lease, rt.settings.lease_ttl_s)
    if not await lease.take():
        raise Defer("another replica is handling a hibernation tick", delay_s=5.0)
    keeper = asyncio.create_task(lease.keep())
    try:
        await _handle(tick, ctx, rt, hk)
    finally:
        with contextlib.suppress(Exception):  # a keeper that failed: the lease expires
            await stop(keeper)
        await lease.release()


async def _handle(tick: HibernationTick, ctx: Context, rt: Runtime, hk: HibernationKeys) -> None:
    at_ms = _ms(tick.scheduled_for)
    async with ctx.redis.pipeline(transaction=False) as p:
        p.get(hk.version)
        p.get(hk.last_tick)
        p.hgetall(hk.asleep)
        version, last, raw_records = await p.execute()
    last_ms = int(last or 0)
    if at_ms <= last_ms:
        log.info("hibernation_stale_tick", tick=tick.id, scheduled_for=str(tick.scheduled_for))
        return
    schedules = await rt.schedules(ctx.redis, hk, version)
    records: dict[str, SleepRecord] = {}
    for k, v in raw_records.items():
        rec = decode_record(v)
        if rec is not None:
            records[k.decode()] = rec
    changes = decide(schedules, records, tick.scheduled_for)
    hours, usd = savings(records, at_ms, last_ms, rt.settings.max_gap_s)
    outcomes: list[_Outcome] = []
    if changes:
        work = _Tick(tick, ctx, rt)
        sem = asyncio.Semaphore(rt.settings.aws_concurrency)
        outcomes = await asyncio.gather(
            *(work.run(c, schedules.get(c.cluster), records.get(c.cluster), sem) for c in changes)
        )
    removed = False
    for c, o in zip(changes, outcomes, strict=True):
        for cmd in o.effects:
            ctx.effect(*cmd)
        s = schedules.get(c.cluster)
        woke = any(cmd[0] == "HDEL" for cmd in o.effects)
        if s is not None and s.removing and woke:
            ctx.effect("HDEL", hk.schedules, c.cluster)
            removed = True
    for cluster, s in schedules.items():  # removed while awake already: nothing to wake
        if s.removing and cluster not in records:
            ctx.effect("HDEL", hk.schedules, cluster)
            removed = True
    if removed:
        ctx.effect("INCR", hk.version)
    day = tick.scheduled_for.astimezone(UTC).strftime("%Y-%m-%d")
    figures = {"hibernated_instance_hours": hours, "savings_usd": usd}
    # Not an effect: the day's figures are in their own slot (schemas.metrics); once per tick.
    await add_figures(
        ctx.redis,
        ctx.keys,
        day=day,
        mark=tick.id,
        everyone={k: v for k, v in figures.items() if v > 0},
    )
    ctx.effect("SET", hk.last_tick, str(at_ms))
    if changes:
        await ctx.redis.xtrim(hk.audit, maxlen=AUDIT_MAXLEN, approximate=True)
        log.info("hibernation_tick", tick=tick.id, changes=len(changes), clusters=len(schedules))


CONCERN = Concern(
    group="hibernation",
    topics=("ticks",),
    handlers={HibernationTick: on_tick},
    # WORKLOADS §1: sequential. One tick at a time in a process; ticks are a minute apart.
    concurrency=1,
)
