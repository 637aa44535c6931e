"""The consumer runtime: one consumer of one group (one concern) in this process.

Data path, one task group::

    reader ──▶ work queue ──▶ N workers (handlers) ──▶ settle queue ──▶ settler (Lua, batched)
      ▲  own pending (0) · new (>) · reclaimed, one admit path        │ ack · dedup · effects
      └──────────── in-flight room (bounded) ◀─────────────────────────┘ | retry | DLQ

Beside it: the heartbeat (renew held entries, tick the group's clock, keep the consumer
name), in a task of its own; reclaim of what silent owners left and expiry of gone
consumers; the retry pump; the safe trimmer; the stats writer; on partitioned topics the
partition ownership steps (``_ownership``). Shutdown has two phases:
stop reading and drain within ``grace_s``, then cancel; entries cut off stay pending
without counting a delivery.
``process_once()`` runs one pump → read → reclaim → handle → settle step, for tests.

An ordered concern (``Concern(ordered=True)``) puts each entry read into its key's lane
(``_lanes``) between the read and the work queue: an entry waits until the one before it of
its key was handled, and settled when that settle may still make it a retry. With
``hold_on_retry``, each batch read is first checked against the group's hold hash (one
HMGET), and lanes whose key is held are parked in Redis by the park task (the PARK script)
instead of run; see ``_lanes`` for the whole design.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Collection, Mapping
from typing import Any

import anyio
import msgspec
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from streamproc import presence
from streamproc._aio import wait_event
from streamproc._lua import with_scripts
from streamproc.codec import Codec
from streamproc.concern import Concern, Scope
from streamproc.consumer._guard import GaveUp, RedisGuard, error_text, is_not_now
from streamproc.consumer._handle import Handlers
from streamproc.consumer._lanes import LaneKey, Lanes
from streamproc.consumer._ownership import ACTIVE, ADOPTING, Ownership
from streamproc.consumer._reader import Item, Reader
from streamproc.consumer._records import retry_record
from streamproc.consumer._scripts import (
    CLAIM_NAME,
    EXPIRE_CONSUMERS,
    PARK,
    PUMP,
    RELEASE_NAME,
    RENEW,
    UNCOUNT,
)
from streamproc.consumer._settler import AfterSettle, Settler
from streamproc.consumer.outcomes import Acked, Entry, Outcome, RetryLater, Settled
from streamproc.consumer.stats import LATENCY_BOUNDS_MS, ConsumerStats
from streamproc.errors import ConsumerNameTaken
from streamproc.keys import Keys
from streamproc.producer import Producer
from streamproc.settings import ConsumerSettings
from streamproc.trim import trim_stream

__all__ = ("Consumer",)

log = structlog.get_logger("streamproc.consumer")


class Consumer:
    """Runs one concern's handlers as one named consumer of its group."""

    def __init__(
        self,
        concern: Concern,
        *,
        client: aioredis.Redis,
        codec: Codec[Any],
        keys: Keys,
        producer: Producer,
        settings: ConsumerSettings | None = None,
        declared_groups: Mapping[str, Collection[str]] | None = None,
        after_settle: AfterSettle | None = None,
    ) -> None:
        base = settings or ConsumerSettings()
        self.settings = s = (
            ConsumerSettings.from_mapping({**msgspec.structs.asdict(base), **concern.settings})
            if concern.settings
            else base
        )
        self.concern, self.client, self.codec, self.keys = concern, client, codec, keys
        self.producer = producer
        self.group, self.name = concern.group, s.consumer
        self.stats = ConsumerStats()
        self._declared = {
            p: tuple(g) for t, g in (declared_groups or {}).items() for p in keys.partitions_of(t)
        }
        self._period_s = s.min_idle_ms / 3000  # renewals: three per min_idle
        self.guard = RedisGuard(
            group=self.group, consumer=self.name, settle_period_s=self._period_s
        )
        self.handlers = Handlers(
            concern, codec=codec, consumer=self.name, client=client, producer=producer, keys=keys
        )
        # every partition of a partitioned topic is a topic of its own here (Keys.partition)
        self._topics = keys.all_partitions(concern.topics)
        streams = {keys.stream(t): t for t in self._topics}
        streams.update({keys.retry_stream(t, self.group): t for t in self._topics})
        self.reader = Reader(
            client=client,
            keys=keys,
            group=self.group,
            name=self.name,
            settings=s,
            streams=streams,
            unhandled=self.handlers.unhandled,
            guard=self.guard,
            stats=self.stats,
        )
        # Partition ownership: the unpartitioned topics' streams are always read; of the
        # partitioned ones only those whose lease this consumer holds (``_ownership``).
        partitioned = [t for t in concern.topics if t in keys.partitions]
        self.ownership: Ownership | None = None
        self._always = set(streams)
        if s.own_partitions and partitioned:
            self.ownership = Ownership(
                client=client,
                keys=keys,
                group=self.group,
                partitions=keys.all_partitions(partitioned),
                ttl_ms=s.min_idle_ms,
                bound_s=max(s.grace_s, 3 * s.min_idle_ms / 1000),
                reader=self.reader,
            )
            self._always -= self.ownership.streams_of(self.ownership.partitions)
            self.reader.set_reading(self._always)
        self.settler = Settler(
            client=client,
            keys=keys,
            group=self.group,
            name=self.name,
            settings=s,
            policy=concern.retry,
            stats=self.stats,
            on_dead_letter=concern.on_dead_letter,
            after_settle=after_settle,
            release=self.reader.release,
            holds=concern.ordered and concern.hold_on_retry,
        )
        # Per-key order: the lanes, and whether retries hold their key (checked at each read).
        self._lanes = Lanes() if concern.ordered else None
        self._gated = concern.ordered and concern.hold_on_retry
        self._park_wakeup = asyncio.Event()
        self.guard.on_nogroup = self._on_nogroup
        self._token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self._claimed = False
        self._started_ms = int(time.time() * 1000)
        self._stopping = asyncio.Event()
        self._retry_wakeup = asyncio.Event()
        self._wake_at = 0.0  # monotonic time of the earliest retry this consumer scheduled
        # Entries waiting for a worker: a deque and a wake-up (an asyncio.Queue costs more
        # per item than the handler of a small event).
        self._work: deque[Entry] = deque()
        # Idle workers wait on a future each; a dispatch wakes one per entry, not all of them
        # (an Event woke every worker for every event at low rates).
        self._idle: deque[asyncio.Future[None]] = deque()
        # Outcomes waiting for the settler: a list and a wake-up (cheaper than a Queue per item).
        self._to_settle: deque[Outcome] = deque()
        self._settle_wakeup = asyncio.Event()

    # ------------------------------------------------------------------ state

    @property
    def ready(self) -> bool:
        """Redis answers every step and the groups exist."""
        return self.guard.ready

    @property
    def in_flight(self) -> int:
        """Entries read and not yet settled (at most ``max_in_flight``)."""
        return self.reader.in_flight

    def _on_nogroup(self) -> None:
        self.reader.groups_ok = False
        self.reader.recover_all()

    def _rename(self, name: str) -> None:
        self.name = self.reader.name = self.settler.name = self.handlers.consumer = name
        self.guard.consumer = name

    # ------------------------------------------------------------------ start and stop

    async def ensure_groups(self) -> None:
        """Create the group on every stream it reads (MKSTREAM); BUSYGROUP is success."""
        await self.reader.ensure_groups()

    async def claim_name(self) -> None:
        """Hold this consumer's name in the group while alive: a second live process with
        the same name would re-read this one's pending entries and run them twice."""
        ttl = self.settings.min_idle_ms
        base, n = self.settings.consumer, 1
        while True:
            name = base if n == 1 else f"{base}-{n}"
            key = self.keys.consumer_lease(self.group, name)
            if int(await CLAIM_NAME(self.client, [key], [self._token, ttl])):
                break
            if self.settings.name_taken == "refuse":
                raise ConsumerNameTaken(
                    f"consumer name {name!r} of group {self.group!r} is in use by another live "
                    "process; give each replica its own STREAMPROC_CONSUMER"
                )
            n += 1
        if name != self.name:
            log.warning("consumer_name_taken_using", group=self.group, wanted=base, name=name)
            self._rename(name)
        self._claimed = True

    async def _start(self) -> None:
        await self.ensure_groups()
        try:
            await self.claim_name()
        except ResponseError as e:
            if not is_not_now(e):
                raise
            # Redis refuses writes (OOM, a replica): start anyway, so what Redis still allows
            # (acks, trims) goes on; the name is claimed on a later renewal.
            log.warning("consumer_name_claim_deferred", group=self.group, error=error_text(e))
            return
        await self.balance()

    def stop(self) -> None:
        """Stop reading; ``run`` then drains in-flight work and returns."""
        self._stopping.set()

    async def run(self, *, started: asyncio.Event | None = None) -> None:
        """Run until ``stop()``; then drain in-flight work within grace_s and return."""
        try:
            await self.guard.until_up("start", self._start, give_up=self._stopping.is_set)
        except GaveUp:
            return
        log.info(
            "consumer_started",
            group=self.group,
            consumer=self.name,
            streams=list(self.reader.streams),
        )
        self._started_ms = int(time.time() * 1000)
        await self._report_presence()
        if started is not None:
            started.set()
        try:
            async with anyio.create_task_group() as tg:
                for _ in range(self.concern.concurrency):
                    tg.start_soon(self._worker)
                tg.start_soon(self._settler_loop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._reclaim_loop)
                tg.start_soon(self._retry_loop)
                if self.ownership is not None:
                    tg.start_soon(self._balance_loop)
                if self._lanes is not None:
                    tg.start_soon(self._park_loop)
                if self.settings.trim_interval_ms:
                    tg.start_soon(self._trim_loop)
                if self.settings.stats_interval_ms:
                    tg.start_soon(self._stats_loop)
                if self.concern.background is not None:
                    tg.start_soon(self._background_loop)
                await self._reader_loop()
                await self.reader.finish_reads()  # a cluster's per-slot reads still blocked
                if not await wait_event(self.reader.drained, self.settings.grace_s):
                    log.warning("grace_expired", in_flight=self.reader.in_flight)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(3):
                await self._finish()
            log.info(
                "consumer_stopped", group=self.group, consumer=self.name, **self.stats.as_dict()
            )

    async def _background_loop(self) -> None:
        """The concern's own background work (``Concern.background``), restarted on error."""
        assert self.concern.background is not None
        scope = Scope("", self.group, self.name, self.client, self.producer, self.keys)
        while True:
            try:
                await self.concern.background(scope)
                return
            except Exception:
                log.exception("concern_background_failed", group=self.group)
                await asyncio.sleep(1.0)

    async def _finish(self) -> None:
        """Give back the deliveries of cut-off entries and the name (best effort)."""
        try:
            for stream, held in self.reader.held.items():
                if held:
                    args: list[Any] = [self.group, self.name]
                    for e in held.values():
                        args += (e.entry_id, max(0, e.deliveries - 1))
                    await UNCOUNT(self.client, [stream], args)
            if self.ownership is not None:
                await self.ownership.leave(self.name)
            if self._claimed:
                key = self.keys.consumer_lease(self.group, self.name)
                await RELEASE_NAME(self.client, [key], [self._token])
                self._claimed = False
            await self.report_presence(stopped=True)
        except Exception as e:  # Redis down at shutdown: the entries are redelivered anyway
            log.warning("stop_cleanup_failed", group=self.group, error=str(e)[:300])

    # ------------------------------------------------------------------ single step

    async def process_once(self, *, block_ms: int | None = None) -> int:
        """Pump due retries, read one batch (own pending, new, then reclaimed), handle it
        and settle it. Returns the entries taken in."""
        if not self.reader.groups_ok:
            await self.ensure_groups()
        self.guard.up("start")
        await self.balance()
        await self.pump_retries()
        items = await self.reader.read(block_ms)
        try:
            for stream in self._reclaimable():
                items += await self.reader.reclaim(stream)
        except BaseException:  # what was taken before the failure is let go, not stranded
            self.reader.let_go([i if isinstance(i, Entry) else i.entry for i in items])
            raise
        sem = asyncio.Semaphore(self.concern.concurrency)

        async def run(item: Item) -> Outcome:
            if not isinstance(item, Entry):
                return item
            async with sem:
                return await self.handlers.run(item)

        if self._lanes is not None:
            await self._process_ordered(items, run)
            return len(items)
        outcomes = list(await asyncio.gather(*(run(i) for i in items)))
        if outcomes:
            await self.settler.settle(outcomes)
            self._note_retries(outcomes)
        return len(items)

    async def _process_ordered(self, items: list[Item], run: Any) -> None:
        """process_once's handle and settle steps for an ordered concern: rounds of the
        lanes' runnable entries, each settled before the next of its key runs."""
        holds = await self._holds(items)
        ready, outcomes = self._into_lanes(items, holds)
        while True:
            ready += await self._park()
            if not ready and not outcomes:
                return
            outcomes += await asyncio.gather(*(run(e) for e in ready))
            await self.settler.settle(outcomes)
            self._note_retries(outcomes)
            ready, outcomes = self._settled(outcomes), []

    # ------------------------------------------------------------------ upkeep steps

    async def renew(self) -> int:
        """Reset the idle time of the entries this consumer holds and still owns, and tick
        the group's clock. Returns how many were renewed; entries another consumer took
        meanwhile are counted in ``stats.lost`` (their settle is still safe)."""
        renewed = 0
        for stream, held in self.reader.held.items():
            ids = list(held)
            lost: list[bytes] = await RENEW(
                self.client,
                [stream, self.keys.upkeep(self.reader.streams[stream], self.group)],
                [self.group, self.name, self.settings.min_idle_ms // 2, *ids],
            )
            renewed += len(ids) - len(lost)
            if lost:
                self.stats.lost += len(lost)
                log.warning("entries_taken_over", stream=stream, count=len(lost))
        key = self.keys.consumer_lease(self.group, self.name)
        ttl = self.settings.min_idle_ms
        claimed = bool(int(await CLAIM_NAME(self.client, [key], [self._token, ttl])))
        if claimed and not self._claimed:
            log.info("consumer_name_claimed", group=self.group, consumer=self.name)
        elif not claimed:  # taken while we could not renew (a stall longer than min_idle)
            log.error("consumer_name_held_by_another", group=self.group, consumer=self.name)
        self._claimed = claimed
        return renewed

    async def balance(self) -> None:
        """Partition ownership (if on): renew this consumer's leases, take or give back
        partitions for a balanced share, and read only the partitions it owns."""
        own = self.ownership
        if own is None:
            return
        await own.step(self.name)
        self.reader.set_reading(self._always | own.streams_of(own.in_state(ACTIVE)))

    def _reclaimable(self) -> list[str]:
        """The streams whose abandoned entries this consumer takes over: those it reads,
        and those of partitions it is adopting."""
        own = self.ownership
        if own is None:
            return list(self.reader.streams)
        mine = self._always | own.streams_of(own.in_state(ACTIVE, ADOPTING))
        return [s for s in self.reader.streams if s in mine]

    async def expire_consumers(self) -> list[str]:
        """Remove consumers that own nothing and were idle longer than consumer_expiry_ms
        (check and delete in one script)."""
        removed: list[str] = []
        for stream in self.reader.streams:
            names = await EXPIRE_CONSUMERS(
                self.client, [stream], [self.group, self.name, self.settings.consumer_expiry_ms]
            )
            removed += [n.decode() for n in names]
        if removed:
            log.info("consumers_expired", consumers=sorted(set(removed)))
        return removed

    async def pump_retries(self) -> float:
        """Move due retries into this group's retry streams. Returns seconds until the next
        waiting retry is due (Redis' clock), at most 1."""
        wait_s = 1.0
        for topic in self._topics:
            moved, wait_ms = await PUMP(
                self.client,
                [
                    self.keys.delayed(topic, self.group),
                    self.keys.retry_stream(topic, self.group),
                    self.keys.dlq(topic, self.group),
                ],
                [1000],
            )
            if int(moved) >= 1000:
                wait_ms = 0
            if int(wait_ms) >= 0:
                wait_s = min(wait_s, int(wait_ms) / 1000)
        return wait_s

    def _note_retries(self, outcomes: list[Outcome]) -> None:
        from streamproc.consumer.outcomes import RetryLater

        for o in outcomes:
            if isinstance(o, RetryLater):
                at = time.monotonic() + o.delay_ms / 1000
                if not self._wake_at or at < self._wake_at:
                    self._wake_at = at
                    self._retry_wakeup.set()

    async def report_stats(self) -> None:
        """Write this consumer's ack-latency histogram (cumulative) to the group's hash."""
        body = msgspec.json.encode(
            {
                "at": int(time.time() * 1000),
                "bounds_ms": LATENCY_BOUNDS_MS,
                "counts": self.stats.latency_counts,
            }
        )
        key = self.keys.latency(self.group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, self.name, body)
            pipe.pexpire(key, 3_600_000)
            await pipe.execute()

    async def report_presence(self, *, stopped: bool = False) -> None:
        """Write this process's heartbeat record for this group (``streamproc.presence``)."""
        st = self.stats
        await presence.beat(
            self.client,
            self.keys,
            presence.Record(
                process=presence.process_id(),
                name=self.name,
                host=socket.gethostname(),
                pid=os.getpid(),
                group=self.group,
                started_ms=self._started_ms,
                in_flight=self.in_flight,
                processed=st.acked + st.empty + st.skipped,
                failed=st.retried + st.dead_lettered,
                version=presence.version(),
                heartbeat_ms=int(self._period_s * 1000),
                stopped=stopped,
            ),
        )

    async def _report_presence(self) -> None:
        try:
            await self.report_presence()
        except Exception as e:  # a figure for operators: never worth stopping for
            log.debug("presence_report_failed", error=str(e))

    # ------------------------------------------------------------------ loops

    def _dispatch(self, items: list[Item], holds: Mapping[LaneKey, bytes] | None = None) -> None:
        work, settle = self._work, self._to_settle
        if self._lanes is not None:
            ready, done = self._into_lanes(items, holds or {})
            work += ready
            settle += done
        else:
            for item in items:
                if isinstance(item, Entry):
                    work.append(item)
                else:
                    settle.append(item)
        self._wake_workers()
        if settle:
            self._settle_wakeup.set()

    def _wake_workers(self) -> None:
        wake = len(self._work)
        idle = self._idle
        while wake and idle:
            waiter = idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
                wake -= 1

    # ------------------------------------------------------------------ per-key order

    async def _take(self, fetch: Awaitable[list[Item]]) -> tuple[list[Item], dict[LaneKey, bytes]]:
        """A read or reclaim, and (ordered, holding on retry) the holds of its keys."""
        items = await fetch
        return items, await self._holds(items)

    async def _holds(self, items: list[Item]) -> dict[LaneKey, bytes]:
        """The hold hash's values for the keys of these entries (one HMGET per topic). If
        Redis fails, the entries are let go (re-read later), as a failed read's are."""
        if not self._gated:
            return {}
        by_topic: dict[str, dict[bytes, None]] = {}
        for i in items:
            if isinstance(i, Entry) and (k := i.fields.get(b"key")):
                by_topic.setdefault(i.topic, {})[k] = None
        if not by_topic:
            return {}
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for topic, ks in by_topic.items():
                    pipe.hmget(self.keys.hold(topic, self.group), list(ks))
                replies: list[Any] = await pipe.execute()
        except BaseException:
            self.reader.let_go([i if isinstance(i, Entry) else i.entry for i in items])
            raise
        out: dict[LaneKey, bytes] = {}
        for (topic, ks), values in zip(by_topic.items(), replies, strict=True):
            for k, v in zip(ks, values, strict=True):
                if v is not None:
                    out[(topic, k)] = v
        return out

    def _into_lanes(
        self, items: list[Item], holds: Mapping[LaneKey, bytes]
    ) -> tuple[list[Entry], list[Outcome]]:
        """Entries that may run now, and outcomes to settle; the rest wait in their lanes."""
        assert self._lanes is not None
        ready: list[Entry] = []
        done: list[Outcome] = []
        for item in items:
            if isinstance(item, Entry):
                if (run := self._lanes.add(item, holds)) is not None:
                    ready.append(run)
            else:
                done.append(item)
        if self._lanes.to_park:
            self._park_wakeup.set()
        return ready, done

    def _settled(self, outcomes: list[Outcome]) -> list[Entry]:
        """After a settle: the next entry of each lane whose entry was settled may run (or,
        after a retry that holds its key, the lane's queue is parked first)."""
        lanes = self._lanes
        if lanes is None:
            return []
        ready: list[Entry] = []
        for o in outcomes:
            # An Acked the settler turned into a failure (refused effects) stays PENDING here.
            retried = self._gated and (isinstance(o, RetryLater) or o.status is Settled.PENDING)
            if (run := lanes.settled(o.entry, retried)) is not None:
                ready.append(run)
        if lanes.to_park:
            self._park_wakeup.set()
        return ready

    async def _park(self) -> list[Entry]:
        """Park the queues of blocked lanes behind their key's head (one PARK per lane, one
        pipeline). Returns the entries that may run now (their key was free, or they head it)."""
        lanes = self._lanes
        if lanes is None:
            return []
        todo = lanes.parking()
        if not todo:
            return []

        async def send() -> list[Any]:
            async with self.client.pipeline(transaction=False) as pipe:
                for (topic, ek), batch in todo:
                    streams: dict[str, int] = {}
                    args: list[Any] = [self.group, ek]
                    for e in batch:
                        idx = streams.setdefault(e.stream, len(streams) + 3)
                        rec = retry_record(RetryLater(e, counts=False))
                        args += (idx, e.entry_id, e.origin, rec)
                    hold = self.keys.hold(topic, self.group)
                    parked = self.keys.parked(topic, self.group, ek)
                    PARK.queue(pipe, [hold, parked, *streams], args)
                return list(await pipe.execute())

        try:
            replies = await with_scripts(self.client, (PARK,), send)
        except BaseException:
            lanes.retry_parking([k for k, _ in todo])
            raise
        ready: list[Entry] = []
        gone: list[Entry] = []
        for (k, batch), reply in zip(todo, replies, strict=True):
            codes = [int(c) for c in reply]
            self.stats.parked += codes.count(1)
            left, run = lanes.parked(k, batch, codes)
            gone += left
            if run is not None:
                ready.append(run)
        if gone:
            log.info("parked_behind_retry", entries=len(gone))
            self.reader.release(gone)
        return ready

    async def _park_loop(self) -> None:
        """Park what the lanes ask for, whenever they ask."""
        while True:
            await self._park_wakeup.wait()
            self._park_wakeup.clear()
            ready = await self.guard.until_up("park", self._park)
            if ready:
                self._work += ready
                self._wake_workers()
            if self._lanes is not None and self._lanes.to_park:  # queued behind a head meanwhile
                self._park_wakeup.set()

    async def _reader_loop(self) -> None:
        """Read until stopping. A blocked read is never cancelled: it ends with its BLOCK."""
        while not self._stopping.is_set():
            if self.reader.free() <= 0:  # full: wait for room (or stop) without polling
                await self._until_stopping(self.reader.wait_for_room())
                if self._stopping.is_set():
                    return
            try:
                items, holds = await self.guard.until_up(
                    "read",
                    lambda: self._take(self.reader.read(self.settings.block_ms)),
                    give_up=self._stopping.is_set,
                )
            except GaveUp:
                return
            self._dispatch(items, holds)

    async def _until_stopping(self, waiting: Any) -> None:
        task = asyncio.ensure_future(waiting)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([task, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (task, stop):
                t.cancel()

    async def _worker(self) -> None:
        while True:
            if not self._work:
                waiter = asyncio.get_running_loop().create_future()
                self._idle.append(waiter)
                try:
                    await waiter
                finally:  # cancelled while idle: not idle any more
                    if not waiter.done():
                        waiter.cancel()
                continue
            entry = self._work.popleft()
            outcome = await self.handlers.run(entry)
            self._to_settle.append(outcome)
            self._settle_wakeup.set()
            lanes = self._lanes
            if lanes is not None and self._final(outcome) and (nxt := lanes.handled(entry)):
                self._work.append(nxt)  # this worker takes it next

    def _final(self, o: Outcome) -> bool:
        """Can its settle not turn it into a retry? Then the next of its key may run now."""
        if type(o) is Acked:
            return not o.effects
        return not isinstance(o, RetryLater) or not self._gated

    async def _settler_loop(self) -> None:
        while True:
            await self._settle_wakeup.wait()
            pending = self._to_settle
            batch = [pending.popleft() for _ in range(min(len(pending), 1000))]
            if not pending:
                self._settle_wakeup.clear()
            if not batch:
                continue
            # Shielded: a settle under way finishes even when shutdown cancels the rest. If
            # Redis is down while stopping it gives up: the entries stay pending, and their
            # redelivery is recognised by dedup.
            with anyio.CancelScope(shield=True):
                try:
                    await self.guard.until_up(
                        "settle",
                        lambda: self.settler.settle(batch),  # noqa: B023
                        give_up=self._stopping.is_set,
                    )
                except GaveUp:
                    log.warning("settle_abandoned_at_stop", entries=len(batch))
                    continue
            self._note_retries(batch)
            if self._lanes is not None and (ready := self._settled(batch)):
                self._work += ready
                self._wake_workers()

    async def _heartbeat_loop(self) -> None:
        """Every renewal period: renew held entries, tick the group clock, keep the name.

        A task of its own, so nothing else (a reclaim, an expiry, a settle in backoff) can
        delay it; retried at its own pace after an outage, never slower: an owner asleep in
        a long backoff would lose its entries once Redis is back."""
        while True:
            await anyio.sleep(self._period_s * random.uniform(0.9, 1.0))
            await self.guard.until_up("renew", self.renew, cap_s=self._period_s / 2)
            await self._report_presence()

    async def _balance_loop(self) -> None:
        """Partition ownership steps: every renewal period, at most a second apart (so a
        consumer that joins gets its share within seconds, whatever ``min_idle_ms``)."""
        period_s = min(self._period_s, 1.0)
        while True:
            await anyio.sleep(period_s * random.uniform(0.9, 1.0))
            await self.guard.until_up("balance", self.balance, cap_s=period_s / 2)

    async def _reclaim_loop(self) -> None:
        """Every renewal period: reclaim what owners stopped renewing; now and then expire
        consumers that are gone."""
        rounds = 0
        while True:
            await anyio.sleep(self._period_s * random.uniform(0.9, 1.0))
            rounds += 1
            if not self._stopping.is_set() and self.guard.may_reclaim():
                for stream in self._reclaimable():
                    try:  # one try per round: a failure lets go of what it took
                        items, holds = await self.guard.until_up(
                            "reclaim",
                            lambda s=stream: self._take(self.reader.reclaim(s)),  # type: ignore[misc]
                            once=True,
                        )
                    except GaveUp:
                        break
                    self._dispatch(items, holds)
            if rounds % 30 == 0:
                with contextlib.suppress(GaveUp):  # tried again in 30 rounds
                    await self.guard.until_up("expire", self.expire_consumers, once=True)

    async def _retry_loop(self) -> None:
        """Pump due retries when the next is due (Redis' clock), and at least every second."""
        while True:
            wait_s = await self.guard.until_up("pump", self.pump_retries)
            if self._wake_at:
                wait_s = min(wait_s, max(0.0, self._wake_at - time.monotonic()))
            await wait_event(self._retry_wakeup, wait_s)
            if self._retry_wakeup.is_set() or (self._wake_at and self._wake_at <= time.monotonic()):
                self._retry_wakeup.clear()
                self._wake_at = 0.0

    async def _trim_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.trim_interval_ms / 1000 * random.uniform(0.8, 1.2))
            for stream, topic in self.reader.streams.items():
                declared = (self.group,) if ":retry:" in stream else self._declared.get(topic, ())
                await self.guard.until_up(
                    "trim",
                    lambda s=stream, d=declared: trim_stream(  # type: ignore[misc]
                        self.client, s, hard_maxlen=self.settings.hard_maxlen, declared_groups=d
                    ),
                )

    async def _stats_loop(self) -> None:
        while True:
            await anyio.sleep(self.settings.stats_interval_ms / 1000)
            try:
                await self.report_stats()
            except Exception as e:  # a figure for the dashboard: never worth stopping for
                log.debug("stats_report_failed", error=str(e))
