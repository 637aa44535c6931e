"""Worker records in Redis, every key built here, every multi-key change one Lua script.

| key | type | what |
|---|---|---|
| ``<p>:state:{workers}:w:<id>`` | hash | the worker: its definition, status, telemetry, alerts |
| ``<p>:state:{workers}:index`` | zset | every worker id, scored by creation (epoch ms) |
| ``<p>:state:{workers}:by-instance`` | hash | ``<account>/<region>/<instance id>`` → worker id |
| ``<p>:state:{workers}:tombstones`` | zset | terminated ids → when (ms); pruned after 7 days |
| ``<p>:state:{workers}:poll-lease:<id>`` | string, PX | one poll of a worker at a time |
| ``<p>:state:{workers}:startup-lock`` | string, PX | one replica runs the startup discovery |

The hash tag ``{workers}`` keeps them in one slot so the scripts run on Redis Cluster.
The runtime schedule of a worker is the scheduler's (``worker.<id>``, ``streamproc.scheduler``).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any, Literal, cast

import msgspec
import redis.asyncio as aioredis

from schemas.workers import WorkerCreated, WorkerImported
from streamproc._lua import Lua
from streamproc.keys import Keys

__all__ = (
    "TOMBSTONE_S",
    "Outcome",
    "Worker",
    "WorkerKeys",
    "WorkerStore",
    "instance_key",
)

#: How long a terminated worker id is refused (a late or retried ``worker.created``).
TOMBSTONE_S = 7 * 86_400

Outcome = Literal["created", "updated", "unchanged", "exists", "tombstoned", "conflict", "taken"]


class WorkerKeys:
    __slots__ = ("by_instance", "index", "keys", "startup_lock", "tombstones")

    def __init__(self, keys: Keys) -> None:
        self.keys = keys
        self.index = keys.state("{workers}", "index")
        self.by_instance = keys.state("{workers}", "by-instance")
        self.tombstones = keys.state("{workers}", "tombstones")
        self.startup_lock = keys.state("{workers}", "startup-lock")

    def record(self, worker_id: str) -> str:
        return self.keys.state("{workers}", "w", worker_id)

    def poll_lease(self, worker_id: str) -> str:
        return self.keys.state("{workers}", "poll-lease", worker_id)


def instance_key(account_id: str, region: str, instance_id: str) -> str:
    return f"{account_id}/{region}/{instance_id}"


class Worker(msgspec.Struct, frozen=True, kw_only=True):
    """A worker record as read (every field of the hash, parsed)."""

    id: str
    name: str = ""
    instance_id: str
    region: str
    account_id: str = ""
    #: The worker's own thresholds (None = the settings' defaults at poll time).
    cpu_threshold: float | None = None
    memory_threshold: float | None = None
    #: The interval its schedule was added with (seconds).
    interval_s: int
    #: "created" or "imported".
    origin: str = "created"
    status: str = "unknown"
    status_changed_at: str = ""
    created_at: str = ""
    #: Averages over the last interval (None: no data, or not running).
    cpu: float | None = None
    memory: float | None = None
    #: The last poll that found the instance running with metrics.
    last_activity_at: str = ""
    last_polled_at: str = ""
    last_error: str = ""
    last_error_at: str = ""
    consecutive_failures: int = 0
    #: Per metric: "ok" or "alert" (an episode is open), and since when.
    alert_cpu: str = "ok"
    alert_cpu_since: str = ""
    alert_memory: str = "ok"
    alert_memory_since: str = ""

    def public(self) -> dict[str, Any]:
        return msgspec.structs.asdict(self)


_FLOATS = ("cpu_threshold", "memory_threshold", "cpu", "memory")
_INTS = ("interval_s", "consecutive_failures")


def _parse(raw: Mapping[bytes, bytes]) -> Worker | None:
    d: dict[str, Any] = {k.decode(): v.decode() for k, v in raw.items()}
    if "id" not in d:
        return None
    for f in _FLOATS:
        v = d.get(f)
        d[f] = float(v) if v else None
    for f in _INTS:
        v = d.get(f)
        d[f] = int(v) if v else 0
    try:
        return msgspec.convert(d, Worker)
    except msgspec.ValidationError:  # written by something else: unreadable, not a crash
        return None


def fields(w: Mapping[str, Any]) -> list[str]:
    """A flat HSET argument list; None is written as ""."""
    out: list[str] = []
    for k, v in w.items():
        out += [k, "" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))]
    return out


# KEYS: record, index, by-instance, tombstones. ARGV: id, now ms, prune-before ms, instance
# key, mode, n config pairs, config pairs..., initial pairs...
_REGISTER = Lua("""
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[4], ARGV[1]) then return 'tombstoned' end
local owner = redis.call('HGET', KEYS[3], ARGV[4])
if owner and owner ~= ARGV[1] then return 'taken' end
local n = tonumber(ARGV[6])
if redis.call('EXISTS', KEYS[1]) == 1 then
  local cur = redis.call('HMGET', KEYS[1], 'account_id', 'region', 'instance_id')
  if (cur[1] or '') .. '/' .. (cur[2] or '') .. '/' .. (cur[3] or '') ~= ARGV[4] then
    return 'conflict'
  end
  if ARGV[5] == 'imported' then return 'exists' end
  local changed = 0
  for i = 7, 6 + 2 * n, 2 do
    if redis.call('HGET', KEYS[1], ARGV[i]) ~= ARGV[i + 1] then
      redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
      changed = 1
    end
  end
  return changed == 1 and 'updated' or 'unchanged'
end
for i = 7, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[4], ARGV[1])
return 'created'
""")

# KEYS: record. ARGV: "ok" | "fail", pairs... Writes only when the worker still exists (a
# poll racing with its termination must not bring back part of it). Returns the failures.
_POLLED = Lua("""
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[1] == 'fail' then return redis.call('HINCRBY', KEYS[1], 'consecutive_failures', 1) end
redis.call('HSET', KEYS[1], 'consecutive_failures', 0)
return 0
""")

# KEYS: record, index, by-instance, tombstones, poll lease. ARGV: id, now ms, prune-before ms.
_TERMINATE = Lua("""
local existed = redis.call('EXISTS', KEYS[1])
if existed == 1 then
  local cur = redis.call('HMGET', KEYS[1], 'account_id', 'region', 'instance_id')
  local ik = (cur[1] or '') .. '/' .. (cur[2] or '') .. '/' .. (cur[3] or '')
  if redis.call('HGET', KEYS[3], ik) == ARGV[1] then redis.call('HDEL', KEYS[3], ik) end
end
redis.call('DEL', KEYS[1], KEYS[5])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', ARGV[3])
return existed
""")

_ACQUIRE = Lua("return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) and 1 or 0")
_RELEASE = Lua("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")


class WorkerStore:
    def __init__(self, client: aioredis.Redis, keys: Keys) -> None:
        self.client, self.k = client, WorkerKeys(keys)

    async def register(
        self, spec: WorkerCreated | WorkerImported, *, interval_s: int, now_ms: int, now_iso: str
    ) -> Outcome:
        """Add the worker, or (``worker.created`` of the same instance) update its name,
        thresholds and interval. Refused: a tombstoned id, an instance another worker has,
        an id that names another instance. ``imported`` never changes an existing worker."""
        config = {
            "name": spec.name,
            "cpu_threshold": spec.cpu_threshold,
            "memory_threshold": spec.memory_threshold,
            "interval_s": interval_s,
        }
        initial = {
            "id": spec.worker_id,
            "instance_id": spec.instance_id,
            "region": spec.region,
            "account_id": spec.account_id,
            "origin": "imported" if isinstance(spec, WorkerImported) else "created",
            "status": "unknown",
            "created_at": now_iso,
            "consecutive_failures": 0,
            "alert_cpu": "ok",
            "alert_memory": "ok",
        }
        c = fields(config)
        out = await _REGISTER(
            self.client,
            [self.k.record(spec.worker_id), self.k.index, self.k.by_instance, self.k.tombstones],
            [
                spec.worker_id,
                now_ms,
                now_ms - TOMBSTONE_S * 1000,
                instance_key(spec.account_id, spec.region, spec.instance_id),
                "imported" if isinstance(spec, WorkerImported) else "created",
                len(c) // 2,
                *c,
                *fields(initial),
            ],
        )
        outcome = out.decode() if isinstance(out, bytes) else str(out)
        return cast(Outcome, outcome)

    async def get(self, worker_id: str) -> Worker | None:
        raw: Any = await self.client.hgetall(self.k.record(worker_id))
        return _parse(raw) if raw else None

    async def polled(self, worker_id: str, ok: bool, values: Mapping[str, Any]) -> int:
        """Write one poll's outcome; the consecutive failures after it, -1 if it is gone."""
        return int(
            await _POLLED(
                self.client, [self.k.record(worker_id)], ["ok" if ok else "fail", *fields(values)]
            )
        )

    async def terminate(self, worker_id: str, *, now_ms: int) -> bool:
        """Forget the worker and tombstone its id; True when it existed."""
        return bool(
            await _TERMINATE(
                self.client,
                [
                    self.k.record(worker_id),
                    self.k.index,
                    self.k.by_instance,
                    self.k.tombstones,
                    self.k.poll_lease(worker_id),
                ],
                [worker_id, now_ms, now_ms - TOMBSTONE_S * 1000],
            )
        )

    async def owner(self, account_id: str, region: str, instance_id: str) -> str | None:
        """The worker monitoring this instance, if any."""
        raw: Any = await self.client.hget(
            self.k.by_instance, instance_key(account_id, region, instance_id)
        )
        return raw.decode() if raw else None

    async def tombstoned(self, worker_id: str, *, now_ms: int) -> bool:
        score: Any = await self.client.zscore(self.k.tombstones, worker_id)
        return score is not None and score > now_ms - TOMBSTONE_S * 1000

    async def ids(self, *, start: int = 0, count: int = 1000) -> list[str]:
        """Worker ids by creation, oldest first."""
        raw: Any = await self.client.zrange(self.k.index, start, start + count - 1)
        return [r.decode() for r in raw]

    async def count(self) -> int:
        return int(await self.client.zcard(self.k.index))

    async def many(self, ids: list[str]) -> list[Worker]:
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.hgetall(self.k.record(i))
        out = []
        for raw in await pipe.execute():
            w = _parse(raw) if raw else None
            if w is not None:
                out.append(w)
        return out

    async def lease(self, worker_id: str, ttl_ms: int) -> str | None:
        """Take the worker's poll lease; its token, or None when a poll holds it."""
        token = uuid.uuid4().hex
        got = await _ACQUIRE(self.client, [self.k.poll_lease(worker_id)], [token, ttl_ms])
        return token if got else None

    async def release(self, worker_id: str, token: str) -> None:
        await _RELEASE(self.client, [self.k.poll_lease(worker_id)], [token])

    async def startup_lock(self, ttl_ms: int) -> bool:
        """One replica's startup work: True for the first caller within ``ttl_ms``."""
        return bool(await _ACQUIRE(self.client, [self.k.startup_lock], [uuid.uuid4().hex, ttl_ms]))
