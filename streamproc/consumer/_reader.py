"""Reading: new entries, this consumer's own pending entries, and reclaimed ones, all through
one path (``_admit``) that holds them, reads delivery counts, looks up dedup marks and
triages — and, if any of that fails, lets go of every entry it took.

An entry taken from Redis is either handed on (held: counted in flight, renewed) or released
(not held; it stays in this consumer's pending list and the next read re-reads it with ``0``).
Nothing is ever held by no one: that is what makes "reclaim never strands entries" true.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any

import redis.asyncio as aioredis
import structlog
from redis.crc import key_slot

from streamproc._aio import wait_event
from streamproc.connection import is_cluster
from streamproc.consumer._guard import RedisGuard
from streamproc.consumer._scripts import RECLAIM
from streamproc.consumer.outcomes import DeadLettered, Empty, Entry, Outcome, Skipped
from streamproc.consumer.stats import ConsumerStats
from streamproc.groups import register_topics
from streamproc.keys import Keys
from streamproc.settings import ConsumerSettings

__all__ = ("Item", "Reader")

log = structlog.get_logger("streamproc.consumer")

#: What a read yields: entries to handle, and outcomes decided without a handler.
Item = Entry | Outcome


class Reader:
    """Holds the in-flight set of one consumer and fills it from Redis."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        keys: Keys,
        group: str,
        name: str,
        settings: ConsumerSettings,
        streams: Mapping[str, str],
        unhandled: frozenset[bytes],
        guard: RedisGuard,
        stats: ConsumerStats,
    ) -> None:
        self.client, self.keys, self.group, self.name = client, keys, group, name
        self.settings, self.guard, self.stats = settings, guard, stats
        self.streams = dict(streams)  # stream key -> topic
        self._unhandled = unhandled
        self.held: dict[str, dict[bytes, Entry]] = {k: {} for k in self.streams}
        self.in_flight = 0
        self.room = asyncio.Event()  # set while in-flight room is left
        self.room.set()
        self.drained = asyncio.Event()  # set while nothing is in flight
        self.drained.set()
        self._reserved = 0  # room promised to a read under way
        self._recovering: dict[str, bytes] = dict.fromkeys(self.streams, b"0")
        #: Per stream with a recovery read (``0``) under way: the entries released (settled,
        #: or let go) since it was sent. Its reply may list them as pending (Redis ran the read
        #: first, on another connection, e.g. both queued during a stall) though they are no
        #: longer held here: not run again on the strength of that reply.
        self._released_since: dict[str, set[bytes]] = {}
        self._reading_all: set[str] = set()  # a single-call read under way: its streams
        self._cursors: dict[str, bytes] = dict.fromkeys(self.streams, b"0-0")
        #: Deliveries of an entry that ended cleanly (released after a blip): not counted.
        self._credit: dict[tuple[str, bytes], int] = {}
        self.groups_ok = False
        self._cluster = is_cluster(client)
        #: The streams read with ``>``: all of them, or (partition ownership) the unpartitioned
        #: ones and the owned partitions' (``set_reading``).
        self.reading: set[str] = set(self.streams)
        self.reading_changed = asyncio.Event()
        #: The streams read by hash slot: one XREADGROUP each on a Redis Cluster (a read across
        #: slots is refused there); one group of all of them on a single Redis.
        self._slots: list[tuple[str, ...]] = self._by_slot()
        #: Blocked per-slot reads still under way (by their streams): never cancelled,
        #: collected by a later read.
        self._outstanding: dict[tuple[str, ...], asyncio.Task[Any]] = {}

    def _by_slot(self) -> list[tuple[str, ...]]:
        ordered = [s for s in self.streams if s in self.reading]
        if not self._cluster:
            return [tuple(ordered)] if ordered else []
        by_slot: dict[int, list[str]] = {}
        for stream in ordered:
            by_slot.setdefault(key_slot(stream.encode()), []).append(stream)
        return [tuple(v) for v in by_slot.values()]

    def set_reading(self, streams: set[str]) -> None:
        """Read only these streams with ``>`` from the next read on (a read under way ends
        with its BLOCK; what it delivers is handled)."""
        if streams != self.reading:
            self.reading = set(streams)
            self._slots = self._by_slot()
            self.reading_changed.set()

    def reading_now(self, streams: Iterable[str]) -> bool:
        """Is a read of one of these streams under way?"""
        wanted = set(streams)
        return any(wanted.intersection(k) for k in self._outstanding) or bool(
            self._reading_all and wanted & self._reading_all
        )

    def recover(self, stream: str) -> None:
        """Re-read this consumer's own pending entries of ``stream`` (with ``0``)."""
        self._recovering.setdefault(stream, b"0")

    # ------------------------------------------------------------------ in flight

    def free(self) -> int:
        return self.settings.max_in_flight - self.in_flight - self._reserved

    def hold(self, entries: Iterable[Entry]) -> None:
        n = 0
        for e in entries:
            self.held[e.stream][e.entry_id] = e
            n += 1
        self.in_flight += n
        if self.in_flight:
            self.drained.clear()

    def release(self, entries: Iterable[Entry]) -> None:
        for e in entries:
            if self.held[e.stream].pop(e.entry_id, None) is not None:
                self.in_flight -= 1
                if (since := self._released_since.get(e.stream)) is not None:
                    since.add(e.entry_id)
        self.room.set()
        if self.in_flight == 0:
            self.drained.set()

    def let_go(self, entries: list[Entry]) -> None:
        """Release entries that did not run and re-read them later with ``0`` (their next
        delivery is not counted: this ending was ours, not theirs)."""
        for e in entries:
            k = (e.stream, e.entry_id)
            self._credit[k] = self._credit.get(k, 0) + 1
            self._recovering[e.stream] = b"0"
        self.release(entries)

    def recover_all(self) -> None:
        """After an outage or NOGROUP: re-read own pending entries before new ones (a read
        the server answered but whose reply was lost left entries in our pending list)."""
        self._recovering = dict.fromkeys(self.streams, b"0")

    async def wait_for_room(self) -> None:
        while self.free() <= 0:
            self.room.clear()
            await self.room.wait()

    # ------------------------------------------------------------------ reading

    async def ensure_groups(self) -> None:
        """Create the group on every stream it reads (MKSTREAM); BUSYGROUP is success.
        The topics go into the registry set (``Keys.topics``) first."""
        from redis.exceptions import ResponseError

        await register_topics(self.client, self.keys, self.streams.values())
        for stream in self.streams:
            try:
                await self.client.xgroup_create(stream, self.group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise
        self.groups_ok = True

    async def read(self, block_ms: int | None) -> list[Item]:
        """Own pending entries first (after a restart or a blip), then new ones."""
        if not self.groups_ok:
            await self.ensure_groups()
        free = self.free()
        if free <= 0:
            return []
        while self._recovering:
            stream, cursor = next(iter(self._recovering.items()))
            count = min(self.settings.batch, free)
            released = self._released_since[stream] = set()
            try:
                reply: Any = await self._reserve(
                    count,
                    self.client.xreadgroup(self.group, self.name, {stream: cursor}, count=count),
                )
            finally:
                self._released_since.pop(stream, None)
            got: list[tuple[bytes, dict[bytes, bytes] | None]] = reply[0][1] if reply else []
            # Another step may have restarted this stream's recovery at 0 meanwhile (a blip):
            # then keep that, but still take what this read delivered.
            restarted = self._recovering.get(stream) != cursor
            if released and any(i in released for i, _ in got):
                # Released while the read was under way: settled (gone from the pending list
                # by now) or let go (still pending). Not from this reply: read again from 0,
                # sent after the release, which lists only what is still pending.
                got = [(i, f) for i, f in got if i not in released]
                self._recovering[stream] = b"0"
            elif not got:
                if not restarted:
                    self._recovering.pop(stream, None)
                continue
            elif not restarted:
                self._recovering[stream] = got[-1][0]
            held = self.held[stream]  # already being worked on here: not twice
            fresh = [(i, f) for i, f in got if i not in held]
            if fresh:
                return await self._admit(stream, fresh, redelivered=True)
        if not self._slots:  # nothing to read (owns no partition): wait for a change
            self.reading_changed.clear()
            if self._outstanding:  # reads of streams no longer read: they end with their BLOCK
                if block_ms is not None:
                    await asyncio.wait(
                        list(self._outstanding.values()), return_when=asyncio.FIRST_COMPLETED
                    )
                return await self._collect()
            if block_ms:
                await wait_event(self.reading_changed, block_ms / 1000)
            return []
        # XREADGROUP's COUNT is per stream: ask each for a share of the free room (near the
        # bound, one each can pass it by at most ``streams - 1``).
        reading = [s for g in self._slots for s in g]
        per = min(self.settings.batch, max(1, free // len(reading)))
        if len(self._slots) > 1 or self._outstanding:
            return await self._read_slots(per, block_ms)
        self._reading_all = set(reading)
        try:
            reply = await self._reserve(
                per * len(reading),
                self.client.xreadgroup(
                    self.group,
                    self.name,
                    dict.fromkeys(reading, ">"),
                    count=per,
                    block=block_ms,
                ),
            )
        except BaseException:
            self.recover_all()  # the server may have delivered what we never saw
            raise
        finally:
            self._reading_all = set()
        out: list[Item] = []
        for stream_name, rows in reply or ():
            out += await self._admit(stream_name.decode(), rows, redelivered=False)
        return out

    def _start_read(
        self, streams: tuple[str, ...], per: int, block_ms: int | None
    ) -> asyncio.Task[Any]:
        """XREADGROUP ``>`` of the streams of one slot, as a task holding its room."""
        call = self.client.xreadgroup(
            self.group, self.name, dict.fromkeys(streams, ">"), count=per, block=block_ms
        )
        task = asyncio.ensure_future(self._reserve(per * len(streams), call))
        # its reserved room is free again when it ends: wake a reader waiting for room
        task.add_done_callback(lambda _: self.room.set())
        self._outstanding[streams] = task
        return task

    async def _collect(self) -> list[Item]:
        """Admit what the finished per-slot reads delivered."""
        rows: list[Any] = []
        failed: BaseException | None = None
        for i, task in list(self._outstanding.items()):
            if task.done():
                del self._outstanding[i]
                if task.cancelled():
                    failed = failed or asyncio.CancelledError()
                elif task.exception() is not None:
                    failed = failed or task.exception()
                else:
                    rows += task.result() or ()
        if failed is not None:
            self.recover_all()  # a read that failed may have been delivered: re-read with 0
            raise failed
        out: list[Item] = []
        for stream_name, entries in rows:
            out += await self._admit(stream_name.decode(), entries, redelivered=False)
        return out

    async def _read_slots(self, per: int, block_ms: int | None) -> list[Item]:
        """New entries on a Redis Cluster whose streams span several slots: first one
        non-blocking XREADGROUP per slot (together); if none had anything, one blocking read
        per slot, returning as soon as one of them delivers. The others stay under way, are
        never cancelled, and are collected by the next call (or by ``finish_reads``)."""
        now = [self._start_read(g, per, None) for g in self._slots if g not in self._outstanding]
        if now:
            try:
                await asyncio.wait(now)  # without BLOCK: each answers at once
            except BaseException:
                self.recover_all()
                raise
        out = await self._collect()
        if out or block_ms is None:
            return out
        for g in self._slots:
            if g not in self._outstanding:
                self._start_read(g, per, block_ms)
        await asyncio.wait(list(self._outstanding.values()), return_when=asyncio.FIRST_COMPLETED)
        return await self._collect()

    async def finish_reads(self) -> None:
        """Wait for the blocked per-slot reads still under way (each ends with its BLOCK) and
        let go of what they delivered: it is re-read with ``0`` by the next start."""
        if not self._outstanding:
            return
        await asyncio.wait(list(self._outstanding.values()))
        try:
            items = await self._collect()
        except Exception:
            return  # recover_all was called: the entries are re-read with 0
        self.let_go([i if isinstance(i, Entry) else i.entry for i in items])

    async def _reserve(self, n: int, call: Any) -> Any:
        self._reserved += n
        try:
            return await call
        finally:
            self._reserved -= n

    async def reclaim(self, stream: str) -> list[Item]:
        """Claim (the RECLAIM script: outage gate, owner silent) entries of ``stream`` idle
        longer than ``min_idle_ms``, continuing from where the last call stopped."""
        want = min(self.settings.batch, self.free())
        if want <= 0:
            return []
        s = self.settings
        # A claim whose reply is lost leaves entries in our pending list that we do not hold
        # and that no one else will take from a live owner: re-read our own list after it.
        try:
            reply: Any = await self._reserve(
                want,
                RECLAIM(
                    self.client,
                    [stream, self.keys.upkeep(self.streams[stream], self.group)],
                    [
                        self.group,
                        self.name,
                        s.min_idle_ms // 2,
                        s.min_idle_ms,
                        self._cursors[stream],
                        want,
                        s.min_idle_ms // 2,
                    ],
                ),
            )
        except BaseException:
            self._recovering[stream] = b"0"
            raise
        if reply[0] == b"wait":
            return []
        self._cursors[stream] = reply[0]  # 0-0 when the scan went round
        held = self.held[stream]
        # Through Lua the fields come as a flat list (none for a trimmed payload).
        rows = [(i, dict(zip(f[::2], f[1::2], strict=True)) if f else None) for i, f in reply[1]]
        rows = [(i, f) for i, f in rows if i not in held]
        if not rows:
            return []
        self.stats.reclaimed += len(rows)
        log.warning("reclaimed", stream=stream, count=len(rows))
        return await self._admit(stream, rows, redelivered=True)

    # ------------------------------------------------------------------ the one path

    async def _admit(
        self,
        stream: str,
        rows: list[tuple[bytes, Any]],
        *,
        redelivered: bool,
    ) -> list[Item]:
        topic = self.streams[stream]
        entries = [Entry(stream, topic, i, f if f else None) for i, f in rows]
        self.hold(entries)
        self.stats.read += len(entries)
        if redelivered:
            try:
                await self._load_deliveries(stream, entries)
            except BaseException:
                self.let_go(entries)
                raise
        return self._triage(entries)

    async def _load_deliveries(self, stream: str, entries: list[Entry]) -> None:
        """Delivery counts, read per entry id (a range would mix in other entries)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for e in entries:
                pipe.xpending_range(stream, self.group, min=e.entry_id, max=e.entry_id, count=1)
            rows: list[Any] = await pipe.execute()
        for e, row in zip(entries, rows, strict=True):
            if row:
                e.deliveries = int(row[0]["times_delivered"])
            credit = self._credit.pop((stream, e.entry_id), 0)
            e.deliveries = max(1, e.deliveries - credit)

    def _triage(self, entries: list[Entry]) -> list[Item]:
        """Decide what needs no handler: trimmed payloads, poison, other types. A redelivery
        runs its handler again; its settle applies the effects only if no other did."""
        out: list[Item] = []
        limit = self.settings.max_deliveries
        for entry in entries:
            if not entry.fields:
                out.append(Empty(entry))
            elif entry.deliveries > limit:
                out.append(
                    DeadLettered(
                        entry,
                        reason="poison",
                        error_type="Poison",
                        detail=f"delivered {entry.deliveries} times, over max_deliveries={limit}",
                    )
                )
            elif entry.fields.get(b"type") in self._unhandled:
                out.append(Skipped(entry))
            else:
                out.append(entry)
        return out
