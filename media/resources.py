"""The ``resource-monitor`` concern: CPU, memory, load, disk and GPU figures of every host.

A ``tick.resource_monitor`` (every minute, topic ``ticks``) is handled by ONE consumer of the
group, but the figures are per host. So the work is split:

- Every ``consume`` process runs a sampler in the background (``ON_STARTUP``; off with
  ``STREAMPROC_RESOURCES_SAMPLER=false``) that samples its own host every ``interval_s``.
- The tick's handler samples the host of the consumer that got it: a host whose processes do
  not run the sampler is still sampled when it handles the tick, and a deployment without
  the hooks still gets figures.
- Several processes on one host sample it once per interval: a sample first takes the host's
  slot (``SET NX PX``, about one interval); who finds it taken skips (counted ``skipped``).

A per-host consumer group was the other way; it was not taken: group names would depend on
the host, and a group left behind by a host that is gone would hold back the trimming of
``ticks`` for ever.

A sample (``sample``): CPU percent since the previous sample of the process (psutil's
``cpu_times``; the first one measures 0.25 s), memory percent, the load averages and CPU
count, the usage of each configured disk path (one per filesystem; default ``/`` and the
temporary directory) and, when ``nvidia-smi`` is on the PATH, per GPU utilisation and memory
(``nvidia-smi --query-gpu=index,name,utilization.gpu,memory.used,memory.total
--format=csv,noheader,nounits``; absent, failing or too slow = no GPUs, logged).

Where it goes (``record``), with ``H`` = the host's name:

| key | type | what |
|---|---|---|
| ``<p>:state:{hosts}:H`` | hash, TTL 3 intervals | the latest figures (disks, gpus as JSON) |
| ``<p>:state:{hosts}:H:alerts`` | hash, TTL 1 day | open threshold episodes: metric → since |
| ``<p>:state:{hosts}:H:slot`` | string, PX ~1 interval | the host's sampling slot |
| ``<p>:state:{hosts}`` | zset | host → last sample (epoch ms); older than the TTL dropped |

and one ``host.resources`` event on the ``hosts`` stream (kept to ``events_maxlen``). The
three writes are one MULTI. Warnings: a metric above its threshold (``cpu``, ``memory``,
``disk:<path>``, ``gpu<i>:memory``) opens an episode and publishes one warning
``Notification`` (``cluster_id`` ""); below ``threshold - recovery_margin`` it closes with an
info one. No figure (a GPU that did not answer): no change. Notification ids are derived from
the tick (or the sample) so a tick handled again publishes nothing new.

Settings: ``STREAMPROC_RESOURCES_<FIELD>`` (``ResourceSettings``); ``configure_from_env``
reads them (the application's ``configure`` calls it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import msgspec
import psutil  # type: ignore[import-untyped]  # no stubs in the lock (types-psutil)
import redis.asyncio as aioredis
import structlog
from prometheus_client import Counter, Gauge

from media._background import background_loop
from schemas.hosts import DiskFigures, GpuFigures, HostResources
from schemas.notify import Notification, fit
from schemas.ticks import ResourceMonitorTick
from streamproc.app import AppContext
from streamproc.concern import Concern, Context
from streamproc.config import settings_from_env
from streamproc.connection import REDIS_DOWN
from streamproc.event import Event, derived_id, utcnow
from streamproc.keys import NAME_RE, Keys
from streamproc.producer import Producer
from streamproc.settings import RetryPolicy
from streamproc.trim import trim_stream

__all__ = (
    "CONCERN",
    "ON_SHUTDOWN",
    "ON_STARTUP",
    "Alert",
    "ResourceSettings",
    "alerts_key",
    "configure_from_env",
    "episodes",
    "gpus",
    "host_key",
    "host_name",
    "index_key",
    "parse_nvidia_smi",
    "record",
    "sample",
    "sample_host",
    "settings",
    "use_settings",
)

log = structlog.get_logger("media.resources")

_NS = uuid.UUID("8e2d4c71-3b5a-4f09-a6e8-0c9b7d1f2a63")
_STATE_KEY = "media.resources.sampler"
#: Open episodes are forgotten this long after the host's last sample.
ALERTS_TTL_S = 86_400
NVIDIA_QUERY = (
    "--query-gpu=index,name,utilization.gpu,memory.used,memory.total",
    "--format=csv,noheader,nounits",
)

SAMPLES = Counter(
    "streamproc_host_samples", "Host resource samples, by trigger and outcome", ["via", "outcome"]
)  # via: tick, sampler; outcome: ok, skipped, failed
ALERTS = Counter("streamproc_host_alerts", "Host threshold episodes", ["metric", "kind"])
FIGURES = Gauge("streamproc_host_resource_percent", "This host's latest figures", ["metric"])


class ResourceSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``STREAMPROC_RESOURCES_<FIELD>``."""

    #: Seconds between two samples of a host (the ``resource-monitor`` schedule: 1 min).
    interval_s: float = 60.0
    #: The host's hash lives this many intervals after its last sample.
    ttl_intervals: int = 3
    #: Run the background sampler in ``consume`` processes.
    sampler: bool = True
    #: This host's name in keys and events; empty = the host name (sanitised).
    host: str = ""
    #: Paths whose filesystems are reported; empty = ``/`` and the temporary directory.
    disk_paths: tuple[str, ...] = ()
    #: Percent; an episode opens above, closes below ``threshold - recovery_margin``.
    cpu_threshold: float = 90.0
    memory_threshold: float = 90.0
    disk_threshold: float = 90.0
    gpu_memory_threshold: float = 95.0
    recovery_margin: float = 5.0
    #: The ``nvidia-smi`` executable (looked up on the PATH); absent = no GPUs.
    nvidia_smi: str = "nvidia-smi"
    nvidia_smi_timeout_s: float = 5.0
    #: ``cluster_id`` of the notifications: "" reaches the '*' subscribers.
    alert_cluster_id: str = ""
    #: The ``hosts`` stream is kept to about this many entries.
    events_maxlen: int = 100_000

    def __post_init__(self) -> None:
        if not 1 <= self.interval_s <= 3600:
            raise ValueError("interval_s within 1..3600")
        if not 2 <= self.ttl_intervals <= 100:
            raise ValueError("ttl_intervals within 2..100")
        if self.host and not NAME_RE.fullmatch(self.host):
            raise ValueError("host: 1-63 letters, digits, '_', '.', '-'")
        for name in ("cpu_threshold", "memory_threshold", "disk_threshold", "gpu_memory_threshold"):
            if not 0 < getattr(self, name) <= 100:
                raise ValueError(f"{name} within 0 (excluded)..100")
        if not 0 <= self.recovery_margin < 100:
            raise ValueError("recovery_margin within 0..100 (excluded)")
        if not 0.1 <= self.nvidia_smi_timeout_s <= 60:
            raise ValueError("nvidia_smi_timeout_s within 0.1..60")
        if not 1_000 <= self.events_maxlen <= 100_000_000:
            raise ValueError("events_maxlen within 1000..100000000")
        if len(self.disk_paths) > 32 or not all(self.disk_paths):
            raise ValueError("disk_paths: at most 32 non-empty paths")
        if len(self.alert_cluster_id) > 256:
            raise ValueError("alert_cluster_id: at most 256 characters")

    @property
    def ttl_s(self) -> int:
        return max(1, round(self.interval_s * self.ttl_intervals))


_settings: ResourceSettings | None = None


def use_settings(s: ResourceSettings | None) -> None:
    """Use these settings from now on (None: the defaults)."""
    global _settings
    _settings = s


def settings() -> ResourceSettings:
    return _settings or ResourceSettings()


def configure_from_env(env: Mapping[str, str]) -> None:
    use_settings(settings_from_env(ResourceSettings, "STREAMPROC_RESOURCES_", env))


def host_name(s: ResourceSettings | None = None) -> str:
    """``host`` from the settings, else the machine's name as a key-safe name."""
    s = s or settings()
    if s.host:
        return s.host
    name = "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in socket.gethostname())
    return (name.strip("-_.") or "host")[:63]


# ---------------------------------------------------------------------- keys


def host_key(keys: Keys, host: str) -> str:
    """Hash: the host's latest figures (TTL ``ttl_intervals`` intervals)."""
    return keys.state("{hosts}", host)


def alerts_key(keys: Keys, host: str) -> str:
    """Hash: the host's open episodes, metric → ISO time opened."""
    return keys.state("{hosts}", host, "alerts")


def _slot_key(keys: Keys, host: str) -> str:
    return keys.state("{hosts}", host, "slot")


def index_key(keys: Keys) -> str:
    """Sorted set: host → its last sample (epoch ms)."""
    return keys.state("{hosts}")


# ---------------------------------------------------------------------- sampling


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:  # "[N/A]", "[Not Supported]", ""
        return None
    return value if value >= 0 else None


def parse_nvidia_smi(text: str) -> list[GpuFigures]:
    """GPUs from ``--format=csv,noheader,nounits`` output; lines that are not one are skipped.

    ``N/A`` figures are None; a name with commas is kept whole (the last three fields are the
    figures)."""
    out: list[GpuFigures] = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5 or not fields[0].isdigit():
            continue
        util, used, total = (_number(f) for f in fields[-3:])
        percent = None
        if used is not None and total:
            percent = round(min(100.0, used / total * 100), 2)
        out.append(
            GpuFigures(
                index=int(fields[0]),
                name=",".join(fields[1:-3]).strip()[:128],
                utilization=util,
                memory_used_mib=used,
                memory_total_mib=total,
                memory_percent=percent,
            )
        )
    return out


async def gpus(s: ResourceSettings | None = None) -> list[GpuFigures]:
    """Every GPU ``nvidia-smi`` lists; [] without it, or when it fails (logged)."""
    s = s or settings()
    exe = shutil.which(s.nvidia_smi)
    if exe is None:
        return []
    try:
        proc = await asyncio.create_subprocess_exec(
            exe,
            *NVIDIA_QUERY,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:
        log.warning("nvidia_smi_failed", error=str(e))
        return []
    try:
        async with asyncio.timeout(s.nvidia_smi_timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        log.warning("nvidia_smi_failed", error=f"no answer within {s.nvidia_smi_timeout_s:g} s")
        return []
    if proc.returncode != 0:
        log.warning(
            "nvidia_smi_failed",
            returncode=proc.returncode,
            error=err.decode(errors="replace")[:300],
        )
        return []
    return parse_nvidia_smi(out.decode(errors="replace"))


class _CpuMeter:
    """CPU busy percent between two readings of ``psutil.cpu_times`` (this process's own
    readings: psutil's ``cpu_percent(None)`` state is shared with any other caller)."""

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None

    @staticmethod
    def _read() -> tuple[float, float]:
        t = psutil.cpu_times()
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        idle = t.idle + getattr(t, "iowait", 0.0)
        return total, total - idle

    async def percent(self) -> float:
        if self._last is None:
            self._last = self._read()
            await asyncio.sleep(0.25)
        total, busy = self._read()
        d_total, d_busy = total - self._last[0], busy - self._last[1]
        self._last = (total, busy)
        if d_total <= 0:
            return 0.0
        return round(min(100.0, max(0.0, d_busy / d_total * 100)), 1)


_CPU = _CpuMeter()


def _disk_paths(s: ResourceSettings) -> tuple[str, ...]:
    return s.disk_paths or ("/", tempfile.gettempdir())


def _host_figures(paths: tuple[str, ...]) -> dict[str, Any]:
    """Memory, load and disks (blocking calls: run in a thread)."""
    disks: list[DiskFigures] = []
    devices: set[int] = set()
    for p in paths:
        try:
            dev = os.stat(p).st_dev
            if dev in devices:
                continue  # the same filesystem as a path before it
            usage = psutil.disk_usage(p)
        except OSError as e:
            log.warning("disk_path_unreadable", path=p, error=str(e))
            continue
        devices.add(dev)
        disks.append(
            DiskFigures(
                path=p, percent=usage.percent, used_bytes=usage.used, total_bytes=usage.total
            )
        )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0)
    return {
        "memory": psutil.virtual_memory().percent,
        "load1": round(load[0], 2),
        "load5": round(load[1], 2),
        "load15": round(load[2], 2),
        "cpus": psutil.cpu_count() or 0,
        "disks": disks,
    }


async def sample(s: ResourceSettings | None = None, *, cause_id: str = "") -> HostResources:
    """This host's figures now (no alerts yet: ``record`` adds them)."""
    s = s or settings()
    host = host_name(s)
    cpu, figures, found = await asyncio.gather(
        _CPU.percent(), asyncio.to_thread(_host_figures, _disk_paths(s)), gpus(s)
    )
    return HostResources(
        source="resource-monitor",
        key=host,
        host=host,
        cpu=cpu,
        gpus=found,
        sampled_at=utcnow(),
        cause_id=cause_id,
        **figures,
    )


# ---------------------------------------------------------------------- episodes


class Alert(NamedTuple):
    metric: str  # "cpu", "memory", "disk:<path>", "gpu<index>:memory"
    opened: bool  # True: an episode starts; False: it ends
    value: float
    threshold: float


def _watched(h: HostResources, s: ResourceSettings) -> dict[str, tuple[float | None, float]]:
    """metric → (value, threshold) for every figure with a threshold."""
    out: dict[str, tuple[float | None, float]] = {
        "cpu": (h.cpu, s.cpu_threshold),
        "memory": (h.memory, s.memory_threshold),
    }
    for d in h.disks:
        out[f"disk:{d.path}"] = (d.percent, s.disk_threshold)
    for g in h.gpus:
        out[f"gpu{g.index}:memory"] = (g.memory_percent, s.gpu_memory_threshold)
    return out


def episodes(
    open_: Mapping[str, str],
    watched: Mapping[str, tuple[float | None, float]],
    margin: float,
) -> list[Alert]:
    """The episodes a sample opens (above the threshold, none open) or closes (below
    ``threshold - margin``). A metric without a figure changes nothing."""
    out = []
    for metric, (value, threshold) in sorted(watched.items()):
        if value is None:
            continue
        if metric in open_:
            if value < threshold - margin:
                out.append(Alert(metric, False, value, threshold))
        elif value > threshold:
            out.append(Alert(metric, True, value, threshold))
    return out


def _label(metric: str) -> str:
    if metric == "cpu":
        return "CPU"
    if metric.startswith("disk:"):
        return f"disk {metric[5:]}"
    if metric.startswith("gpu"):
        return f"GPU {metric[3:].split(':')[0]} memory"
    return metric


def _notification(s: ResourceSettings, host: str, cause: str, a: Alert, since: str) -> Notification:
    label = _label(a.metric)
    kind = "alert" if a.opened else "recovery"
    if a.opened:
        title = f"host {host}: {label} {a.value:.1f}% above {a.threshold:g}%"
        body = f"Sampled at {since}; an info notification follows when it is back to normal."
    else:
        title = f"host {host}: {label} back to {a.value:.1f}%"
        body = f"Below {a.threshold - s.recovery_margin:g}% again (the alert opened at {since})."
    return fit(
        Notification(
            id=derived_id(cause, f"host/{host}/{a.metric}/{kind}", namespace=_NS),
            source="resource-monitor",
            key=host,
            cluster_id=s.alert_cluster_id,
            severity="warning" if a.opened else "info",
            title=title,
            body=body,
            cause_id=cause,
        )
    )


# ---------------------------------------------------------------------- recording


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


async def record(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    h: HostResources,
    s: ResourceSettings | None = None,
) -> list[Alert]:
    """Decide the episodes, publish ``host.resources`` and the notifications, then write the
    host's hash, its episodes and the index in one MULTI. The episodes it opened or closed."""
    s = s or settings()
    akey = alerts_key(keys, h.host)
    raw: Any = await client.hgetall(akey)
    open_ = {k.decode(): v.decode() for k, v in raw.items()}
    found = episodes(open_, _watched(h, s), s.recovery_margin)
    stamp = h.sampled_at.isoformat(timespec="seconds")
    still = dict(open_)
    for a in found:
        if a.opened:
            still[a.metric] = stamp
        else:
            still.pop(a.metric, None)
    h = msgspec.structs.replace(h, alerts=sorted(still))
    cause = h.cause_id or f"{h.host}@{int(h.sampled_at.timestamp() * 1000)}"
    h = msgspec.structs.replace(h, id=derived_id(cause, f"host/{h.host}", namespace=_NS))
    events: list[Event] = [h]
    events += [_notification(s, h.host, cause, a, open_.get(a.metric, stamp)) for a in found]
    await producer.publish_many(events)
    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=True)
    hkey = host_key(keys, h.host)
    pipe.delete(hkey)
    pipe.hset(
        hkey,
        mapping={
            "host": h.host,
            "cpu": h.cpu,
            "memory": h.memory,
            "load1": h.load1,
            "load5": h.load5,
            "load15": h.load15,
            "cpus": h.cpus,
            "disks": _json(h.disks),
            "gpus": _json(h.gpus),
            "alerts": ",".join(h.alerts),
            "sampled_at": stamp,
            "interval_s": f"{s.interval_s:g}",
            "cause_id": h.cause_id,
        },
    )
    pipe.expire(hkey, s.ttl_s)
    for a in found:
        if a.opened:
            pipe.hset(akey, a.metric, stamp)
        else:
            pipe.hdel(akey, a.metric)
    pipe.expire(akey, ALERTS_TTL_S)
    pipe.zadd(index_key(keys), {h.host: now_ms})
    pipe.zremrangebyscore(index_key(keys), "-inf", now_ms - s.ttl_s * 1000)
    await pipe.execute()
    for a in found:
        ALERTS.labels(a.metric, "opened" if a.opened else "closed").inc()
        (log.warning if a.opened else log.info)(
            "host_alert_opened" if a.opened else "host_alert_closed",
            host=h.host,
            metric=a.metric,
            value=a.value,
            threshold=a.threshold,
        )
    for metric, (value, _) in _watched(h, s).items():
        if value is not None:
            FIGURES.labels(metric).set(value)
    stream = keys.stream(HostResources.topic)
    try:  # nothing here reads `hosts`: the engine does not trim it
        await trim_stream(client, stream)
        await client.xtrim(stream, maxlen=s.events_maxlen, approximate=True)
    except REDIS_DOWN as e:
        log.warning("hosts_trim_failed", error=str(e))
    return found


async def sample_host(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    *,
    via: str,
    cause_id: str = "",
    s: ResourceSettings | None = None,
) -> HostResources | None:
    """Sample and record this host unless another process sampled it within the interval
    (then None)."""
    s = s or settings()
    host = host_name(s)
    slot_ms = max(1000, int(s.interval_s * 1000) - 2000)
    if not await client.set(_slot_key(keys, host), cause_id or "sampler", nx=True, px=slot_ms):
        SAMPLES.labels(via, "skipped").inc()
        log.debug("host_sample_skipped", host=host, via=via, reason="sampled within the interval")
        return None
    try:
        h = await sample(s, cause_id=cause_id)
        await record(client, keys, producer, h, s)
    except BaseException:
        SAMPLES.labels(via, "failed").inc()
        # The next try (a retried tick, the next interval) samples again.
        with contextlib.suppress(Exception):
            await client.delete(_slot_key(keys, host))
        raise
    SAMPLES.labels(via, "ok").inc()
    log.info(
        "host_sampled",
        host=host,
        via=via,
        cpu=h.cpu,
        memory=h.memory,
        disks=len(h.disks),
        gpus=len(h.gpus),
    )
    return h


# ---------------------------------------------------------------------- the concern


async def monitor(tick: ResourceMonitorTick, ctx: Context) -> None:
    """``tick.resource_monitor``: sample the host of this consumer (once per interval)."""
    await sample_host(ctx.redis, ctx.keys, ctx.producer, via="tick", cause_id=tick.id)


CONCERN = Concern(
    group="resource-monitor",
    topics=("ticks",),
    handlers={ResourceMonitorTick: monitor},
    concurrency=1,
    # A missed minute is not worth a backlog: the next tick samples anew.
    retry=RetryPolicy(max_retries=1, base_s=5.0, cap_s=10.0),
)


# ---------------------------------------------------------------------- the sampler


async def _sample(ctx: AppContext) -> None:
    await sample_host(ctx.redis, ctx.keys, ctx.producer, via="sampler", s=settings())


#: In ``consume`` processes: sample this host every interval in the background.
on_startup, on_shutdown = background_loop(
    _STATE_KEY,
    _sample,
    every_s=lambda: settings().interval_s,
    enabled=lambda: settings().sampler,
    failed="host_sample_failed",
)

ON_STARTUP = (on_startup,)
ON_SHUTDOWN = (on_shutdown,)
