"""Live task runners and their load: the registry ``/health`` and the submit path read.

Every task queue a runner process runs is one entry of the hash ``<p>:tasks:runners``:
``<consumer>@<queue>`` → JSON ``RunnerInfo``, rewritten every ``HEARTBEAT_S`` by the queue's
concern (``Concern.background``). An entry older than ``STALE_S`` is a dead runner's: readers
skip it and drop it.

**Load shedding**: ``LoadLimits`` holds a runner's ceilings (``MAX_CPU_PERCENT``,
``MAX_MEMORY_PERCENT`` of seed 003, from ``STREAMPROC_TASKS_MAX_CPU_PERCENT`` /
``STREAMPROC_TASKS_MAX_MEMORY_PERCENT``; 100 turns that figure off); ``LoadMonitor`` samples
the host every second (psutil: CPU busy since the last sample, memory in use) and averages the
last ``WINDOW`` samples, so a burst does not count: it says ``shedding`` once an average reaches
a ceiling, until both are back under it by ``HYSTERESIS`` points. A shedding runner starts
no new task: those it reads are deferred (``Defer``, no attempt used) for a runner with room;
tasks already running go on. When every live runner of a queue sheds, ``POST /v1/tasks``
answers 503 Retry-After.
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs in the lock (types-psutil)
import redis.asyncio as aioredis
import structlog

from streamproc.errors import ConfigError
from streamproc.keys import Keys

__all__ = (
    "HEARTBEAT_S",
    "SAMPLE_S",
    "STALE_S",
    "LoadLimits",
    "LoadMonitor",
    "RunnerInfo",
    "RunnerRegistry",
    "limits_from_env",
)

log = structlog.get_logger("streamproc.tasks")

HEARTBEAT_S = 2.0
SAMPLE_S = 1.0
STALE_S = 10.0
HYSTERESIS = 5.0
WINDOW = 5


@dataclass(kw_only=True)
class LoadLimits:
    """A runner's ceilings, in percent of the host (100: never shed on that figure). The
    engine's default sheds never; seed 003's figures are 90 and 85 (``consumers.tasks``)."""

    max_cpu_percent: float = 100.0
    max_memory_percent: float = 100.0

    def __post_init__(self) -> None:
        for name in ("max_cpu_percent", "max_memory_percent"):
            v = getattr(self, name)
            if not 0 < v <= 100:
                raise ConfigError(f"{name} must be in (0, 100], not {v!r}")


def limits_from_env(env: Mapping[str, str], default: LoadLimits | None = None) -> LoadLimits:
    base = default or LoadLimits()
    out: dict[str, float] = {
        "max_cpu_percent": base.max_cpu_percent,
        "max_memory_percent": base.max_memory_percent,
    }
    for name in ("max_cpu_percent", "max_memory_percent"):
        var = f"STREAMPROC_TASKS_{name.upper()}"
        if raw := env.get(var, "").strip():
            try:
                out[name] = float(raw)
            except ValueError:
                raise ConfigError(f"{var}={raw!r}: expected a number of percent") from None
    try:
        return LoadLimits(**out)
    except ConfigError as e:
        raise ConfigError(f"STREAMPROC_TASKS_*: {e}") from None


class LoadMonitor:
    """The host's CPU and memory against ``limits``; ``sample()`` once a second or so."""

    def __init__(self, limits: LoadLimits) -> None:
        self.limits = limits
        #: Averages of the last ``WINDOW`` samples.
        self.cpu_percent = 0.0
        self.memory_percent = 0.0
        self.shedding = False
        self._samples: deque[tuple[float, float]] = deque(maxlen=WINDOW)
        self._last = 0.0

    def sample(self) -> bool:
        """Take a sample (at most one per ``SAMPLE_S``; the first only starts the CPU
        measurement) and say whether to shed."""
        now = time.monotonic()
        if now - self._last < SAMPLE_S * 0.9:
            return self.shedding
        first, self._last = self._last == 0.0, now
        cpu = float(psutil.cpu_percent(interval=None))
        if first:
            return self.shedding
        self._samples.append((cpu, float(psutil.virtual_memory().percent)))
        self.cpu_percent = sum(c for c, _ in self._samples) / len(self._samples)
        self.memory_percent = sum(m for _, m in self._samples) / len(self._samples)
        lim = self.limits
        over = (lim.max_cpu_percent < 100 and self.cpu_percent >= lim.max_cpu_percent) or (
            lim.max_memory_percent < 100 and self.memory_percent >= lim.max_memory_percent
        )
        under = (
            self.cpu_percent < lim.max_cpu_percent - HYSTERESIS
            and self.memory_percent < lim.max_memory_percent - HYSTERESIS
        )
        if over and not self.shedding:
            log.warning("task_runner_shedding", cpu=self.cpu_percent, memory=self.memory_percent)
            self.shedding = True
        elif self.shedding and under:
            log.info("task_runner_resumed", cpu=self.cpu_percent, memory=self.memory_percent)
            self.shedding = False
        return self.shedding


class RunnerInfo(msgspec.Struct, kw_only=True):
    """One runner process's entry for one queue."""

    id: str
    queue: str
    host: str = ""
    pid: int = 0
    #: Tasks of this queue running in this process now.
    active: int = 0
    shedding: bool = False
    cpu_percent: float = 0.0
    memory_percent: float = 0.0
    started_at: float = 0.0
    seen_at: float = 0.0


class RunnerRegistry:
    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self.redis, self.keys = redis, keys
        self._decoder = msgspec.json.Decoder(RunnerInfo)

    async def beat(self, info: RunnerInfo) -> None:
        info.seen_at = time.time()
        await self.redis.hset(self.keys.task_runners(), info.id, msgspec.json.encode(info))

    async def leave(self, runner_id: str) -> None:
        await self.redis.hdel(self.keys.task_runners(), runner_id)

    async def list(self, queue: str | None = None) -> list[RunnerInfo]:
        """Live runners (of ``queue``), by id; dead runners' entries are dropped."""
        raw: Any = await self.redis.hgetall(self.keys.task_runners())
        now = time.time()
        live, dead = [], []
        for k, v in raw.items():
            try:
                info = self._decoder.decode(v)
            except msgspec.DecodeError:
                dead.append(k)
                continue
            if now - info.seen_at > STALE_S:
                dead.append(k)
            elif queue is None or info.queue == queue:
                live.append(info)
        if dead:
            await self.redis.hdel(self.keys.task_runners(), *dead)
        return sorted(live, key=lambda r: r.id)


def runner_info(consumer: str, queue: str) -> RunnerInfo:
    return RunnerInfo(
        id=f"{consumer}@{queue}",
        queue=queue,
        host=socket.gethostname(),
        pid=os.getpid(),
        started_at=time.time(),
    )
