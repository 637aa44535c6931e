"""Each cluster's live feed over Server-Sent Events: ``GET /clusters/{cluster_id}/feed``.

Mounted on the ingest service by ``App(routes=[add_routes])`` (``add_routes(app, ingest,
settings=FeedSettings(...))`` for other limits). The feed is the stream
``feed_keys.feed_key(keys, cluster_id)``; this module only reads it.

Request
    ``Authorization: Bearer <token>``; the agent must ``may_read(cluster_id)`` (operators read
    every cluster, viewer tokens the clusters matching their patterns), else 403
    ``forbidden_cluster``. ``cluster_id``: 1-253 characters of letters, digits, ``_ . : -``,
    starting with a letter or digit (400 ``bad_cluster_id``, path ``path:cluster_id``).

    Where to start, first match wins:

    1. ``Last-Event-ID`` header (what EventSource sends when it reconnects: it wins over the
       query, which still holds the first connection's id);
    2. ``?last_event_id=`` (clients that cannot set headers);
    3. ``?from=now`` (default: new entries only) or ``?from=start`` (every entry kept).

    An id is ``<ms>-<seq>``, two decimal numbers of at most 20 digits and 2^64-1 (400
    ``bad_last_event_id``, path ``header:Last-Event-ID`` or ``query:last_event_id``); an empty
    one counts as absent. ``from`` is checked even when an id is given (400 ``bad_from``).
    The stream continues right after the id: nothing lost, nothing repeated.

Response (``text/event-stream``)
    First ``retry: <retry_ms>`` and ``id: <position>`` (no data: it sets EventSource's
    ``lastEventId``, so a client that reconnects before the first entry still resumes from the
    right place). Then each entry as ``id: <entry id>``, ``event: <type>``, ``data: <data>``
    (the entry's JSON as stored; an entry without ``type`` is sent as ``message``, without
    ``data`` as ``{}``). ``: keep-alive`` comes every ``heartbeat_s`` so proxies keep an idle
    stream open; the token is checked again then, so a revoked token or a narrowed viewer
    loses its feed within ``heartbeat_s`` (plus the ingest's ``auth_cache_s``).

    ``event: gap`` (``id:`` = the position after it) says entries the client had not seen are
    gone; data ``{"reason", "last_event_id", "resume_id"}``. ``reason`` ``trimmed``: the
    position is older than the oldest entry kept and the stream has lost entries (XINFO
    STREAM: ``entries-added`` > ``length``); the feed goes on from the oldest entry kept.
    Redis 7.0 does not record where a trim ended, so a client that had seen exactly the last
    entry trimmed gets a gap too (a false alarm, never a silent loss); a stream that never
    lost an entry never gives one. ``reset``: the position is newer than any entry the stream
    ever had (it was deleted, or the id came from elsewhere); the feed goes on from the
    stream's end. The check runs in the same MULTI as every read, so a trim that overtakes a
    connected client (one that is behind) is reported too. ``from=start`` gives no gap.

Reading Redis
    One task per process (``_Reader``, in ``notifications._feed_reader``) holds the only
    blocking command: an ``XREAD COUNT 1 BLOCK block_ms`` over every feed key open in the
    process, on a connection of its own made by the shared client's pool (``make_connection``:
    same address, credentials, TLS) but not counted in it, so feeds never starve the shared
    pool (``RedisSettings.max_connections``, 64) that POST /v1/events needs. It only wakes the
    feeds of a key that has new entries; each feed then reads its own entries on the shared
    client with a short MULTI (XINFO STREAM + ``XRANGE (<last> + COUNT read_count``) until it
    is level. A cluster nobody in the process watched before joins the reader's next round:
    its first entry can take up to ``block_ms``.

Limits (``FeedSettings``)
    ``max_feeds`` open feeds per process (503 ``too_many_feeds``) and ``max_feeds_per_agent``
    per token per process (429 ``too_many_feeds_for_agent``), both with Retry-After
    ``retry_after_s``. The counts live in memory: with N ingest replicas an agent holds at most
    N x ``max_feeds_per_agent``. A client that does not take a write within
    ``write_timeout_s`` is dropped.

Ending
    A feed ends cleanly (the chunked body is finished; EventSource reconnects after
    ``retry_ms`` with Last-Event-ID): when Redis fails (before the stream starts that is 503
    ``redis_unavailable``), when the client went away, when the token no longer reads the
    cluster, and when the ingest drains: ``Ingest.drain`` sets ``ingest.draining``, which an
    idle feed looks at every ``check_s`` (it has no event to wait on), so open feeds end
    within about ``check_s`` and hold the drain up no longer. A request arriving while
    draining gets 503 ``draining``. The app's shutdown signal ends them at once. A browser's
    EventSource reconnects by itself after a clean end but gives up on any answer other than
    200 (401, 403, 429, 503): a page reopens it itself after Retry-After.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from typing import Any, NamedTuple

import structlog
from aiohttp import web
from prometheus_client import Gauge
from redis.exceptions import RedisError

from notifications._feed_reader import (
    _MAX_PART,
    _ZERO,
    StreamId,
    _event,
    _gap_event,
    _Info,
    _info,
    _Reader,
    _reply_id,
    _text,
    gap,
    parse_id,
)
from notifications.feed_keys import feed_key
from streamproc._aio import wait_event
from streamproc.connection import REDIS_DOWN
from streamproc.ingest import Ingest
from streamproc.ingest._http import Problem, redis_unavailable
from streamproc.settings import _Settings

# parse_id and gap (now in _feed_reader) stay importable from here.
__all__ = ("FeedSettings", "add_routes", "gap", "parse_id")

log = structlog.get_logger("notifications.feed")

FEEDS_OPEN = Gauge("streamproc_notify_feeds_open", "Live cluster feeds (SSE) open in this process")

_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
_CLUSTER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:\-]{0,252}")
_HEARTBEAT = b": keep-alive\n\n"
_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-store",
    "X-Accel-Buffering": "no",  # nginx: pass each event on at once
    "X-Content-Type-Options": "nosniff",
}


class FeedSettings(_Settings, frozen=True, kw_only=True):
    #: Open feeds one process serves at once; past it a new feed gets 503 and Retry-After.
    max_feeds: int = 1000
    #: Open feeds one agent (token) holds in one process; past it 429 and Retry-After.
    max_feeds_per_agent: int = 20
    #: Retry-After (seconds) of those two refusals and of ``draining``.
    retry_after_s: int = 5
    #: Entries read (XRANGE COUNT) and written to the client per round trip.
    read_count: int = 100
    #: The process's reader: XREAD BLOCK per round. A cluster joins at the next round.
    block_ms: int = 1000
    #: An idle feed checks this often whether the ingest drains or its client left.
    check_s: float = 1.0
    #: A ``: keep-alive`` comment this often; the token is checked again then.
    heartbeat_s: float = 15.0
    #: The client's reconnection delay (SSE ``retry:``), in milliseconds.
    retry_ms: int = 3000
    #: A client that takes longer than this to accept a write is dropped.
    write_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        self._positive("max_feeds", "max_feeds_per_agent", "retry_after_s", "read_count")
        self._positive("block_ms", "check_s", "heartbeat_s", "retry_ms", "write_timeout_s")


def add_routes(
    app: web.Application, ingest: Ingest, *, settings: FeedSettings | None = None
) -> None:
    """Add ``GET /clusters/{cluster_id}/feed`` (an ``App(routes=...)`` hook)."""
    feeds = _Feeds(ingest, settings or FeedSettings())
    app.router.add_get("/clusters/{cluster_id}/feed", feeds.handle, allow_head=False)
    app.on_shutdown.append(feeds.shutdown)
    app.on_cleanup.append(feeds.cleanup)


# ---------------------------------------------------------------------- input


def _cluster_id(raw: str) -> str:
    if not _CLUSTER_RE.fullmatch(raw):
        raise Problem(
            400,
            "bad_cluster_id",
            "cluster_id must be 1-253 characters of letters, digits, '_', '.', ':', '-', "
            "starting with a letter or digit",
            path="path:cluster_id",
        )
    return raw


class _Start(NamedTuple):
    #: The client's position, or None for ``from`` (then ``from_start`` says which).
    after: StreamId | None
    from_start: bool


def _start(request: web.Request) -> _Start:
    origin = request.query.get("from", "now")
    if origin not in ("now", "start"):
        raise Problem(400, "bad_from", "from must be 'now' or 'start'", path="query:from")
    for where, raw in (
        ("header:Last-Event-ID", request.headers.get("Last-Event-ID")),
        ("query:last_event_id", request.query.get("last_event_id")),
    ):
        if not raw:
            continue
        after = parse_id(raw)
        if after is None:
            raise Problem(
                400,
                "bad_last_event_id",
                "a last event id is a stream entry id '<ms>-<seq>': two decimal numbers of "
                "at most 20 digits and 2^64-1 each, e.g. 1700000000000-0",
                path=where,
            )
        return _Start(after, from_start=False)
    return _Start(None, from_start=origin == "start")


# ---------------------------------------------------------------------- the route


class _Feed:
    """One open feed: where it is and who reads it."""

    __slots__ = ("agent", "cluster_id", "key", "last", "removed", "sent", "token")

    def __init__(self, agent: str, token: str, cluster_id: str, key: str) -> None:
        self.agent, self.token, self.cluster_id, self.key = agent, token, cluster_id, key
        self.last: StreamId = _ZERO
        #: The stream's removed count at this feed's last read; None before one.
        self.removed: int | None = None
        self.sent = 0


class _Feeds:
    """The feed handler and what its feeds share (one per app)."""

    def __init__(self, ingest: Ingest, settings: FeedSettings) -> None:
        self.ingest, self.settings = ingest, settings
        self.reader = _Reader(ingest.client, settings.block_ms)
        self.open = 0
        self.by_agent: Counter[str] = Counter()
        self.closing = False

    async def shutdown(self, app: web.Application) -> None:
        self.closing = True
        self.reader.wake_all()

    async def cleanup(self, app: web.Application) -> None:
        await self.reader.stop()

    # ------------------------------------------------------------------ admission

    def _take(self, agent: str) -> None:
        s = self.settings
        retry = {"Retry-After": str(s.retry_after_s)}
        if self.open >= s.max_feeds:
            raise Problem(
                503,
                "too_many_feeds",
                f"this server has {self.open} feeds open, its limit; retry elsewhere or later",
                headers=retry,
                limit=s.max_feeds,
            )
        if self.by_agent[agent] >= s.max_feeds_per_agent:
            raise Problem(
                429,
                "too_many_feeds_for_agent",
                f"agent {agent!r} has {self.by_agent[agent]} feeds open here, its limit",
                headers=retry,
                limit=s.max_feeds_per_agent,
            )
        self.open += 1
        self.by_agent[agent] += 1
        FEEDS_OPEN.inc()

    def _give(self, agent: str) -> None:
        self.open -= 1
        self.by_agent[agent] -= 1
        if not self.by_agent[agent]:
            del self.by_agent[agent]
        FEEDS_OPEN.dec()

    # ------------------------------------------------------------------ handler

    async def handle(self, request: web.Request) -> web.StreamResponse:
        agent = await self.ingest.authenticate(request)
        cluster_id = _cluster_id(request.match_info["cluster_id"])
        if not agent.may_read(cluster_id):
            raise Problem(
                403,
                "forbidden_cluster",
                f"agent {agent.name!r} may not read the feed of cluster {cluster_id!r}",
            )
        start = _start(request)
        if self.ingest.draining or self.closing:
            raise Problem(
                503,
                "draining",
                "this server is shutting down; reconnect",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        token = request.headers["Authorization"].partition(" ")[2].strip()
        feed = _Feed(agent.name, token, cluster_id, feed_key(self.ingest.keys, cluster_id))
        self._take(agent.name)
        try:
            try:  # the first read decides the position; failing here is a plain 503
                first = await self._first(feed, start)
            except _REDIS_FAILED as e:
                raise redis_unavailable(self.ingest.settings.retry_after_s, e) from e
            response = web.StreamResponse(headers=_HEADERS)
            await response.prepare(request)
            log.debug("feed_open", agent=feed.agent, cluster_id=cluster_id)
            reason = await self._stream(request, response, feed, first)
            log.info(
                "feed_closed",
                agent=feed.agent,
                cluster_id=cluster_id,
                reason=reason,
                sent=feed.sent,
                last_event_id=_text(feed.last),
            )
            return response
        finally:
            self._give(agent.name)

    async def _first(self, feed: _Feed, start: _Start) -> bytes:
        """The stream's opening: retry, position, any gap and the first entries."""
        if start.after is None and not start.from_start:  # from=now: the end, in one MULTI
            info, _ = await self._fetch(feed.key, None)
            feed.last, feed.removed = info.last_generated, info.removed
            return self._opening(feed.last)
        position = feed.last = _ZERO if start.after is None else start.after
        chunk, _ = await self._read(feed, check_gap=not start.from_start)
        return self._opening(position) + chunk

    def _opening(self, position: StreamId) -> bytes:
        return f"retry: {self.settings.retry_ms}\nid: {_text(position)}\n\n".encode()

    async def _fetch(self, key: str, after: StreamId | None) -> tuple[_Info, list[Any]]:
        """XINFO STREAM and the entries after ``after`` (none when None), in one MULTI."""
        pipe = self.ingest.client.pipeline(transaction=True)
        pipe.xinfo_stream(key)
        if after is not None and after != (_MAX_PART, _MAX_PART):  # nothing is after the max
            pipe.xrange(key, min="(" + _text(after), count=self.settings.read_count)
        replies = await pipe.execute(raise_on_error=False)
        info = _info(replies[0])
        if len(replies) == 1:
            return info, []
        if isinstance(replies[1], BaseException):
            raise replies[1]
        return info, list(replies[1])

    async def _read(self, feed: _Feed, *, check_gap: bool = True) -> tuple[bytes, bool]:
        """One read after ``feed.last``: the bytes to send and whether more may be waiting."""
        after = feed.last
        info, rows = await self._fetch(feed.key, after)
        parts: list[bytes] = []
        found = gap(after, info, feed.removed) if check_gap else None
        feed.removed = info.removed
        if found is not None:
            reason, feed.last = found
            parts.append(_gap_event(reason, after, feed.last))
            log.info(
                "feed_gap",
                agent=feed.agent,
                cluster_id=feed.cluster_id,
                reason=reason,
                last_event_id=_text(after),
                resume_id=_text(feed.last),
            )
            if reason == "reset":
                return b"".join(parts), True  # the range was read from beyond the end
        for entry_id, fields in rows:
            parts.append(_event(entry_id, fields))
        if rows:
            feed.last = _reply_id(rows[-1][0])
            feed.sent += len(rows)
        return b"".join(parts), len(rows) >= self.settings.read_count

    async def _stream(
        self,
        request: web.Request,
        response: web.StreamResponse,
        feed: _Feed,
        first: bytes,
    ) -> str:
        """Send entries until the feed must end; why it ended."""
        s = self.settings
        loop = asyncio.get_running_loop()
        if failed := await self._write(response, first):
            return failed
        next_beat = loop.time() + s.heartbeat_s
        watch = self.reader.watch(feed.key, feed.last)
        # Entries may have come between the first read and the watch: read once more.
        behind, event = True, watch.event
        try:
            while True:
                if self.ingest.draining or self.closing:
                    return "draining"
                if watch.broken:
                    return "redis_unavailable"
                transport = request.transport
                if transport is None or transport.is_closing():
                    return "client_gone"
                out = b""
                now = loop.time()
                if now >= next_beat:
                    if refused := await self._refused(feed):
                        return refused
                    out, next_beat = _HEARTBEAT, now + s.heartbeat_s
                if behind or event.is_set():
                    event = watch.event  # before the read: a wake during it is not lost
                    try:
                        chunk, behind = await self._read(feed)
                    except _REDIS_FAILED as e:
                        log.warning("feed_read_failed", cluster_id=feed.cluster_id, error=str(e))
                        return "redis_unavailable"
                    # Level: feed.last is the tail now (lower after a reset); behind: a floor.
                    watch.position = max(watch.position, feed.last) if behind else feed.last
                    out += chunk
                if out and (failed := await self._write(response, out)):
                    return failed
                if not behind and not event.is_set():
                    await wait_event(event, min(s.check_s, max(next_beat - loop.time(), 0.0)))
        finally:
            self.reader.unwatch(feed.key, watch)

    async def _write(self, response: web.StreamResponse, data: bytes) -> str | None:
        """Send ``data``; why the feed must end when it could not be sent."""
        try:
            async with asyncio.timeout(self.settings.write_timeout_s):
                await response.write(data)
        except ConnectionError:
            return "client_gone"
        except TimeoutError:
            return "slow_client"
        return None

    async def _refused(self, feed: _Feed) -> str | None:
        """Why the feed's token may no longer read it (the heartbeat's check), or None."""
        try:
            agent = await self.ingest.agents.authenticate(feed.token)
        except _REDIS_FAILED:
            return "redis_unavailable"
        return None if agent is not None and agent.may_read(feed.cluster_id) else "not_allowed"
