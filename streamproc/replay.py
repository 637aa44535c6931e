"""Replay a range of a group's topics to that group only, and move a group's position.

The consumer keeps no mark per event: its settle script XACKs first and applies a handler's
effects only when the XACK removed the entry from the group's pending list (PEL). So both
commands judge an entry of a topic stream by the stream and the group alone. An entry counts
as **already handled by the group** when

* its id is at or below the group's last-delivered id on that stream (it was delivered),
* it is not in the group's PEL (it was acked: its effects applied, or its retry or
  dead letter was written, or its type has no handler in the group), and
* it was not dead-lettered: no entry of the group's DLQ stream (``Keys.dlq``) names it in
  ``dlq_origin_id`` (the topic entry id, for a retry's failure too). A letter that was
  replayed (``dlq replay`` deletes it) or purged no longer counts: the entry is handled.

Per page of ``PAGE`` entries that takes one XPENDING range over the page's id span (more only
if the PEL holds more than ``PAGE`` ids there); the DLQ's origin ids are read once per topic,
refused (``RangeTooLarge``) when the DLQ holds more than ``max_entries`` letters. No key is
read or written per event.

``plan_replay`` reads the range of each topic stream the group reads (XRANGE, pages of
``PAGE``, at most ``max_entries`` entries in all, up to the group's last-delivered id) and
counts what it finds: per topic and type, how many the group already handled, and how many
are pending. ``apply_replay`` appends entries to the group's own retry stream
(``Keys.retry_stream``), which only that group reads, the same path ``streamproc dlq replay``
uses: other groups of the topic see nothing. The entry keeps its fields and event id, with
``origin`` (the topic entry id) and ``replayed`` (the run's time, epoch ms) added. By default
only the entries the group did not handle and that are not pending are appended: the ones it
dead-lettered. A pending entry is left out because the group delivers it again from its PEL
and that delivery applies its effects; a replayed copy would be a second entry whose XACK
also succeeds, so the effects would apply twice. ``ignore_dedup=True`` appends every entry
of the range, and the effects of those the group handled apply again (a retry-stream entry
is settled like any other: once, by its own XACK). There are no marks to delete.

``plan_reset`` / ``apply_reset`` move a group like Kafka's offset reset: ``XGROUP SETID`` on
each of its topic streams to just before the first entry to read next (a time, an entry id,
``earliest`` or ``latest``), with ``ENTRIESREAD`` where the count is known so the group's lag
stays right. Pending entries stay pending; those inside a re-read range are delivered again
by the next read (Redis moves them to the reader; still one PEL entry, settled once).
Re-read entries the group handled are delivered again as new PEL entries, and the settle
script cannot tell an event it applied before: their effects would apply again. So
``apply_reset`` refuses (``HandledInRange``) a move back whose re-read range holds handled
entries unless ``ignore_dedup``: then it moves and they are handled again, as Kafka's reset
does. A group read by an outside system (``ours=False``) is not judged: its own dedup, if
any, decides.

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

from streamproc.errors import ConfigError, StreamprocError
from streamproc.groups import group_info
from streamproc.keys import Keys

__all__ = (
    "DEFAULT_MAX",
    "PAGE",
    "HandledInRange",
    "Pos",
    "RangeTooLarge",
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
    "refusal",
    "when",
)

log = structlog.get_logger("streamproc.replay")

#: Entries read per XRANGE / XPENDING / written per MULTI.
PAGE = 500
#: At most this many entries are read from a range (and letters from a group's DLQ) unless
#: told otherwise (``--max``).
DEFAULT_MAX = 100_000
MAX_SEQ = 2**64 - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ID_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")
_MS_RE = re.compile(r"^\d{1,20}$")

#: A stream entry id as (milliseconds, sequence).
Pos = tuple[int, int]
#: A page of stream entries as XRANGE gives them.
Rows = list[tuple[bytes, dict[bytes, bytes]]]


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


def _bytes(raw: bytes | str) -> bytes:
    return raw if isinstance(raw, bytes) else raw.encode()


def _before(pos: Pos) -> Pos:
    """The id just before ``pos`` (0-0 stays 0-0): a group set there reads ``pos`` next."""
    ms, seq = pos
    if seq:
        return ms, seq - 1
    return (ms - 1, MAX_SEQ) if ms else (0, 0)


async def _pages(client: aioredis.Redis, stream: str, lo: str, hi: str) -> AsyncIterator[Rows]:
    """XRANGE lo..hi in pages of PAGE (``lo`` may be exclusive: ``(id``)."""
    while True:
        rows: Any = await client.xrange(stream, lo, hi, count=PAGE)
        if not rows:
            return
        yield [(i, f) for i, f in rows]
        if len(rows) < PAGE:
            return
        lo = "(" + rows[-1][0].decode()


async def _pending(client: aioredis.Redis, stream: str, group: str, rows: Rows) -> set[bytes]:
    """The ids of these entries that are in the group's PEL: XPENDING over their id span
    (one call unless the PEL holds more than PAGE ids there: entries deleted from the stream
    while pending stay in it)."""
    if not rows:
        return set()
    out: set[bytes] = set()
    lo, hi = rows[0][0].decode(), rows[-1][0].decode()
    while True:
        got: list[dict[str, Any]] = await client.xpending_range(stream, group, lo, hi, PAGE)
        out.update(_bytes(p["message_id"]) for p in got)
        if len(got) < PAGE:
            break
        lo = "(" + _bytes(got[-1]["message_id"]).decode()
    return out & {i for i, _ in rows}


async def _dead_lettered(
    client: aioredis.Redis, dlq: str, topic: str, max_entries: int
) -> frozenset[bytes]:
    """The topic entry ids (``dlq_origin_id``) of the group's dead letters, read once.

    Raises RangeTooLarge when the DLQ holds more than ``max_entries`` letters."""
    if int(await client.xlen(dlq)) > max_entries:
        raise RangeTooLarge(
            f"topic {topic}: the group's DLQ holds more than {max_entries:,} dead letters, "
            "all read to tell which entries were not handled (--max): replay or purge them "
            "(streamproc dlq), or raise --max"
        )
    out: set[bytes] = set()
    async for rows in _pages(client, dlq, "-", "+"):
        out.update(f[b"dlq_origin_id"] for _, f in rows if f.get(b"dlq_origin_id"))
    return frozenset(out)


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
    """More entries than ``--max`` in the range (or dead letters in the group's DLQ)."""


class HandledInRange(StreamprocError):
    """A reset back over entries the group already handled, without ``ignore_dedup``."""


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
    #: Matched entries the group already handled (acked, not dead-lettered).
    handled: int = 0
    #: Matched entries in the group's PEL (delivered again from there, not replayed).
    pending: int = 0
    #: Matched entries of types this group has no handler for (acked unread).
    unhandled: int = 0
    #: The group's last-delivered id on the topic stream (None: the group is not on it yet).
    #: Entries after it are not replayed: the group reads them from the topic anyway (they
    #: would arrive twice), and the range is read up to it only.
    delivered: str | None = None
    #: How many entries the group has not been delivered yet (its lag), when Redis knows.
    undelivered: int | None = None
    #: The last entry of the range when planned: the write stops there.
    last_id: str | None = None
    #: The topic entry ids the group dead-lettered (its DLQ's ``dlq_origin_id``s).
    dead: frozenset[bytes] = frozenset()

    @property
    def to_replay(self) -> int:
        """Matched entries a default replay appends: neither handled nor pending."""
        return self.matched - self.handled - self.pending


@dataclass
class ReplayPlan:
    group: str
    start: Pos
    #: None: up to the last entry (when planned).
    end: Pos | None
    types: frozenset[str]
    topics: list[TopicRange]

    @property
    def total(self) -> int:
        return sum(t.matched for t in self.topics)

    @property
    def handled(self) -> int:
        return sum(t.handled for t in self.topics)

    @property
    def pending(self) -> int:
        return sum(t.pending for t in self.topics)

    def to_replay(self, *, ignore_dedup: bool = False) -> int:
        """How many entries ``apply_replay`` would append (as planned)."""
        return self.total if ignore_dedup else sum(t.to_replay for t in self.topics)


def _matching(rows: Rows, want: Collection[str]) -> Rows:
    return [(i, f) for i, f in rows if not want or _type(f) in want]


async def _split(
    client: aioredis.Redis, tr: TopicRange, group: str, rows: Rows
) -> tuple[Rows, Rows, Rows]:
    """These (delivered) entries as (handled, pending, neither)."""
    pel = await _pending(client, tr.stream, group, rows)
    handled: Rows = []
    pending: Rows = []
    rest: Rows = []
    for row in rows:
        i = row[0]
        (pending if i in pel else rest if i in tr.dead else handled).append(row)
    return handled, pending, rest


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
    max_entries: int = DEFAULT_MAX,
) -> ReplayPlan:
    """Count what a replay of ``start..end`` (both inclusive; None: up to the last entry the
    group was delivered) would re-deliver, and how much of it the group already handled;
    writes nothing. ``handled``: the event types the group has handlers for.

    Raises RangeTooLarge when the range holds more than ``max_entries`` entries in all, or a
    topic's DLQ more than ``max_entries`` letters.
    """
    want = frozenset(types)
    plan = ReplayPlan(group, start, end, want, [])
    scanned = 0
    for topic in topics:
        tr = TopicRange(topic, keys.stream(topic), keys.retry_stream(topic, group))
        plan.topics.append(tr)
        g = await group_info(client, tr.stream, group)
        if g is None:
            continue
        tr.delivered, tr.undelivered = g.last_delivered_id, g.lag
        upto = _pos(g.last_delivered_id)
        last = upto if end is None else min(end, upto)
        if last < start:
            continue
        tr.dead = await _dead_lettered(client, keys.dlq(topic, group), topic, max_entries)
        async for rows in _pages(client, tr.stream, fmt(start), fmt(last)):
            scanned += len(rows)
            if scanned > max_entries:
                raise RangeTooLarge(
                    f"the range holds more than {max_entries:,} entries (--max): narrow it "
                    "with --from/--to, or raise --max"
                )
            tr.scanned += len(rows)
            tr.last_id = rows[-1][0].decode()
            hit = _matching(rows, want)
            for _, f in hit:
                kind = _type(f)
                tr.by_type[kind] += 1
                if handled and kind not in handled:
                    tr.unhandled += 1
            tr.matched += len(hit)
            done, pending, _ = await _split(client, tr, group, hit)
            tr.handled += len(done)
            tr.pending += len(pending)
    return plan


def _type(fields: dict[bytes, bytes]) -> str:
    return fields.get(b"type", b"").decode(errors="replace")


async def apply_replay(
    client: aioredis.Redis, keys: Keys, plan: ReplayPlan, *, ignore_dedup: bool = False
) -> dict[str, tuple[int, int]]:
    """Append the planned range's entries the group did not handle (and that are not
    pending) to its retry streams, judged again page by page as they are written; with
    ``ignore_dedup`` all of them. Per topic: how many were replayed, and how many of those
    the group had handled (their effects apply again). Entries trimmed since the plan are not
    there any more and are not counted."""
    t: Any = await client.time()
    run = str(int(t[0]) * 1000 + int(t[1]) // 1000).encode()
    out: dict[str, tuple[int, int]] = {}
    for tr in plan.topics:
        if tr.last_id is None or not tr.matched:
            continue
        replayed = again = 0
        async for rows in _pages(client, tr.stream, fmt(plan.start), tr.last_id):
            hit = _matching(rows, plan.types)
            done, _pending_now, rest = await _split(client, tr, plan.group, hit)
            if ignore_dedup:
                again += len(done)
            else:
                keep = {i for i, _ in rest}
                hit = [(i, f) for i, f in hit if i in keep]
            if not hit:
                continue
            async with client.pipeline(transaction=True) as pipe:
                for i, f in hit:
                    fields: dict[Any, Any] = {k: v for k, v in f.items() if k not in _OURS}
                    fields[b"origin"], fields[b"replayed"] = i, run
                    pipe.xadd(tr.target, fields)
                pipe.hincrby(keys.replays(tr.topic, plan.group), "replayed", len(hit))
                await pipe.execute()
            replayed += len(hit)
        out[tr.topic] = (replayed, again)
        summary = {
            "op": "replay",
            "from": fmt(plan.start),
            "to": tr.last_id,
            "types": sorted(plan.types),
            "entries": replayed,
            "ignore_dedup": ignore_dedup,
            "handled_again": again,
        }
        await _note(
            client,
            keys.replays(tr.topic, plan.group),
            {"runs": 1, "handled_again": again},
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
    #: Re-read entries the group already handled (acked, not dead-lettered): their effects
    #: would apply again.
    handled: int = 0
    #: The group's ``entries-read`` at the target, when the count is known.
    entries_read: int | None = None


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
    def handled(self) -> int:
        return sum(t.handled for t in self.topics)


async def plan_reset(
    client: aioredis.Redis,
    keys: Keys,
    group: str,
    topics: Iterable[str],
    *,
    to: str,
    ours: bool = True,
    live_idle_ms: int = 30_000,
    max_entries: int = DEFAULT_MAX,
) -> ResetPlan:
    """Where ``group`` is and where ``to`` (``earliest``, ``latest``, or a position the next
    read starts at: TIME or ID) would put it, per topic, and how many re-read entries it
    already handled (``ours``: a streamproc group; an outside reader's are not counted);
    writes nothing.

    Raises ConfigError for a bad ``to`` and RangeTooLarge when a topic would re-read more than
    ``max_entries`` entries (or its DLQ holds more than that many letters).
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
        dlq = keys.dlq(topic, group) if ours else None
        await _count_reset(client, tr, group, target, dlq, max_entries, added)
    plan.live = sorted(set(plan.live))
    return plan


async def _count_reset(
    client: aioredis.Redis,
    tr: TopicReset,
    group: str,
    target: Pos,
    dlq: str | None,
    max_entries: int,
    added: Any,
) -> None:
    """One scan from the lower of target and last-delivered on: entries re-read (and how
    many of them the group handled, unless ``dlq`` is None), skipped, and after both (for
    ``entries-read``)."""
    ld = _pos(tr.last_delivered) if tr.group_exists else target
    reread = skipped = after = 0
    last = min(target, ld)
    complete = True
    dead: frozenset[bytes] | None = None
    async for rows in _pages(client, tr.stream, "(" + fmt(last), "+"):
        back: Rows = []
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
        if back and dlq is not None:
            if dead is None:
                dead = await _dead_lettered(client, dlq, tr.topic, max_entries)
            pel = await _pending(client, tr.stream, group, back)
            tr.handled += sum(1 for i, _ in back if i not in pel and i not in dead)
        if reread + skipped + after > max_entries:
            complete = False
            break
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


def refusal(plan: ResetPlan) -> str:
    """Why a reset back over handled entries is refused, in one line."""
    start = "0" if plan.to == "earliest" else plan.to
    return (
        f"group {plan.group}: {plan.handled} of the {plan.reread} entries the reset would "
        "re-read were already handled by it, and moving back would apply their effects again "
        f"(the consumer keeps no per-event marks): use 'streamproc replay {plan.group} --from "
        f"{start}' to re-deliver only the ones it did not handle, or --ignore-dedup to handle "
        "them all again"
    )


async def apply_reset(
    client: aioredis.Redis, keys: Keys, plan: ResetPlan, *, ignore_dedup: bool = False
) -> int:
    """Move the group on every topic that has a stream (creating it there at the target if
    it is missing). Returns how many re-read entries the group had handled (handled again).

    Raises HandledInRange, moving nothing, when re-read entries were already handled and
    ``ignore_dedup`` is not given."""
    if plan.handled and not ignore_dedup:
        raise HandledInRange(refusal(plan))
    for tr in plan.topics:
        if not tr.exists:
            continue
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
            "handled_again": tr.handled,
        }
        await _note(
            client,
            keys.replays(tr.topic, plan.group),
            {"resets": 1, "handled_again": tr.handled},
            summary,
        )
        log.info("group_reset", group=plan.group, topic=tr.topic, **summary)
    return plan.handled
