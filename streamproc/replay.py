"""Replay a range of a group's topics to that group only, and move a group's position.

``plan_replay`` reads the range of each topic stream the group reads (XRANGE, pages of
``PAGE``, at most ``max_entries`` entries in all) and counts what it would re-deliver: per
topic and type, and how many of them the group already handled (its dedup mark
``Keys.seen_prefix`` + event id is there). ``apply_replay`` appends those entries to the
group's own retry stream (``Keys.retry_stream``), which only that group reads, the same path
``streamproc dlq replay`` uses: other groups of the topic see nothing. The entry keeps its
fields and event id, with ``origin`` (the topic entry id) and ``replayed`` (the run's time,
epoch ms) added. A consumer checks the mark of every retry-stream entry before its handler
runs, so by default an entry the group handled is dropped as a duplicate.

``ignore_dedup=True`` deletes the group's marks of exactly those event ids, in the same
MULTI as the appends (every key shares the ``{topic}`` hash tag), so they are handled again.
Nothing in an entry can switch dedup off: a replayed entry sets its mark again when handled,
so a redelivery of the replayed entry (a crash, a reclaim) is still recognised.

``plan_reset`` / ``apply_reset`` move a group like Kafka's offset reset: ``XGROUP SETID`` on
each of its topic streams to just before the first entry to read next (a time, an entry id,
``earliest`` or ``latest``), with ``ENTRIESREAD`` where the count is known so the group's lag
stays right. Pending entries stay pending; those inside a re-read range are delivered again
by the next read. Moving back re-reads entries on the topic stream itself, where the consumer
checks marks in the settle script: a handler runs, and the effects of an event the group
already applied are not applied again. ``ignore_dedup`` deletes
the marks of the re-read range first.

Both count what they did in ``Keys.replays`` (a hash per topic and group) and log it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis
import structlog
from redis.exceptions import ResponseError

from streamproc.errors import ConfigError
from streamproc.groups import group_info
from streamproc.keys import Keys

__all__ = (
    "DEFAULT_MAX",
    "PAGE",
    "Pos",
    "ReplayPlan",
    "ResetPlan",
    "TopicRange",
    "TopicReset",
    "apply_replay",
    "apply_reset",
    "fmt",
    "parse_position",
    "plan_replay",
    "plan_reset",
    "when",
)

log = structlog.get_logger("streamproc.replay")

#: Entries read per XRANGE / written per MULTI.
PAGE = 500
#: At most this many entries are read from a range unless told otherwise (``--max``).
DEFAULT_MAX = 100_000
MAX_SEQ = 2**64 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MS_RE = re.compile(r"^\d{1,20}$")

#: A stream entry id as (milliseconds, sequence).
Pos = tuple[int, int]


def parse_position(text: str, *, end: bool = False) -> Pos:
    """An entry id (``1733050000000-0``), epoch ms (all digits) or ISO-8601 time (a time
    without a zone is UTC) as a stream id. A time or ms ``end`` covers its whole millisecond."""
    t = text.strip()
    if m := _ID_RE.fullmatch(t):
        ms, seq = int(m[1]), int(m[2])
    else:
        seq = MAX_SEQ if end else 0
        if _MS_RE.fullmatch(t):
            ms = int(t)
        else:
            try:
                dt = datetime.fromisoformat(t)
            except ValueError:
                dt = None
            if dt is None:
                raise ConfigError(
                    f"invalid time or id {text!r}: expected ISO-8601 (2026-12-01T10:00:00Z), "
                    "epoch ms (1764583200000) or a stream entry id (1764583200000-0)"
                )
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=UTC)
            ms = (dt - _EPOCH) // timedelta(milliseconds=1)
    if not 0 <= ms <= MAX_SEQ or seq > MAX_SEQ:
        raise ConfigError(f"invalid time or id {text!r}: out of a stream id's range")
    return ms, seq


def fmt(pos: Pos) -> str:
    return f"{pos[0]}-{pos[1]}"


def when(pos: Pos) -> str:
    """The time of an entry id, ISO-8601 UTC (ms)."""
    try:
        moment = _EPOCH + timedelta(milliseconds=pos[0])
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    except OverflowError:
        return "(beyond year 9999)"


def _pos(raw: bytes | str) -> Pos:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _before(pos: Pos) -> Pos:
    """The id just before ``pos`` (0-0 stays 0-0): a group set there reads ``pos`` next."""
    ms, seq = pos
    if seq:
        return ms, seq - 1
    return (ms - 1, MAX_SEQ) if ms else (0, 0)


async def _pages(
    client: aioredis.Redis, stream: str, lo: str, hi: str
) -> AsyncIterator[list[tuple[bytes, dict[bytes, bytes]]]]:
    """XRANGE lo..hi in pages of PAGE (``lo`` may be exclusive: ``(id``)."""
    while True:
        rows: Any = await client.xrange(stream, lo, hi, count=PAGE)
        if not rows:
            return
        yield [(i, f) for i, f in rows]
        if len(rows) < PAGE:
            return
        lo = "(" + rows[-1][0].decode()


async def _marked(
    client: aioredis.Redis, prefix: bytes, rows: Iterable[tuple[bytes, dict[bytes, bytes]]]
) -> list[bytes]:
    """The dedup mark keys (of ``prefix``) present for these entries' event ids."""
    names = [prefix + f[b"id"] for _, f in rows if f.get(b"id")]
    if not names:
        return []
    found: list[Any] = await client.mget(names)
    return [n for n, v in zip(names, found, strict=True) if v is not None]


async def _note(
    client: aioredis.Redis, key: str, counts: dict[str, int], last: dict[str, Any]
) -> None:
    """Count an operation in the group's replays hash (and keep its summary as ``last``)."""
    t: Any = await client.time()
    now_ms = int(t[0]) * 1000 + int(t[1]) // 1000
    async with client.pipeline(transaction=True) as pipe:
        for name, n in counts.items():
            pipe.hincrby(key, name, n)
        pipe.hset(key, mapping={"last_ms": now_ms, "last": orjson.dumps(last)})
        await pipe.execute()


class RangeTooLarge(ConfigError):
    """More entries than ``--max`` in the range."""


# ---------------------------------------------------------------------- replay


@dataclass
class TopicRange:
    """What a replay finds on one topic."""

    topic: str
    stream: str
    #: The group's retry stream the entries go to.
    target: str
    scanned: int = 0
    #: Entries of the wanted types (all of them when no type is given).
    matched: int = 0
    by_type: Counter[str] = field(default_factory=Counter)
    #: Matched entries whose event id the group already handled (dedup mark present).
    marked: int = 0
    #: Matched entries of types this group has no handler for (acked unread).
    unhandled: int = 0
    #: The group's last-delivered id on the topic stream (None: the group is not on it yet).
    #: Entries after it are not replayed: the group reads them from the topic anyway (they
    #: would arrive twice), and the range is read up to it only.
    delivered: str | None = None
    #: How many entries the group has not been delivered yet (its lag), when Redis knows.
    undelivered: int | None = None
    #: The last entry to replay when planned: the write stops there.
    last_id: str | None = None


@dataclass
class ReplayPlan:
    group: str
    start: Pos
    #: None: up to the last entry (when planned).
    end: Pos | None
    types: frozenset[str]
    dedup: bool
    topics: list[TopicRange]

    @property
    def total(self) -> int:
        return sum(t.matched for t in self.topics)

    @property
    def marked(self) -> int:
        return sum(t.marked for t in self.topics)


async def plan_replay(
    client: aioredis.Redis,
    keys: Keys,
    group: str,
    topics: Iterable[str],
    *,
    start: Pos,
    end: Pos | None,
    types: Collection[str] = (),
    handled: Collection[str] = (),
    dedup: bool = True,
    max_entries: int = DEFAULT_MAX,
) -> ReplayPlan:
    """Count what a replay of ``start..end`` (both inclusive; None: up to the last entry the
    group was delivered) would re-deliver; writes nothing.

    Raises RangeTooLarge when the range holds more than ``max_entries`` entries in all.
    """
    want = frozenset(types)
    plan = ReplayPlan(group, start, end, want, dedup, [])
    scanned = 0
    for topic in topics:
        tr = TopicRange(topic, keys.stream(topic), keys.retry_stream(topic, group))
        prefix = keys.seen_prefix(topic, group).encode()
        plan.topics.append(tr)
        g = await group_info(client, tr.stream, group)
        if g is None:
            continue
        tr.delivered, tr.undelivered = g.last_delivered_id, g.lag
        upto = _pos(g.last_delivered_id)
        last = upto if end is None else min(end, upto)
        if last < start:
            continue
        async for rows in _pages(client, tr.stream, fmt(start), fmt(last)):
            scanned += len(rows)
            if scanned > max_entries:
                raise RangeTooLarge(
                    f"the range holds more than {max_entries:,} entries (--max): narrow it "
                    "with --from/--to, or raise --max"
                )
            tr.scanned += len(rows)
            tr.last_id = rows[-1][0].decode()
            hit = [(i, f) for i, f in rows if not want or _type(f) in want]
            for _, f in hit:
                kind = _type(f)
                tr.by_type[kind] += 1
                if handled and kind not in handled:
                    tr.unhandled += 1
            tr.matched += len(hit)
            if dedup:
                tr.marked += len(await _marked(client, prefix, hit))
    return plan


def _type(fields: dict[bytes, bytes]) -> str:
    return fields.get(b"type", b"").decode(errors="replace")


async def apply_replay(
    client: aioredis.Redis, keys: Keys, plan: ReplayPlan, *, ignore_dedup: bool = False
) -> dict[str, tuple[int, int]]:
    """Append the planned entries to the group's retry streams; per topic, how many were
    replayed and how many dedup marks were deleted (``ignore_dedup``). Entries trimmed since
    the plan are not there any more and are not counted."""
    t: Any = await client.time()
    run = str(int(t[0]) * 1000 + int(t[1]) // 1000).encode()
    out: dict[str, tuple[int, int]] = {}
    for tr in plan.topics:
        if tr.last_id is None or not tr.matched:
            continue
        prefix = keys.seen_prefix(tr.topic, plan.group).encode()
        replayed = cleared = 0
        async for rows in _pages(client, tr.stream, fmt(plan.start), tr.last_id):
            hit = [(i, f) for i, f in rows if not plan.types or _type(f) in plan.types]
            if not hit:
                continue
            async with client.pipeline(transaction=True) as pipe:
                for i, f in hit:
                    if ignore_dedup and f.get(b"id"):
                        pipe.delete(prefix + f[b"id"])
                    fields: dict[Any, Any] = {k: v for k, v in f.items() if k not in _OURS}
                    fields[b"origin"], fields[b"replayed"] = i, run
                    pipe.xadd(tr.target, fields)
                pipe.hincrby(keys.replays(tr.topic, plan.group), "replayed", len(hit))
                replies: list[Any] = await pipe.execute()
            cleared += sum(r for r in replies[:-1] if isinstance(r, int))
            replayed += len(hit)
        out[tr.topic] = (replayed, cleared)
        summary = {
            "op": "replay",
            "from": fmt(plan.start),
            "to": tr.last_id,
            "types": sorted(plan.types),
            "entries": replayed,
            "ignore_dedup": ignore_dedup,
            "marks_cleared": cleared,
        }
        await _note(
            client,
            keys.replays(tr.topic, plan.group),
            {"runs": 1, "marks_cleared": cleared},
            summary,
        )
        log.info("replayed", group=plan.group, topic=tr.topic, **summary)
    return out


#: Fields a replay sets itself (a retry's ``attempt`` starts again from 0).
_OURS = frozenset((b"attempt", b"origin", b"replayed"))


# ---------------------------------------------------------------------- reset


@dataclass
class TopicReset:
    """What a reset would do on one topic stream."""

    topic: str
    stream: str
    #: False: no stream yet (nothing to move).
    exists: bool = False
    #: False: the group is not on this stream yet; the reset creates it at the target.
    group_exists: bool = False
    last_delivered: str = "0-0"
    target: str = "0-0"
    pending: int = 0
    #: Entries the group read before and would read again; None: more than ``max``.
    reread: int | None = 0
    #: Entries not yet read that the group would never read; None: more than ``max``.
    skipped: int | None = 0
    #: Re-read entries whose event id the group handled (dedup mark present).
    marked: int = 0
    #: The group's ``entries-read`` at the target, when the count is known.
    entries_read: int | None = None
    #: The marks of the re-read range (deleted by ``ignore_dedup``).
    marks: list[bytes] = field(default_factory=list)


@dataclass
class ResetPlan:
    group: str
    to: str
    topics: list[TopicReset]
    #: Consumers of the group that look alive: ``name (idle N ms)``.
    live: list[str]

    @property
    def reread(self) -> int:
        return sum(t.reread or 0 for t in self.topics)

    @property
    def marked(self) -> int:
        return sum(t.marked for t in self.topics)


async def plan_reset(
    client: aioredis.Redis,
    keys: Keys,
    group: str,
    topics: Iterable[str],
    *,
    to: str,
    dedup: bool = True,
    live_idle_ms: int = 30_000,
    max_entries: int = DEFAULT_MAX,
) -> ResetPlan:
    """Where ``group`` is and where ``to`` (``earliest``, ``latest``, or a position the next
    read starts at: TIME or ID) would put it, per topic; writes nothing.

    Raises ConfigError for a bad ``to`` and RangeTooLarge when a topic would re-read more than
    ``max_entries`` entries.
    """
    goal = None if to in ("earliest", "latest") else _before(parse_position(to))
    plan = ResetPlan(group, to, [], [])
    for topic in topics:
        tr = TopicReset(topic, keys.stream(topic))
        plan.topics.append(tr)
        try:
            info: dict[Any, Any] = await client.xinfo_stream(tr.stream)
        except ResponseError as e:
            if "no such key" in str(e).lower():
                continue
            raise
        tr.exists = True
        last_gen = _pos(info["last-generated-id"])
        added = info.get("entries-added")
        g = await group_info(client, tr.stream, group)
        if g is not None:
            tr.group_exists, tr.pending = True, g.pending
            tr.last_delivered = g.last_delivered_id
            plan.live += await _live(client, keys, tr.stream, group, live_idle_ms)
        target = last_gen if to == "latest" else (0, 0) if goal is None else goal
        tr.target = fmt(target)
        prefix = keys.seen_prefix(topic, group).encode() if dedup else None
        await _count_reset(client, tr, target, prefix, max_entries, added)
    plan.live = sorted(set(plan.live))
    return plan


async def _count_reset(
    client: aioredis.Redis,
    tr: TopicReset,
    target: Pos,
    prefix: bytes | None,
    max_entries: int,
    added: Any,
) -> None:
    """One scan from the lower of target and last-delivered on: entries re-read (with their
    dedup marks under ``prefix``), skipped, and after both (for ``entries-read``)."""
    ld = _pos(tr.last_delivered) if tr.group_exists else target
    reread = skipped = after = 0
    last = min(target, ld)
    complete = True
    async for rows in _pages(client, tr.stream, "(" + fmt(last), "+"):
        back = []
        for i, f in rows:
            p = _pos(i)
            if target < p <= ld:
                reread += 1
                back.append((i, f))
            elif ld < p <= target:
                skipped += 1
            else:
                after += 1
        last = _pos(rows[-1][0])
        if back and prefix is not None:
            tr.marks += await _marked(client, prefix, back)
        if reread + skipped + after > max_entries:
            complete = False
            break
    tr.marked = len(tr.marks)
    if complete:
        tr.reread, tr.skipped = reread, skipped
        if isinstance(added, int):  # entries after the target: re-read ones and later ones
            tr.entries_read = max(0, added - reread - after)
        return
    # Cut short: a count whose part of the stream the scan passed is still exact.
    tr.reread = reread if last >= ld else None
    tr.skipped = skipped if last >= target else None
    if tr.reread is None or tr.reread > max_entries:
        raise RangeTooLarge(
            f"topic {tr.topic}: the reset would re-read more than {max_entries:,} entries "
            "(--max): choose a later --to, or raise --max"
        )


async def _live(
    client: aioredis.Redis, keys: Keys, stream: str, group: str, live_idle_ms: int
) -> list[str]:
    """Consumers of the group that look alive: their name lease (``Keys.consumer_lease``) is
    held, or Redis saw them within ``live_idle_ms``."""
    rows: list[dict[Any, Any]] = await client.xinfo_consumers(stream, group)
    out = []
    for r in rows:
        name = r["name"].decode() if isinstance(r["name"], bytes) else str(r["name"])
        idle = int(r.get("idle") or 0)
        if idle < live_idle_ms or await client.exists(keys.consumer_lease(group, name)):
            out.append(f"{name} (idle {idle} ms)")
    return out


async def apply_reset(
    client: aioredis.Redis, keys: Keys, plan: ResetPlan, *, ignore_dedup: bool = False
) -> int:
    """Move the group on every topic that has a stream (creating it there at the target if
    it is missing); with ``ignore_dedup``, delete the marks of the re-read entries first.
    Returns how many marks were deleted."""
    cleared_all = 0
    for tr in plan.topics:
        if not tr.exists:
            continue
        cleared = 0
        if ignore_dedup:
            for s in range(0, len(tr.marks), PAGE):
                cleared += int(await client.delete(*tr.marks[s : s + PAGE]))
        async with client.pipeline(transaction=True) as pipe:
            if tr.group_exists:
                pipe.xgroup_setid(tr.stream, plan.group, tr.target, entries_read=tr.entries_read)
            else:
                pipe.xgroup_create(tr.stream, plan.group, tr.target, entries_read=tr.entries_read)
            await pipe.execute()
        summary = {
            "op": "reset",
            "to": plan.to,
            "from_id": tr.last_delivered if tr.group_exists else None,
            "target": tr.target,
            "reread": tr.reread,
            "skipped": tr.skipped,
            "ignore_dedup": ignore_dedup,
            "marks_cleared": cleared,
        }
        await _note(
            client,
            keys.replays(tr.topic, plan.group),
            {"resets": 1, "marks_cleared": cleared},
            summary,
        )
        log.info("group_reset", group=plan.group, topic=tr.topic, **summary)
        cleared_all += cleared
    return cleared_all
