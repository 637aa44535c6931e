"""The consumer runtime: one consumer of one group (one concern) in this process.

Data path (one task each, in one task group)::

    reader ──▶ work queue ──▶ N workers (handlers) ──▶ settle queue ──▶ settler (Lua, batched)
      ▲  XREADGROUP (own pending first, then '>')                          │ XACK + dedup mark
      └──────────── in-flight slots (bounded) ◀────────────────────────────┘ | retry | DLQ

Beside it: a heartbeat that renews the idle time of every entry this consumer holds (so a slow
handler is never reclaimed), a reclaimer that XAUTOCLAIMs entries whose owner stopped renewing,
a retry pump that moves due retries to the group's retry stream, and the safe trimmer.
``process_once()`` runs one read → handle → settle step, for tests.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import msgspec
import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from streamproc._aio import wait_event
from streamproc._backoff import Backoff, backoff_delay_s
from streamproc._lua import with_scripts
from streamproc._scripts import FAIL as _FAIL
from streamproc._scripts import PUMP as _PUMP
from streamproc._scripts import SUCCEED as _SUCCEED
from streamproc.codec import Codec
from streamproc.concern import Concern, Context, Handler
from streamproc.connection import REDIS_DOWN
from streamproc.errors import DecodeError, Permanent, Retry
from streamproc.keys import Keys
from streamproc.logs import EVENT_CONTEXT
from streamproc.producer import Producer
from streamproc.settings import ConsumerSettings
from streamproc.trim import trim_stream

__all__ = ("Consumer", "ConsumerStats")

log = structlog.get_logger("streamproc.consumer")

_SETTLE_SCRIPTS = (_SUCCEED, _FAIL)
_NO_DEFAULT: Any = object()

_ACK, _DUP, _EMPTY, _SKIP, _RETRY, _DLQ = "ack", "duplicate", "empty", "skip", "retry", "dlq"


#: Upper bounds (seconds) of the ack-latency histogram buckets; the last bucket is +Inf.
LATENCY_BUCKETS_S = (
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
_LATENCY_BOUNDS_MS = tuple(b * 1000 for b in LATENCY_BUCKETS_S)


class ConsumerStats:
    """Counters since start (exported as metrics, asserted on in tests).

    ``latency_counts[i]`` counts acked events whose time from XADD (the entry id's
    milliseconds, Redis' clock) to their ack was at most ``LATENCY_BUCKETS_S[i]`` and above
    the bucket before; the last slot is above every bound. ``latency_sum_s`` is their sum.
    """

    __slots__ = (
        "acked",
        "dead_lettered",
        "duplicates",
        "empty",
        "latency_counts",
        "latency_sum_s",
        "read",
        "reclaimed",
        "retried",
        "skipped",
    )

    def __init__(self) -> None:
        self.read = self.acked = self.duplicates = self.retried = self.dead_lettered = 0
        self.reclaimed = self.empty = self.skipped = 0
        self.latency_counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0

    def as_dict(self) -> dict[str, int]:
        return {
            name: getattr(self, name)
            for name in self.__slots__
            if name not in ("latency_counts", "latency_sum_s")
        }

    def observe_ack(self, entry_id: bytes, now_ms: float) -> None:
        """Record publish-to-ack latency from the entry id's time (no clock of our own)."""
        latency_ms = max(0.0, now_ms - int(entry_id[: entry_id.index(b"-")]))
        self.latency_counts[bisect.bisect_left(_LATENCY_BOUNDS_MS, latency_ms)] += 1
        self.latency_sum_s += latency_ms / 1000


class _Entry:
    __slots__ = ("attempt", "deliveries", "entry_id", "fields", "origin", "stream", "topic")

    def __init__(
        self, stream: str, topic: str, entry_id: bytes, fields: Mapping[bytes, bytes] | None
    ) -> None:
        self.stream, self.topic, self.entry_id = stream, topic, entry_id
        self.fields: Mapping[bytes, bytes] = fields or {}
        self.deliveries = 1
        attempt = self.fields.get(b"attempt")
        self.attempt = int(attempt) if attempt and attempt.isdigit() else 0
        self.origin = self.fields.get(b"origin", entry_id)


class _Outcome:
    __slots__ = (
        "detail",
        "due_ms",
        "effects",
        "entry",
        "error_type",
        "event_id",
        "kind",
        "reason",
    )

    def __init__(
        self,
        entry: _Entry,
        kind: str,
        *,
        event_id: bytes = b"",
        effects: list[tuple[Any, ...]] | None = None,
        due_ms: int = 0,
        reason: str = "",
        error_type: str = "",
        detail: str = "",
    ) -> None:
        self.entry, self.kind, self.event_id, self.reason = entry, kind, event_id, reason
        self.effects = effects or []
        self.due_ms, self.error_type, self.detail = due_ms, error_type, detail


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
        self.ready = False  # Redis reachable and groups exist
        self._handlers: dict[bytes, Handler] = {
            t.type_name().encode(): h for t, h in concern.handlers.items()
        }
        self._unhandled = {
            n.encode() for n in codec.registry.names() if n.encode() not in self._handlers
        }
        # stream key -> topic; topic streams first, then this group's retry streams
        self._streams: dict[str, str] = {keys.stream(t): t for t in concern.topics}
        self._streams.update({keys.retry_stream(t, self.group): t for t in concern.topics})
        self._recovering = dict.fromkeys(self._streams, b"0")  # own pending, read first
        self._reserved = 0  # in-flight room promised to a read under way
        self._room = asyncio.Event()  # set while in-flight room is left
        self._room.set()
        self._held: dict[str, set[bytes]] = {k: set() for k in self._streams}  # in flight
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._stopping = asyncio.Event()
        self._retry_wakeup = asyncio.Event()
        self._next_local_due_ms = 0
        self._work: asyncio.Queue[_Entry] = asyncio.Queue()
        self._settle_q: asyncio.Queue[_Outcome] = asyncio.Queue()
        self._reading = False
        self._groups_ok = False
        self._down_since: float | None = None

    @property
    def in_flight(self) -> int:
        """Entries read and not yet settled (at most ``max_in_flight``)."""
        return self._in_flight

    # ------------------------------------------------------------------ groups

    async def ensure_groups(self) -> None:
        """Create the group on every stream it reads (MKSTREAM); BUSYGROUP is success."""
        for stream in self._streams:
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self._groups_ok = True

    # ------------------------------------------------------------------ reading

    async def _read(self, count: int, block_ms: int | None) -> list[_Entry]:
        """Own pending entries first (after a restart), then new ones."""
        if not self._groups_ok:
            await self.ensure_groups()
        while self._recovering:
            stream, cursor = next(iter(self._recovering.items()))
            reply: Any = await self.client.xreadgroup(
                self.group, self.name, {stream: cursor}, count=count
            )
            got: list[tuple[bytes, dict[bytes, bytes]]] = reply[0][1] if reply else []
            if not got:
                del self._recovering[stream]
                continue
            self._recovering[stream] = got[-1][0]
            held = self._held[stream]  # already being worked on here: not twice
            entries = [_Entry(stream, self._streams[stream], i, f) for i, f in got if i not in held]
            if entries:
                await self._load_deliveries(stream, entries)
                return entries
        self._reading = True
        try:
            reply = await self.client.xreadgroup(
                self.group,
                self.name,
                dict.fromkeys(self._streams, ">"),
                count=count,
                block=block_ms,
            )
        finally:
            self._reading = False
        out: list[_Entry] = []
        for stream_name, entries_read in reply or ():
            key = stream_name.decode()
            out += [_Entry(key, self._streams[key], i, f) for i, f in entries_read]
        return out

    async def _load_deliveries(self, stream: str, entries: list[_Entry]) -> None:
        """Delivery counts of entries that were delivered before (recovered or claimed)."""
        if not entries:
            return
        rows = await self.client.xpending_range(
            stream,
            self.group,
            min=entries[0].entry_id,
            max=entries[-1].entry_id,
            count=len(entries) + 10,
            consumername=self.name,
        )
        counts = {r["message_id"]: int(r["times_delivered"]) for r in rows}
        for e in entries:
            e.deliveries = counts.get(e.entry_id, e.deliveries)

    def _triage(self, entries: list[_Entry], seen: list[bool]) -> list[_Entry | _Outcome]:
        """Decide what needs no handler: trimmed payloads, poison, duplicates, other types."""
        out: list[_Entry | _Outcome] = []
        for entry, was_seen in zip(entries, seen, strict=True):
            if not entry.fields:
                out.append(_Outcome(entry, _EMPTY))
            elif entry.deliveries > self.settings.max_deliveries:
                out.append(
                    _Outcome(
                        entry,
                        _DLQ,
                        reason="poison",
                        error_type="Poison",
                        detail=f"delivered {entry.deliveries} times, over "
                        f"max_deliveries={self.settings.max_deliveries}",
                    )
                )
            elif was_seen:
                out.append(_Outcome(entry, _DUP))
            elif entry.fields.get(b"type") in self._unhandled:
                out.append(_Outcome(entry, _SKIP))
            else:
                out.append(entry)
        return out

    async def _seen(self, entries: list[_Entry]) -> list[bool]:
        """Which entries' event ids this group already applied (one MGET per topic)."""
        if not self.settings.dedup_window_ms:
            return [False] * len(entries)
        flags = [False] * len(entries)
        by_topic: dict[str, list[int]] = {}
        for i, e in enumerate(entries):
            if e.fields.get(b"id"):
                by_topic.setdefault(e.topic, []).append(i)
        for topic, idx in by_topic.items():
            prefix = self.keys.seen_prefix(topic, self.group).encode()
            marks = await self.client.mget([prefix + entries[i].fields[b"id"] for i in idx])
            for i, mark in zip(idx, marks, strict=True):
                flags[i] = mark is not None
        return flags

    def _per_stream(self, streams: int) -> int:
        """Entries to ask each stream for so one read stays within ``max_in_flight``."""
        free = self.settings.max_in_flight - self._in_flight - self._reserved
        if free <= 0:
            return 0
        # XREADGROUP's COUNT is per stream. When nearly full, reading one entry from each
        # stream can pass the bound by at most ``streams - 1`` entries.
        return min(self.settings.batch, max(1, free // streams))

    async def _wait_for_room(self) -> None:
        while self.settings.max_in_flight - self._in_flight - self._reserved <= 0:
            self._room.clear()
            await self._room.wait()

    def _hold(self, entries: list[_Entry]) -> None:
        for e in entries:
            self._held[e.stream].add(e.entry_id)
        self._in_flight += len(entries)
        if self._in_flight:
            self._drained.clear()

    def _unhold(self, entries: list[_Entry]) -> None:
        for e in entries:
            self._held[e.stream].discard(e.entry_id)
        self._in_flight -= len(entries)
        self._room.set()
        if self._in_flight == 0:
            self._drained.set()

    async def _fetch(self, block_ms: int | None) -> list[_Entry | _Outcome]:
        """Read what the in-flight bound allows and triage it."""
        per = self._per_stream(len(self._streams))
        if not per:
            return []
        promised = per * len(self._streams)
        self._reserved += promised
        try:
            entries = await self._read(per, block_ms)
        finally:
            self._reserved -= promised
        if not entries:
            return []
        self._hold(entries)
        self.stats.read += len(entries)
        try:
            seen = await self._seen(entries)
        except BaseException:
            # They stay pending in Redis: forget them here and re-read our pending list.
            self._unhold(entries)
            self._recovering = dict.fromkeys(self._streams, b"0")
            raise
        return self._triage(entries, seen)

    # ------------------------------------------------------------------ handling

    async def _handle(self, entry: _Entry) -> _Outcome:
        try:
            event = self.codec.decode(entry.fields)
        except DecodeError as e:
            log.error(
                "undecodable_entry",
                topic=entry.topic,
                entry_id=entry.entry_id.decode(),
                reason=e.reason,
                detail=e.detail[:500],
            )
            return _Outcome(entry, _DLQ, reason=e.reason, error_type="DecodeError", detail=e.detail)
        handler = self._handlers[entry.fields[b"type"]]
        ctx = Context(
            topic=entry.topic,
            group=self.group,
            consumer=self.name,
            entry_id=entry.entry_id.decode(),
            attempt=entry.attempt,
            deliveries=entry.deliveries,
            redis=self.client,
            producer=self.producer,
            keys=self.keys,
        )
        # One context variable set per event (cheaper than binding six structlog contextvars);
        # streamproc.logs merges it into every log line written while the handler runs.
        token = EVENT_CONTEXT.set(
            (entry.topic, self.group, ctx.entry_id, event.id, entry.deliveries, entry.attempt)
        )
        try:
            await handler(event, ctx)
        except Permanent as e:
            return self._dead(entry, "permanent", e)
        except Retry as e:
            return self._retry(entry, e, e.delay_s)
        except Exception as e:
            if isinstance(e, self.concern.permanent_errors):
                return self._dead(entry, "permanent", e)
            return self._retry(entry, e, None)
        finally:
            EVENT_CONTEXT.reset(token)
        return _Outcome(entry, _ACK, event_id=event.id.encode(), effects=ctx._effects)

    def _dead(self, entry: _Entry, reason: str, exc: BaseException) -> _Outcome:
        log.error("dead_lettered", reason=reason, error_type=type(exc).__name__, error=str(exc))
        return _Outcome(
            entry, _DLQ, reason=reason, error_type=type(exc).__name__, detail=str(exc)[:2000]
        )

    def _retry(self, entry: _Entry, exc: BaseException, delay_s: float | None) -> _Outcome:
        policy = self.concern.retry
        attempt = entry.attempt + 1
        if attempt > policy.max_retries:
            return self._dead(entry, "retries_exhausted", exc)
        if delay_s is None:
            delay_s = backoff_delay_s(attempt, policy.base_s, policy.cap_s)
        due_ms = int((time.time() + max(delay_s, 0.0)) * 1000)
        log.warning(
            "retry_scheduled",
            attempt=attempt,
            delay_s=round(delay_s, 3),
            error_type=type(exc).__name__,
            error=str(exc)[:500],
        )
        return _Outcome(
            entry, _RETRY, due_ms=due_ms, error_type=type(exc).__name__, detail=str(exc)[:2000]
        )

    # ------------------------------------------------------------------ settling

    async def _settle(self, outcomes: list[_Outcome]) -> None:
        """Apply outcomes to Redis: one SUCCEED script per stream, one FAIL per failure."""
        await with_scripts(self.client, _SETTLE_SCRIPTS, lambda: self._send_settle(outcomes))
        self._count(outcomes)
        self._unhold([o.entry for o in outcomes])

    async def _send_settle(self, outcomes: list[_Outcome]) -> None:
        ok: dict[str, tuple[list[Any], list[Any]]] = {}  # stream -> (keys, args)
        async with self.client.pipeline(transaction=False) as pipe:
            for o in outcomes:
                e = o.entry
                if o.kind in (_ACK, _DUP, _EMPTY, _SKIP):
                    keys, args = ok.setdefault(
                        e.stream, ([e.stream], [self.group, self.settings.dedup_window_ms])
                    )
                    seen = 0
                    if o.kind == _ACK and self.settings.dedup_window_ms and o.event_id:
                        keys.append(
                            self.keys.seen_prefix(e.topic, self.group).encode() + o.event_id
                        )
                        seen = len(keys)
                    args += (e.entry_id, seen, len(o.effects))
                    for cmd in o.effects:
                        args += (len(cmd), *cmd)
                elif o.kind == _RETRY:
                    _FAIL.queue(
                        pipe,
                        [e.stream, self.keys.delayed(e.topic, self.group)],
                        [self.group, e.entry_id, "retry", o.due_ms, self._retry_member(o)],
                    )
                else:
                    _FAIL.queue(
                        pipe,
                        [e.stream, self.keys.dlq(e.topic, self.group)],
                        [self.group, e.entry_id, "dlq", *self._dead_fields(o)],
                    )
            for keys, args in ok.values():
                _SUCCEED.queue(pipe, keys, args)
            await pipe.execute()

    def _count(self, outcomes: list[_Outcome]) -> None:
        st = self.stats
        now_ms = time.time() * 1000
        for o in outcomes:
            if o.kind == _ACK:
                st.acked += 1
                st.observe_ack(o.entry.entry_id, now_ms)
            elif o.kind == _DUP:
                st.duplicates += 1
            elif o.kind == _EMPTY:
                st.empty += 1
            elif o.kind == _SKIP:
                st.skipped += 1
            elif o.kind == _RETRY:
                st.retried += 1
                self._note_local_due(o.due_ms)
            else:
                st.dead_lettered += 1

    def _retry_member(self, o: _Outcome) -> bytes:
        e = o.entry
        flat: list[str] = []
        for k, v in e.fields.items():
            if k not in (b"attempt", b"origin"):
                flat += (k.decode(), v.decode())
        flat += ("attempt", str(e.attempt + 1), "origin", e.origin.decode())
        return orjson.dumps(flat)

    def _dead_fields(self, o: _Outcome) -> list[Any]:
        e = o.entry
        meta: list[Any] = [
            "dlq_reason",
            o.reason,
            "dlq_error_type",
            o.error_type,
            "dlq_error",
            o.detail,
            "dlq_attempts",
            e.attempt + 1,
            "dlq_deliveries",
            e.deliveries,
            "dlq_consumer",
            self.name,
            "dlq_group",
            self.group,
            "dlq_topic",
            e.topic,
            "dlq_entry_id",
            e.entry_id,
            "dlq_origin_id",
            e.origin,
            "dlq_at",
            datetime.now(UTC).isoformat(timespec="milliseconds"),
        ]
        for k, v in e.fields.items():
            if not k.startswith(b"dlq_"):
                meta += (k, v)
        return meta

    # ------------------------------------------------------------------ single step

    async def process_once(self, *, block_ms: int | None = None) -> int:
        """Pump due retries, read one batch, handle it, settle it. Returns entries read."""
        await self.pump_retries()
        items = await self._fetch(block_ms)
        sem = asyncio.Semaphore(self.concern.concurrency)

        async def run(item: _Entry | _Outcome) -> _Outcome:
            if isinstance(item, _Outcome):
                return item
            async with sem:
                return await self._handle(item)

        outcomes = list(await asyncio.gather(*(run(i) for i in items)))
        if outcomes:
            await self._settle(outcomes)
        return len(items)

    # ------------------------------------------------------------------ maintenance

    def _note_local_due(self, due_ms: int) -> None:
        if not self._next_local_due_ms or due_ms < self._next_local_due_ms:
            self._next_local_due_ms = due_ms
            self._retry_wakeup.set()

    async def pump_retries(self) -> int:
        """Move due retries into this group's retry streams; returns how many moved."""
        moved = 0
        now_ms = int(time.time() * 1000)
        for topic in self.concern.topics:
            moved += int(
                await _PUMP(
                    self.client,
                    [
                        self.keys.delayed(topic, self.group),
                        self.keys.retry_stream(topic, self.group),
                    ],
                    [now_ms, 1000],
                )
            )
        if self._next_local_due_ms and self._next_local_due_ms <= now_ms:
            self._next_local_due_ms = 0
        return moved

    async def renew(self) -> int:
        """Reset the idle time of every entry this consumer holds (XCLAIM JUSTID, no count)."""
        renewed = 0
        async with self.client.pipeline(transaction=False) as pipe:
            for stream, ids in self._held.items():
                if ids:
                    pipe.xclaim(stream, self.group, self.name, 0, list(ids), justid=True)
                    renewed += len(ids)
            if renewed:
                await pipe.execute()
        return renewed

    async def reclaim(self) -> list[_Entry | _Outcome]:
        """XAUTOCLAIM entries idle longer than min_idle_ms (their owner stopped renewing)."""
        out: list[_Entry | _Outcome] = []
        for stream, topic in self._streams.items():
            want = self._per_stream(1)
            if not want:
                break
            self._reserved += want
            try:
                reply: Any = await self.client.xautoclaim(
                    stream, self.group, self.name, self.settings.min_idle_ms, "0-0", count=want
                )
            finally:
                self._reserved -= want
            claimed = [_Entry(stream, topic, i, f) for i, f in reply[1]]
            if not claimed:
                continue
            await self._load_deliveries(stream, claimed)
            self._hold(claimed)
            self.stats.read += len(claimed)
            self.stats.reclaimed += len(claimed)
            log.warning("reclaimed", stream=stream, count=len(claimed))
            out += self._triage(claimed, await self._seen(claimed))
        return out

    async def expire_consumers(self) -> list[str]:
        """Remove consumers that own nothing and were idle longer than consumer_expiry_ms."""
        removed = []
        for stream in self._streams:
            try:
                consumers: Any = await self.client.xinfo_consumers(stream, self.group)
            except ResponseError:  # stream or group gone: the reader recreates them
                continue
            for c in consumers:
                name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
                if (
                    name != self.name
                    and int(c["pending"]) == 0
                    and int(c["idle"]) > self.settings.consumer_expiry_ms
                ):
                    await self.client.xgroup_delconsumer(stream, self.group, name)
                    removed.append(name)
        if removed:
            log.info("consumers_expired", consumers=sorted(set(removed)))
        return removed

    # ------------------------------------------------------------------ run loop

    async def run(self, *, started: asyncio.Event | None = None) -> None:
        """Run until ``stop()``; then drain in-flight work within grace_s and return."""
        await self._until_up(self.ensure_groups)
        self.ready = True
        log.info(
            "consumer_started", group=self.group, consumer=self.name, streams=list(self._streams)
        )
        if started is not None:
            started.set()
        workers = [asyncio.create_task(self._worker()) for _ in range(self.concern.concurrency)]
        side = [
            asyncio.create_task(self._settler()),
            asyncio.create_task(self._keepalive()),
            asyncio.create_task(self._retry_loop()),
        ]
        if self.settings.trim_interval_ms:
            side.append(asyncio.create_task(self._trim_loop()))
        if self.settings.stats_interval_ms:
            side.append(asyncio.create_task(self._stats_loop()))
        reader = asyncio.create_task(self._reader())
        stop_wait = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                [stop_wait, reader, *workers, *side], return_when=asyncio.FIRST_COMPLETED
            )
            if stop_wait not in done:  # every task runs until cancelled: this is a bug
                failed = done.pop()
                log.error("consumer_task_failed", group=self.group, task=failed.get_coro())
                failed.result()
                raise RuntimeError(f"consumer task {failed.get_coro()} ended on its own")
            if not self._reading:
                reader.cancel()  # waiting for slots or backing off: nothing to lose
            await asyncio.wait([reader])  # its cancellation is not ours: don't suppress ours
            if not await wait_event(self._drained, self.settings.grace_s):
                log.warning("grace_expired", in_flight=self._in_flight)
        finally:
            await self._cancel_all([stop_wait, reader, *workers, *side])
            log.info(
                "consumer_stopped", group=self.group, consumer=self.name, **self.stats.as_dict()
            )

    async def _cancel_all(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Cancel the run's tasks and wait for them, cancelling again any that swallowed it
        (a handler catching CancelledError): shutdown must end. After 3 rounds the rest are
        left behind, with an error log."""
        pending = set(tasks)
        for _ in range(3):
            for t in pending:
                t.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
            if not pending:
                break
        if pending:
            log.error(
                "tasks_ignore_cancel", group=self.group, tasks=sorted(t.get_name() for t in pending)
            )
        for t in tasks:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: their failures were handled where they happened

    def stop(self) -> None:
        """Stop reading; ``run`` then drains in-flight work and returns."""
        self._stopping.set()

    async def _until_up(self, step: Any, *, default_when_stopping: Any = _NO_DEFAULT) -> Any:
        """Run ``step`` until Redis answers; log once per state change.

        With ``default_when_stopping``, give up and return it once ``stop()`` was called
        (the reader must not keep a stopping consumer alive while Redis is down).
        """
        backoff = Backoff()
        while True:
            try:
                result = await step()
            except REDIS_DOWN as e:
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    self.ready = False
                    log.error("redis_unavailable", group=self.group, error=str(e))
                if default_when_stopping is not _NO_DEFAULT and self._stopping.is_set():
                    return default_when_stopping
                await backoff.sleep()
                continue
            except ResponseError as e:
                # NOGROUP: the group or stream is gone (FLUSHALL, restart without persistence,
                # a deleted key); UNBLOCKED: the key was deleted under a blocked read.
                if not str(e).startswith(("NOGROUP", "UNBLOCKED")):
                    raise
                log.error("group_missing_recreating", group=self.group, error=str(e))
                self._groups_ok = False
                self._recovering = dict.fromkeys(self._streams, b"0")
                await backoff.sleep()
                continue
            if self._down_since is not None:
                log.info(
                    "redis_available",
                    group=self.group,
                    down_s=round(time.monotonic() - self._down_since, 3),
                )
                self._down_since = None
                self.ready = True
            return result

    async def _reader(self) -> None:
        while not self._stopping.is_set():
            await self._wait_for_room()
            self._dispatch(
                await self._until_up(
                    lambda: self._fetch(self.settings.block_ms), default_when_stopping=[]
                )
            )

    def _dispatch(self, items: list[_Entry | _Outcome]) -> None:
        for item in items:
            if isinstance(item, _Outcome):
                self._settle_q.put_nowait(item)
            else:
                self._work.put_nowait(item)

    async def _worker(self) -> None:
        while True:
            entry = await self._work.get()
            self._settle_q.put_nowait(await self._handle(entry))

    async def _settler(self) -> None:
        while True:
            batch = [await self._settle_q.get()]
            while not self._settle_q.empty() and len(batch) < 1000:
                batch.append(self._settle_q.get_nowait())
            # Settling is idempotent: after a dropped connection the same batch is sent again.
            await asyncio.shield(self._until_up(lambda: self._settle(batch)))  # noqa: B023

    async def _keepalive(self) -> None:
        """Heartbeat (renew held entries) every min_idle/3; reclaim and expire less often."""
        period_s = self.settings.min_idle_ms / 3000
        rounds = 0
        while True:
            await asyncio.sleep(period_s * random.uniform(0.9, 1.0))
            if self._in_flight:  # renew() with nothing held would not prove Redis is up
                await self._until_up(self.renew)
            rounds += 1
            if not self._stopping.is_set():
                self._dispatch(await self._until_up(self.reclaim))
            if rounds % 30 == 0:
                await self._until_up(self.expire_consumers)

    async def report_stats(self) -> None:
        """Write this consumer's ack-latency histogram (cumulative) to the group's hash."""
        body = msgspec.json.encode(
            {
                "at": int(time.time() * 1000),
                "bounds_ms": _LATENCY_BOUNDS_MS,
                "counts": self.stats.latency_counts,
            }
        )
        key = self.keys.latency(self.group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(key, self.name, body)
            pipe.pexpire(key, 3_600_000)
            await pipe.execute()

    async def _stats_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.stats_interval_ms / 1000)
            try:
                await self.report_stats()
            except Exception as e:  # a figure for the dashboard: never worth stopping for
                log.debug("stats_report_failed", error=str(e))

    async def _retry_loop(self) -> None:
        """Pump due retries: at the earliest local due time, and at least every second."""
        while True:
            timeout_s = 1.0
            if self._next_local_due_ms:
                timeout_s = min(timeout_s, max(0.0, self._next_local_due_ms / 1000 - time.time()))
            await wait_event(self._retry_wakeup, timeout_s)
            self._retry_wakeup.clear()
            await self._until_up(self.pump_retries)

    async def _trim_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.trim_interval_ms / 1000 * random.uniform(0.8, 1.2))
            for stream in self._streams:
                await self._until_up(
                    lambda s=stream: trim_stream(
                        self.client, s, hard_maxlen=self.settings.hard_maxlen
                    )
                )
