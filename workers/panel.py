"""The dashboard's Workers panel (``App(panels=[PANEL])``): every worker's status, last
metrics and alert state, alerting workers first, then by id.

Read once per dashboard snapshot (about every second while a page is open): ZCARD and ZRANGE
of the index, one HMGET of the two alert fields per worker (pipelined, at most ``SCAN_MAX``
workers, the oldest), then HGETALL of the ``MAX_ROWS`` shown.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from streamproc.dashboard.panels import MAX_ROWS, Panel, PanelData
from streamproc.keys import Keys
from workers.registry import Worker, WorkerStore

__all__ = ("COLUMNS", "PANEL", "SCAN_MAX", "read_workers")

#: Workers whose alert state is read to order the table; beyond them, by creation only.
SCAN_MAX = 10_000
_CHUNK = 1000
#: Characters of ``last_error`` shown (the record keeps 500).
ERROR_CHARS = 120

COLUMNS = [
    "id",
    "name",
    "status",
    "cpu %",
    "memory %",
    "alert",
    "last polled",
    "failures",
    "last error",
]


def _alerts(w: Worker) -> list[str]:
    return [m for m, s in (("cpu", w.alert_cpu), ("memory", w.alert_memory)) if s == "alert"]


def _row(w: Worker) -> list[str | float | int | None]:
    error = w.last_error
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS - 1] + "…"
    return [
        w.id,
        w.name,
        w.status,
        None if w.cpu is None else round(w.cpu, 1),
        None if w.memory is None else round(w.memory, 1),
        ", ".join(_alerts(w)) or "ok",
        w.last_polled_at or None,
        w.consecutive_failures,
        error or None,
    ]


async def _alerting(store: WorkerStore, ids: list[str]) -> set[str]:
    """The ids (of ``ids``) with an open cpu or memory alert."""
    out: set[str] = set()
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start : start + _CHUNK]
        pipe = store.client.pipeline(transaction=False)
        for i in chunk:
            pipe.hmget(store.k.record(i), ["alert_cpu", "alert_memory"])
        replies: list[Any] = await pipe.execute()
        out.update(i for i, r in zip(chunk, replies, strict=True) if b"alert" in r)
    return out


async def read_workers(client: aioredis.Redis, keys: Keys) -> PanelData:
    """The first ``MAX_ROWS`` workers, alerting first then by id, and how many there are."""
    store = WorkerStore(client, keys)
    total = await store.count()
    ids = await store.ids(count=SCAN_MAX)
    alerting = await _alerting(store, ids)
    shown = sorted(ids, key=lambda i: (i not in alerting, i))[:MAX_ROWS]
    workers = sorted(await store.many(shown), key=lambda w: (not _alerts(w), w.id))
    note = "Alerting workers first, then by id."
    if total > len(workers):
        note = f"The first {len(workers)} of {total}: alerting workers first, then by id."
    if total > SCAN_MAX:
        note += f" Alerts are looked for among the {SCAN_MAX:,} oldest workers."
    return PanelData(columns=COLUMNS, rows=[_row(w) for w in workers], total=total, note=note)


PANEL = Panel("workers", "Workers", read_workers)
