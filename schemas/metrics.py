"""Agent metrics (``cluster.metrics``) and the daily figures the weekly report reads.

Agents post node/pod samples to ``POST /clusters/{id}/metrics``; the ``metrics`` concern
(``spot.optimizer_metrics``) folds them into daily figures. Every concern that records a
figure for the report names its key here, so the report's inputs are in one place:

| key | fields |
|---|---|
| ``<p>:{metrics:<YYYY-MM-DD>}:daily`` | the report's figures, all clusters (``FIGURES``) |
| ``<p>:{metrics:<YYYY-MM-DD>}:cluster:<cluster>`` | the same per cluster, plus sums |
| ``<p>:{metrics:<YYYY-MM-DD>}:pool-interruptions`` | ``<instance type>/<az>`` → interruptions |
| ``<p>:{metrics:<YYYY-MM-DD>}:counted:<mark>`` | string, EX: these figures were added |

Days are UTC; every hash expires ``DAILY_TTL_S`` after its last write.

**Redis Cluster.** A day's hashes are written by several concerns (cluster events, agent
metrics, hibernation ticks, optimizer runs), from topics whose slots differ, so they cannot be
a handler's ``ctx.effect`` (which must stay in its topic's slot). They share the hash tag
``{metrics:<day>}`` instead, and ``add_figures`` adds one event's (or run's) figures in one
script, once per ``mark`` (the event id): a mark key in the same slot, set with the
increments. This write is made by the handler, before the event's settle, not atomically with
it: a handler that fails after it and runs again adds nothing more (the mark), a copy of the
event published with the same id adds nothing more either. The marks are kept ``MARK_TTL_S``
(longer than the groups' 24 h dedup window).

Until 2026-12 the hashes were ``<p>:state:metrics:daily:<day>``,
``<p>:state:metrics:cluster:<cluster>:<day>`` and ``<p>:state:pool-interruptions:<day>``; on
one Redis, ``RENAME`` each of the last days' hashes to its new name to keep it in the report.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar

import msgspec
import redis.asyncio as aioredis

from schemas.cluster import key_by_cluster
from streamproc._lua import Lua
from streamproc.event import Event
from streamproc.keys import Keys

__all__ = (
    "DAILY_TTL_S",
    "FIGURES",
    "MARK_TTL_S",
    "MAX_SAMPLES",
    "TYPES",
    "ClusterMetrics",
    "MetricSample",
    "add_figures",
    "cluster_daily_key",
    "daily_key",
    "day_of",
    "pool_interruptions_key",
)

#: Daily hashes are kept this long (the report reads 7 days; a month for looking back).
DAILY_TTL_S = 35 * 86_400
#: How long ``add_figures`` remembers that a mark's figures were added.
MARK_TTL_S = 8 * 86_400
#: Samples in one ``cluster.metrics`` event (one request).
MAX_SAMPLES = 100

#: The report's figures and who records them: name → (label, unit).
FIGURES: dict[str, tuple[str, str]] = {
    "savings_usd": ("Savings (hibernation)", "USD"),
    "hibernated_instance_hours": ("Hibernated instance hours", "h"),
    "optimizer_savings_usd": ("Savings (optimizer, per day)", "USD"),
    "optimizer_runs": ("Optimizer runs", "runs"),
    "optimizer_opportunities": ("Spot opportunities found", "instances"),
    "spot_interruptions": ("Spot interruptions", "events"),
    "oom_kills": ("OOM kills", "events"),
    "agent_samples": ("Agent samples", "samples"),
    "node_hours": ("Node hours", "h"),
    "spot_node_hours": ("Spot node hours", "h"),
    "cpu_core_hours_requested": ("CPU core hours requested", "core h"),
    "cpu_core_hours_used": ("CPU core hours used", "core h"),
}

_Count = Annotated[int, msgspec.Meta(ge=0, le=1_000_000)]
_Cores = Annotated[float, msgspec.Meta(ge=0, le=10_000_000)]
_Bytes = Annotated[int, msgspec.Meta(ge=0, le=1 << 62)]


class MetricSample(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One look at a cluster: what it ran over the ``interval_s`` before ``at``."""

    at: Annotated[datetime, msgspec.Meta(tz=True)]
    interval_s: Annotated[int, msgspec.Meta(ge=1, le=3600)] = 60
    nodes: _Count
    spot_nodes: _Count = 0
    pods: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    pending_pods: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 0
    cpu_requested_cores: _Cores = 0.0
    cpu_used_cores: _Cores = 0.0
    memory_requested_bytes: _Bytes = 0
    memory_used_bytes: _Bytes = 0


class ClusterMetrics(Event, frozen=True, kw_only=True, tag="cluster.metrics"):
    """A batch of an agent's samples of one cluster."""

    topic: ClassVar[str] = "metrics"
    #: Enters only by ``POST /clusters/{id}/metrics``, which checks the cluster's scope and
    #: the samples' times; not by ``/v1/events``.
    external: ClassVar[bool] = False
    cluster_id: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    samples: Annotated[list[MetricSample], msgspec.Meta(min_length=1, max_length=MAX_SAMPLES)]

    def __post_init__(self) -> None:
        key_by_cluster(self)


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Any], ...] = (ClusterMetrics,)


def day_of(at: datetime) -> str:
    """The UTC day of a time, as the daily keys name it."""
    return f"{at.astimezone(UTC):%Y-%m-%d}"


def _tag(keys: Keys, day: str, name: str = "metrics") -> str:
    """The hash tag of one day's figures: ``<p>:{<name>:<day>}``."""
    return f"{keys.prefix}:{{{name}:{day}}}"


def daily_key(keys: Keys, day: str, name: str = "metrics") -> str:
    """The report's figures of one day (``consumers.renders`` reads it)."""
    return f"{_tag(keys, day, name)}:daily"


def cluster_daily_key(keys: Keys, cluster_id: str, day: str) -> str:
    return f"{_tag(keys, day)}:cluster:{cluster_id}"


def pool_interruptions_key(keys: Keys, day: str) -> str:
    return f"{_tag(keys, day)}:pool-interruptions"


def _mark_key(keys: Keys, day: str, mark: str) -> str:
    return f"{_tag(keys, day)}:counted:{mark}"


# KEYS[1] the mark, KEYS[2..] hashes. ARGV: hash TTL s, mark TTL s, then for each hash the
# number of its fields n and n field/increment pairs. Checks every key's type before the first
# write (a script error would leave the writes before it applied).
_ADD = Lua("""
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'none' then return 0 end
for k = 2, #KEYS do
  t = redis.call('TYPE', KEYS[k])['ok']
  if t ~= 'none' and t ~= 'hash' then return redis.error_reply('WRONGTYPE ' .. KEYS[k]) end
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[2])
local i = 3
for k = 2, #KEYS do
  local n = tonumber(ARGV[i])
  i = i + 1
  for _ = 1, n do
    if string.find(ARGV[i + 1], '[.eEn]') then
      redis.call('HINCRBYFLOAT', KEYS[k], ARGV[i], ARGV[i + 1])
    else
      redis.call('HINCRBY', KEYS[k], ARGV[i], ARGV[i + 1])
    end
    i = i + 2
  end
  redis.call('EXPIRE', KEYS[k], ARGV[1])
end
return 1
""")


async def add_figures(
    redis: aioredis.Redis,
    keys: Keys,
    *,
    day: str,
    mark: str,
    everyone: Mapping[str, int | float] | None = None,
    cluster: tuple[str, Mapping[str, int | float]] | None = None,
    pools: Mapping[str, int] | None = None,
) -> bool:
    """Add figures to ``day``'s hashes in one script, once per ``mark`` (an event id, or a
    run's id): ``everyone`` to the daily hash, ``cluster`` (id, figures) to that cluster's,
    ``pools`` (``<type>/<az>`` → count) to the interruptions per pool. False: this mark's
    figures were added before (nothing written)."""
    hashes: list[str] = []
    args: list[str | int] = [DAILY_TTL_S, MARK_TTL_S]
    for key, figures in (
        (daily_key(keys, day), everyone),
        (cluster_daily_key(keys, cluster[0], day) if cluster else "", cluster and cluster[1]),
        (pool_interruptions_key(keys, day), pools),
    ):
        if figures:
            hashes.append(key)
            args.append(len(figures))
            for field, value in figures.items():
                args += [field, value if isinstance(value, int) else repr(float(value))]
    if not hashes:
        return False
    return bool(await _ADD(redis, [_mark_key(keys, day, mark), *hashes], args))
