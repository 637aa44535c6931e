"""The dashboard's Hosts panel (``App(panels=[PANEL])``): every host's latest resource figures
(``media.resources``), hosts with an open alert first, then by name.

Read once per dashboard snapshot: ZRANGEBYSCORE of the host index (hosts sampled within the
last hour, at most ``SCAN_MAX``), then one pipelined HGETALL per host. A host whose hash has
expired (no sample for ``ttl_intervals`` intervals) is not shown.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
import redis.asyncio as aioredis

from media.resources import host_key, index_key
from schemas.hosts import DiskFigures, GpuFigures
from streamproc.dashboard.panels import MAX_ROWS, Cell, Panel, PanelData
from streamproc.keys import Keys

__all__ = ("COLUMNS", "PANEL", "SCAN_MAX", "read_hosts")

#: Hosts read per snapshot (the most recently sampled).
SCAN_MAX = 1000
#: Hosts sampled longer ago are not looked up (their hashes have expired by then anyway).
WINDOW_S = 3600

COLUMNS = ["host", "cpu %", "mem %", "disk", "gpus", "updated", "alerts"]

_disks = msgspec.json.Decoder(list[DiskFigures])
_gpus = msgspec.json.Decoder(list[GpuFigures])


def _float(raw: bytes | None) -> float | None:
    try:
        return None if raw is None else round(float(raw), 1)
    except ValueError:
        return None


def _disk_cell(raw: bytes | None) -> str | None:
    try:
        disks = _disks.decode(raw) if raw else []
    except msgspec.DecodeError:
        return "?"
    return ", ".join(f"{d.path} {d.percent:.0f}%" for d in disks) or None


def _gpu_cell(raw: bytes | None) -> str:
    try:
        gpus = _gpus.decode(raw) if raw else []
    except msgspec.DecodeError:
        return "?"
    parts = []
    for g in gpus:
        util = "?" if g.utilization is None else f"{g.utilization:.0f}%"
        mem = "?" if g.memory_percent is None else f"{g.memory_percent:.0f}%"
        parts.append(f"{g.index}: {util} util, {mem} mem")
    return "; ".join(parts) or "none"


def _row(h: dict[bytes, bytes]) -> list[Cell]:
    def text(name: bytes) -> str:
        return h.get(name, b"").decode(errors="replace")

    return [
        text(b"host"),
        _float(h.get(b"cpu")),
        _float(h.get(b"memory")),
        _disk_cell(h.get(b"disks")),
        _gpu_cell(h.get(b"gpus")),
        text(b"sampled_at") or None,
        text(b"alerts").replace(",", ", ") or "ok",
    ]


async def read_hosts(client: aioredis.Redis, keys: Keys) -> PanelData:
    """The hosts with figures, alerting first then by name, and how many there are."""
    now_ms = int(time.time() * 1000)
    names: Any = await client.zrevrangebyscore(
        index_key(keys), "+inf", now_ms - WINDOW_S * 1000, start=0, num=SCAN_MAX
    )
    pipe = client.pipeline(transaction=False)
    for n in names:
        pipe.hgetall(host_key(keys, n.decode()))
    found: list[Any] = await pipe.execute() if names else []
    rows = [_row(h) for h in found if h]
    rows.sort(key=lambda r: (r[-1] == "ok", str(r[0])))
    note = "Hosts with an open alert first, then by name; disk: each configured filesystem."
    if len(rows) > MAX_ROWS:
        note = f"The first {MAX_ROWS} of {len(rows)}: " + note
    return PanelData(columns=COLUMNS, rows=rows[:MAX_ROWS], total=len(rows), note=note)


PANEL = Panel("hosts", "Hosts", read_hosts)
