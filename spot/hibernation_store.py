"""Where hibernation keeps its state in Redis, and the audit stream.

All under ``<p>:{ticks}:state:`` (``hib:`` below):

| key | type | what |
|---|---|---|
| ``hib:hibernation:schedules`` | hash | cluster -> JSON ``Schedule`` |
| ``hib:hibernation:version`` | string | INCR on every schedule change (caches key on it) |
| ``hib:hibernation:asleep`` | hash | cluster -> JSON ``SleepRecord``: the sizes to restore |
| ``hib:hibernation:last_tick`` | string | scheduled time (epoch ms) of the newest tick done |
| ``hib:hibernation:lease`` | string, PX | the consumer handling a tick (its name) |
| ``hib:audit`` | stream | every action: who, what, cluster, asg, before, after, when, tick |
| ``<p>:{metrics:<YYYY-MM-DD>}:daily`` | hash | ``hibernated_instance_hours``, ``savings_usd`` |

Every key but the daily figures lives in the slot of the ``ticks`` topic (``topic_state``):
a tick's changes are effects applied with its ack, and the API's MULTI touches the same keys,
so both run on Redis Cluster. The ``ticks`` topic must therefore not be partitioned. The
savings go to the day's figures with ``schemas.metrics.add_figures`` (once per tick id).
Before 2026-12 these keys were ``<p>:state:hibernation:…`` and ``<p>:state:audit``: on one
Redis, ``RENAME`` them to their new names while no hibernation role runs.

A ``SleepRecord`` is written *before* an Auto Scaling group is scaled to 0 (with the sizes it
had, never overwritten by a later attempt that finds it at 0 already), and marked
``complete`` with the tick's ack once every group of the cluster is at 0. It is deleted with
the ack of the tick that restored every group.
"""

from __future__ import annotations

import getpass
from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from schemas.metrics import daily_key
from schemas.ticks import HibernationTick
from spot._schedule import Schedule
from streamproc.keys import Keys

__all__ = (
    "AUDIT_MAXLEN",
    "AsgSizes",
    "AuditEntry",
    "HibernationKeys",
    "ScheduleStore",
    "SleepRecord",
    "audit_fields",
    "cli_user",
    "read_audit",
)

#: The audit stream keeps about this many entries (XTRIM MAXLEN ~).
AUDIT_MAXLEN = 100_000


class AsgSizes(msgspec.Struct, frozen=True, kw_only=True):
    min: int
    max: int
    desired: int
    #: The type most of its instances had (for the savings), "" when unknown.
    instance_type: str = ""
    lifecycle: str = "on-demand"


class SleepRecord(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    region: str
    #: ASG name -> the sizes to restore.
    asgs: dict[str, AsgSizes]
    #: True once every group is at 0 (written with the ack of that tick).
    complete: bool = False
    #: Scheduled time (epoch ms) of the tick that put it to sleep.
    since_ms: int = 0
    tick: str = ""
    #: Instances asleep and what they cost an hour (computed once, at sleep time).
    instances: int = 0
    usd_per_hour: float = 0.0


class AuditEntry(msgspec.Struct, frozen=True, kw_only=True):
    at: str
    who: str
    #: sleep | wake | prewarm | failed | schedule_set | schedule_removed | remove_pending |
    #: schedule_forgotten
    action: str
    cluster: str
    asg: str = ""
    before: str = ""
    after: str = ""
    tick: str = ""
    detail: str = ""
    id: str = ""


class HibernationKeys:
    __slots__ = ("asleep", "audit", "keys", "last_tick", "lease", "schedules", "version")

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        topic = HibernationTick.topic
        self.schedules = keys.topic_state(topic, "hibernation", "schedules")
        self.version = keys.topic_state(topic, "hibernation", "version")
        self.asleep = keys.topic_state(topic, "hibernation", "asleep")
        self.last_tick = keys.topic_state(topic, "hibernation", "last_tick")
        self.lease = keys.topic_state(topic, "hibernation", "lease")
        self.audit = keys.topic_state(topic, "audit")

    def daily(self, day: str) -> str:
        """The weekly report's per-day metrics hash."""
        return daily_key(self.keys, day)


_SCHEDULE = msgspec.json.Decoder(Schedule)
_RECORD = msgspec.json.Decoder(SleepRecord)


def decode_record(raw: bytes) -> SleepRecord | None:
    try:
        return _RECORD.decode(raw)
    except msgspec.DecodeError:
        return None


def sizes_text(s: AsgSizes | None) -> str:
    return "" if s is None else f"min={s.min} max={s.max} desired={s.desired}"


def audit_fields(
    *,
    who: str,
    action: str,
    cluster: str,
    at: datetime,
    asg: str = "",
    before: str = "",
    after: str = "",
    tick: str = "",
    detail: str = "",
) -> list[str]:
    """The field/value list of one audit entry (a fixed field set: compact in the stream)."""
    return [
        "at",
        at.isoformat(timespec="seconds"),
        "who",
        who[:100],
        "action",
        action,
        "cluster",
        cluster,
        "asg",
        asg,
        "before",
        before,
        "after",
        after,
        "tick",
        tick,
        "detail",
        detail[:500],
    ]


def _pairs(fields: list[str]) -> dict[Any, Any]:
    return dict(zip(fields[::2], fields[1::2], strict=True))


def cli_user() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except Exception:  # no user name (a container without passwd entry)
        return "cli:unknown"


async def read_audit(
    client: aioredis.Redis, keys: Keys, *, cluster: str | None = None, count: int = 20
) -> list[AuditEntry]:
    """The newest ``count`` entries (of ``cluster`` only when given), newest first."""
    key = HibernationKeys(keys).audit
    out: list[AuditEntry] = []
    last = "+"
    while len(out) < count:
        batch: Any = await client.xrevrange(key, max=last, min="-", count=500)
        if not batch:
            break
        for entry_id, fields in batch:
            f = {k.decode(): v.decode(errors="replace") for k, v in fields.items()}
            if cluster is not None and f.get("cluster") != cluster:
                continue
            known = {k: f.get(k, "") for k in AuditEntry.__struct_fields__ if k != "id"}
            out.append(AuditEntry(**known, id=entry_id.decode()))
            if len(out) >= count:
                break
        last = "(" + batch[-1][0].decode()
        if len(batch) < 500:
            break
    return out


class ScheduleStore:
    """Schedules in Redis: set, get, list, remove (every change bumps the version)."""

    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client, self.k = client, HibernationKeys(keys)

    async def put(self, schedule: Schedule, *, who: str, detail: str = "") -> bool:
        """Add or replace; True when it is new. Audited."""
        async with self.client.pipeline(transaction=True) as p:
            p.hset(self.k.schedules, schedule.cluster, msgspec.json.encode(schedule))
            p.incr(self.k.version)
            p.xadd(
                self.k.audit,
                _pairs(
                    audit_fields(
                        who=who,
                        action="schedule_set",
                        cluster=schedule.cluster,
                        at=datetime.now(UTC),
                        detail=detail,
                    )
                ),
                maxlen=AUDIT_MAXLEN,
                approximate=True,
            )
            new, *_ = await p.execute()
        return bool(new)

    async def get(self, cluster: str) -> Schedule | None:
        raw: Any = await self.client.hget(self.k.schedules, cluster)
        return _SCHEDULE.decode(raw) if raw else None

    async def record(self, cluster: str) -> SleepRecord | None:
        raw: Any = await self.client.hget(self.k.asleep, cluster)
        return decode_record(raw) if raw else None

    async def all(self) -> list[Schedule]:
        raw: Any = await self.client.hgetall(self.k.schedules)
        out = []
        for v in raw.values():
            try:
                out.append(_SCHEDULE.decode(v))
            except msgspec.DecodeError:  # written by something else: skipped, never a crash
                continue
        return sorted(out, key=lambda s: s.cluster)

    async def asleep(self) -> dict[str, SleepRecord]:
        raw: Any = await self.client.hgetall(self.k.asleep)
        out = {}
        for k, v in raw.items():
            rec = decode_record(v)
            if rec is not None:
                out[k.decode()] = rec
        return out

    async def remove(self, cluster: str, *, who: str, forget: bool = False) -> str:
        """ "removed", "pending" (asleep: woken at the next tick, then removed), "forgotten"
        (asleep, and ``forget``: the schedule and the sizes to restore are dropped, nothing is
        woken: for node groups deleted while asleep) or "absent"."""
        schedule = await self.get(cluster)
        if schedule is None:
            return "absent"
        now = datetime.now(UTC)
        rec = await self.record(cluster)
        detail = ""
        if rec is not None and forget:
            gone, action, outcome = None, "schedule_forgotten", "forgotten"
            detail = "not restored: " + "; ".join(
                f"{k} {sizes_text(v)}" for k, v in sorted(rec.asgs.items())
            )
        elif rec is not None:
            gone = msgspec.structs.replace(schedule, removing=True, updated_by=who)
            action, outcome = "remove_pending", "pending"
        else:
            gone, action, outcome = None, "schedule_removed", "removed"
        fields = audit_fields(who=who, action=action, cluster=cluster, at=now, detail=detail)
        async with self.client.pipeline(transaction=True) as p:
            if gone is None:
                p.hdel(self.k.schedules, cluster)
            else:
                p.hset(self.k.schedules, cluster, msgspec.json.encode(gone))
            if outcome == "forgotten":
                p.hdel(self.k.asleep, cluster)
            p.incr(self.k.version)
            p.xadd(
                self.k.audit,
                _pairs(fields),
                maxlen=AUDIT_MAXLEN,
                approximate=True,
            )
            await p.execute()
        return outcome
