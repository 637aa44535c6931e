"""The ``qa-cleanup`` concern: on ``tick.cleanup_qa`` (daily 03:00), remove what finished
sessions left once they are older than ``retention_days`` (7).

For each session in ``<p>:state:{qa}:sessions`` that finished before the cut-off, oldest first:
its screenshots in S3 (every object under ``<s3_prefix>/<session id>/``, listed and deleted in
batches of 1,000), then in one MULTI its state hash, its screenshots hash and its index entry.
A session whose objects cannot be deleted (S3 down: the breaker ``s3:qa:<bucket>``) keeps its
index entry, so the next run — or the tick's retry — tries again. At most ``BATCH`` sessions
per run; the rest wait for the next day. Ticket records and staged screenshots expire by TTL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis
import structlog

from qa import _keys
from qa.screenshots import delete_session_objects, s3_breaker
from qa.settings import settings
from schemas.ticks import QaCleanupTick
from streamproc.concern import Concern, Context
from streamproc.keys import Keys
from streamproc.settings import RetryPolicy

__all__ = ("CONCERN", "QaCleanupResult", "clean")

log = structlog.get_logger("qa.cleanup")

#: Sessions cleaned in one run at most.
BATCH = 1_000
_DAY_MS = 86_400_000


@dataclass
class QaCleanupResult:
    sessions: int = 0
    objects: int = 0


async def clean(
    client: aioredis.Redis, keys: Keys, *, now_ms: int | None = None
) -> QaCleanupResult:
    s = settings()
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    cutoff = now_ms - int(s.retention_days * _DAY_MS)
    raw: list[bytes] = await client.zrangebyscore(  # type: ignore[assignment]
        _keys.sessions(keys), "-inf", cutoff, start=0, num=BATCH
    )
    out = QaCleanupResult()
    breaker = s3_breaker(client, keys, s) if s.s3_bucket else None
    for member in raw:
        session_id = member.decode()
        if breaker is not None:
            out.objects += await delete_session_objects(breaker, s, session_id)
        async with client.pipeline(transaction=True) as pipe:
            pipe.delete(_keys.session(keys, session_id), _keys.screenshots(keys, session_id))
            pipe.zrem(_keys.sessions(keys), session_id)
            await pipe.execute()
        out.sessions += 1
    log.info("qa_cleanup_done", sessions=out.sessions, objects=out.objects, cutoff_ms=cutoff)
    return out


async def run(tick: QaCleanupTick, ctx: Context) -> None:
    await clean(ctx.redis, ctx.keys)


CONCERN = Concern(
    group="qa-cleanup",
    topics=("ticks",),
    handlers={QaCleanupTick: run},
    concurrency=1,
    retry=RetryPolicy(max_retries=3, base_s=30.0, cap_s=300.0),
)
