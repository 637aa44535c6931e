"""Startup auto-discovery: tagged EC2 instances become ``worker.imported`` events.

Searched: the base credentials' account in ``STREAMPROC_WORKERS_DISCOVER_REGIONS`` (default
``STREAMPROC_AWS_REGION``) and every registered account (``streamproc accounts``) in its
regions, with DescribeInstances filtered on the tag key ``STREAMPROC_WORKERS_DISCOVER_TAG``
and the non-terminated states. An instance no worker monitors yet, whose id (the imported
worker's id) is not tombstoned, is published as ``worker.imported`` with an id derived from
the instance id and launch time: discovery run twice (two replicas, a restart) imports once.

``on_startup`` runs it, with the schedule resync, in the background of the first ``consume``
process to take ``<p>:state:{workers}:startup-lock`` (``SET NX PX 60 s``; not released, so
replicas starting within the minute skip it); ``streamproc workers discover`` runs it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
import structlog

from schemas.workers import WorkerImported
from spot.aws import AccountStore
from streamproc._backoff import Backoff
from streamproc.app import AppContext
from streamproc.breaker import BreakerOpen
from streamproc.event import derived_id, utcnow
from streamproc.keys import Keys
from streamproc.outbound import CallPermanent, CallTransient
from streamproc.producer import Producer
from workers import _aws, jobs
from workers._runtime import Runtime, runtime
from workers.registry import WorkerStore

__all__ = ("Discovered", "discover", "on_shutdown", "on_startup", "resync")

log = structlog.get_logger("workers.discover")

_NS = uuid.UUID("a3f81c0e-52d4-4b9e-8e17-3c6b0d2f9a45")
_STATE_KEY = "workers.startup"
#: The startup lock's lifetime.
LOCK_MS = 60_000
#: Transient failures of the startup discovery are tried again this many times.
STARTUP_ATTEMPTS = 6


@dataclass
class Discovered:
    found: int = 0
    imported: int = 0
    #: Already monitored, or tombstoned.
    known: int = 0
    #: "<account or self>/<region>: error" per place that failed.
    errors: list[str] = field(default_factory=list)
    transient: bool = False


async def discover(
    client: aioredis.Redis, keys: Keys, producer: Producer, rt: Runtime | None = None
) -> Discovered:
    rt = rt or runtime()
    out = Discovered()
    places = [("", r) for r in rt.discover_regions()]
    places += [(a.id, r) for a in await AccountStore(client, keys).all() for r in a.regions]
    store = WorkerStore(client, keys)
    now_ms = int(utcnow().timestamp() * 1000)
    tag = rt.settings.discover_tag
    for account_id, region in places:
        try:
            found = await rt.aws.call(
                client,
                keys,
                account_id,
                "ec2",
                region,
                lambda c: _aws.tagged_instances(c, tag),
            )
        except (CallTransient, BreakerOpen, CallPermanent) as e:
            out.errors.append(f"{account_id or 'self'}/{region}: {str(e)[:300]}")
            out.transient = out.transient or not isinstance(e, CallPermanent)
            log.warning(
                "worker_discovery_failed", account=account_id or "self", region=region, error=str(e)
            )
            continue
        events = []
        for i in found:
            out.found += 1
            if await store.owner(account_id, region, i.instance_id) or await store.tombstoned(
                i.instance_id, now_ms=now_ms
            ):
                out.known += 1
                continue
            events.append(
                WorkerImported(
                    id=derived_id(
                        f"{i.instance_id}@{i.launch_time}", "worker/imported", namespace=_NS
                    ),
                    source="workers-discover",
                    key=i.instance_id,
                    worker_id=i.instance_id,
                    name="".join(ch for ch in i.name if ch.isprintable())[:200],
                    instance_id=i.instance_id,
                    region=region,
                    account_id=account_id,
                )
            )
        for first in range(0, len(events), 500):
            await producer.append(events[first : first + 500])
        out.imported += len(events)
        log.info(
            "workers_discovered",
            account=account_id or "self",
            region=region,
            found=len(found),
            imported=len(events),
        )
    return out


async def resync(client: aioredis.Redis, keys: Keys, rt: Runtime | None = None) -> int:
    """Add the job of every registered worker (idempotent: an unchanged one keeps its next
    time): workers registered while monitoring was disabled, or a job lost. Jobs added."""
    store = WorkerStore(client, keys)
    added, start = 0, 0
    while batch := await store.ids(start=start, count=500):
        for w in await store.many(batch):
            added += await jobs.start(client, keys, w.id, w.interval_s)
        start += len(batch)
    return added


async def _startup(ctx: AppContext, rt: Runtime) -> None:
    if not await WorkerStore(ctx.redis, ctx.keys).startup_lock(LOCK_MS):
        log.info("workers_startup_skipped", reason="another replica runs it")
        return
    added = await resync(ctx.redis, ctx.keys, rt)
    log.info("workers_resynced", jobs_added=added)
    if not rt.settings.discover_on_start:
        return
    backoff = Backoff(base_s=2.0, cap_s=30.0)
    for _ in range(STARTUP_ATTEMPTS):
        result = await discover(ctx.redis, ctx.keys, ctx.producer, rt)
        if not result.transient:
            return
        await backoff.sleep()  # the AWS endpoint may come up after us (make run's moto)
    log.warning("workers_discovery_gave_up", attempts=STARTUP_ATTEMPTS)


async def on_startup(ctx: AppContext) -> None:
    """In ``consume`` processes, when monitoring is enabled: resync and discover in the
    background (the consumers start meanwhile)."""
    rt = runtime()
    if ctx.role != "consume" or not rt.settings.enabled:
        return

    async def run() -> None:
        try:
            await _startup(ctx, rt)
        except Exception:  # never takes the process down: discovery runs again next start
            log.exception("workers_startup_failed")

    ctx.state[_STATE_KEY] = asyncio.create_task(run(), name="workers-startup")


async def on_shutdown(ctx: AppContext) -> None:
    task = ctx.state.pop(_STATE_KEY, None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
