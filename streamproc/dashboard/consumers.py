"""The dashboard's Consumers panel (``App(panels=[CONSUMERS_PANEL])``): every consumer
process heard from in the last hour, online ones first, offline ones with when they were last
seen — what ``streamproc consumers --all`` prints (``streamproc.presence``).

Read once per dashboard snapshot: TIME, one HGETALL and one ZRANGE (the records are bounded:
one per process and group, dropped after an hour of silence).
"""

from __future__ import annotations

import redis.asyncio as aioredis

from streamproc import presence
from streamproc.dashboard.panels import MAX_ROWS, Cell, Panel, PanelData
from streamproc.keys import Keys

__all__ = ("CONSUMERS_PANEL", "read_consumers")


async def read_consumers(client: aioredis.Redis, keys: Keys) -> PanelData:
    now_ms, procs = await presence.processes(client, keys)
    online = sum(p.online for p in procs)
    note = f"{online} online, {len(procs) - online} offline (heard from in the last hour)."
    body: list[list[Cell]] = [[*r] for r in presence.rows(now_ms, procs[:MAX_ROWS])]
    return PanelData(columns=list(presence.COLUMNS), rows=body, total=len(procs), note=note)


CONSUMERS_PANEL = Panel("consumers", "Consumers", read_consumers)
