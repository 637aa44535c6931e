"""Per-host resource figures (issue 15 §8, seed 002's ``monitor_resources_task``).

``host.resources`` (topic ``hosts``) is published by ``media.resources`` once per sample of a
host: CPU, memory, load, the configured disks and every GPU ``nvidia-smi`` lists. Only the
application publishes it (``external = False``). Nothing in this repository reads the stream
(the dashboard reads the per-host hashes): the publisher keeps it to about
``STREAMPROC_RESOURCES_EVENTS_MAXLEN`` entries.
"""

from __future__ import annotations

from datetime import datetime
from typing import ClassVar

import msgspec

from streamproc.event import Event

__all__ = ("TYPES", "DiskFigures", "GpuFigures", "HostResources")


class DiskFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One filesystem, named by the configured path that is on it."""

    path: str
    percent: float
    used_bytes: int
    total_bytes: int


class GpuFigures(msgspec.Struct, frozen=True, kw_only=True):
    """One GPU as ``nvidia-smi --query-gpu`` reports it; None where it says N/A."""

    index: int
    name: str = ""
    utilization: float | None = None
    memory_used_mib: float | None = None
    memory_total_mib: float | None = None
    #: ``memory_used_mib / memory_total_mib`` in percent (None when either is unknown).
    memory_percent: float | None = None


class HostResources(Event, frozen=True, kw_only=True, tag="host.resources"):
    """One sample of a host (``key`` = the host name)."""

    topic: ClassVar[str] = "hosts"
    external: ClassVar[bool] = False
    host: str
    #: Percent of all CPUs busy since the previous sample of this process.
    cpu: float
    memory: float
    load1: float = 0.0
    load5: float = 0.0
    load15: float = 0.0
    cpus: int = 0
    disks: list[DiskFigures] = msgspec.field(default_factory=list)
    gpus: list[GpuFigures] = msgspec.field(default_factory=list)
    #: The threshold alerts open after this sample (``cpu``, ``memory``, ``disk:<path>``,
    #: ``gpu<index>:memory``).
    alerts: list[str] = msgspec.field(default_factory=list)
    sampled_at: datetime
    #: The tick that asked for it ("" for the per-process sampler's own samples).
    cause_id: str = ""


#: Every event type of this module (registered in ``schemas.REGISTRY``).
TYPES: tuple[type[Event], ...] = (HostResources,)
