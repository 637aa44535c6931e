"""The dashboard's HTTP routes, mounted on the ingest app by ``add_dashboard``.

| route | who | what |
|---|---|---|
| ``GET /dashboard`` | session | the page (the login form without a session) |
| ``POST /dashboard/login`` | operator token (form ``token``) | cookie, 303 to the page |
| ``POST /dashboard/logout`` | session + CSRF | ends the session |
| ``GET /dashboard/events`` | session | SSE: ``event: snapshot`` every ``interval_s`` |
| ``GET /dashboard/api/snapshot`` | session | one snapshot (JSON) |
| ``GET /dashboard/api/dlq?topic=&group=[&reason=&type=]`` | session | oldest dead letters |
| ``POST /dashboard/api/dlq/replay`` | session + CSRF | ``{topic, group, ids}`` → retry stream |
| ``GET /dashboard/api/tasks?status=&type=`` | session | tasks: queued/running, then finished |
| ``POST /dashboard/api/tasks/cancel`` | session + CSRF | ``{id}``: cancel as ``DELETE /v1/tasks`` |
| ``GET /dashboard/static/{name}`` | — | the page's JS and CSS (package data; no data in them) |

Refused logins count per client address (``DashboardSettings.login_failures_*``); past the
budget ``POST /dashboard/login`` answers 429 with Retry-After before looking at the token.
The client address and the scheme come from the connection, or from ``X-Forwarded-For`` and
``X-Forwarded-Proto`` when the connection comes from one of ``trusted_proxies``.

While Redis does not answer, ``GET /dashboard`` cannot check the session: it answers 503 with
a small HTML page (no figures, no session data) that says since when and reloads itself,
never the API's JSON problem.
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import msgspec
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from streamproc import dlq
from streamproc.concern import Concern
from streamproc.config import settings_from_env
from streamproc.connection import REDIS_DOWN
from streamproc.dashboard.panels import Panel, PanelReader
from streamproc.dashboard.session import COOKIE, NotOperator, Session, SessionStore, csrf_ok
from streamproc.dashboard.snapshot import Sampler
from streamproc.errors import ConfigError
from streamproc.ingest._http import Problem, json_response, redis_unavailable
from streamproc.ingest.auth import AgentStore
from streamproc.ingest.ratelimit import FailureThrottle
from streamproc.inspect import LimitsOf, limits_of
from streamproc.keys import Keys, check_name
from streamproc.schedule import Schedule
from streamproc.settings import _Settings

__all__ = (
    "DASHBOARD",
    "Dashboard",
    "DashboardSettings",
    "add_dashboard",
    "dashboard_settings_from_env",
)

log = structlog.get_logger("streamproc.dashboard")

_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)
_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class DashboardSettings(_Settings, frozen=True, kw_only=True):
    #: How often the page gets a snapshot (and the most often Redis is read for it).
    interval_s: float = 1.0
    #: A session ends this long after login.
    session_ttl_s: int = 8 * 3600
    #: Cookie ``Secure`` flag: True always, False never (plain HTTP on a trusted network).
    #: None (default): Secure when the request came over HTTPS (TLS on this socket, or
    #: ``X-Forwarded-Proto: https`` from a trusted proxy) or reached this host on an address
    #: that is not loopback; only a browser on this host over plain HTTP gets it without.
    secure_cookie: bool | None = None
    #: Reverse proxies whose ``X-Forwarded-Proto`` and ``X-Forwarded-For`` are believed:
    #: addresses or networks (``10.0.0.0/8``). Empty (default): those headers are ignored.
    trusted_proxies: tuple[str, ...] = ()
    #: Refused logins per client address: this many at once, then one per 1/refill s.
    login_failures_burst: int = 10
    login_failures_refill_per_s: float = 0.1
    #: Topics whose groups are shown as the render pool.
    render_topics: tuple[str, ...] = ("renders",)
    #: Dead letters listed per group.
    dlq_page: int = 50
    #: An application panel's read that takes longer shows an error in its panel.
    panel_timeout_s: float = 2.0

    def __post_init__(self) -> None:
        self._positive("interval_s", "session_ttl_s", "dlq_page", "panel_timeout_s")
        self._positive("login_failures_burst", "login_failures_refill_per_s")
        self.proxy_networks()  # a bad entry is a ConfigError now, not at the first request

    def proxy_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)
        except ValueError as e:
            raise ConfigError(f"DashboardSettings.trusted_proxies: {e}") from None


def dashboard_settings_from_env(env: Mapping[str, str]) -> DashboardSettings:
    """``STREAMPROC_DASHBOARD_<FIELD>`` (e.g. ``STREAMPROC_DASHBOARD_SECURE_COOKIE=true``,
    ``STREAMPROC_DASHBOARD_TRUSTED_PROXIES=127.0.0.1,10.0.0.0/8``); for the entry point."""
    return settings_from_env(DashboardSettings, "STREAMPROC_DASHBOARD_", env)


class _Replay(msgspec.Struct, forbid_unknown_fields=True):
    topic: str
    group: str
    ids: list[str]


class _Cancel(msgspec.Struct, forbid_unknown_fields=True):
    id: str


_TASK_STATUSES = ("queued", "running", "completed", "failed", "cancelled")


def _asset(name: str) -> bytes:
    return importlib.resources.files("streamproc.dashboard").joinpath("static", name).read_bytes()


class Dashboard:
    """The dashboard's handlers and what they share (one per app)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        keys: Keys,
        agents: AgentStore,
        settings: DashboardSettings | None = None,
        schedules: Sequence[Schedule] = (),
        panels: Sequence[Panel] = (),
        draining: Callable[[], bool] = lambda: False,
        limits: LimitsOf | None = None,
        memory_alert_ratio: float = 0.8,
    ) -> None:
        self.client, self.keys = client, keys
        self.settings = s = settings or DashboardSettings()
        self.sessions = SessionStore(client, keys, agents, ttl_s=s.session_ttl_s)
        self.sampler = Sampler(
            client,
            keys,
            interval_s=s.interval_s,
            schedules=schedules,
            render_topics=s.render_topics,
            panels=PanelReader(panels, timeout_s=s.panel_timeout_s) if panels else None,
            limits=limits or limits_of(),
            memory_alert_ratio=memory_alert_ratio,
        )
        self.draining = draining
        self._proxies = s.proxy_networks()
        #: Refused logins per client address.
        self.logins = FailureThrottle(
            burst=s.login_failures_burst, refill_per_s=s.login_failures_refill_per_s
        )
        self._page = _asset("index.html").decode()
        self._login = _asset("login.html").decode()
        self._replay_decoder = msgspec.json.Decoder(_Replay)
        self._cancel_decoder = msgspec.json.Decoder(_Cancel)
        #: Wall-clock time Redis last answered this process (for the outage page).
        self.redis_seen_at: float | None = None

    def add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/dashboard", self.page)
        router.add_post("/dashboard/login", self.login)
        router.add_post("/dashboard/logout", self.logout)
        router.add_get("/dashboard/events", self.events)
        router.add_get("/dashboard/api/snapshot", self.snapshot)
        router.add_get("/dashboard/api/dlq", self.dead_letters)
        router.add_post("/dashboard/api/dlq/replay", self.replay)
        router.add_get("/dashboard/api/tasks", self.tasks)
        router.add_post("/dashboard/api/tasks/cancel", self.cancel_task)
        router.add_get("/dashboard/static/{name}", self.static)

    # ------------------------------------------------------------------ auth

    async def _session(self, request: web.Request) -> Session | None:
        try:
            return await self.sessions.check(request.cookies.get(COOKIE))
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e

    async def _require(self, request: web.Request, *, change: bool = False) -> Session:
        """The request's session; for state changes also same origin and the CSRF header."""
        if change:
            _same_origin(request)
        session = await self._session(request)
        if session is None:
            raise Problem(401, "unauthorized", "no dashboard session: log in at /dashboard")
        if change and not csrf_ok(session, request.headers.get("X-CSRF-Token")):
            raise Problem(403, "csrf", "missing or wrong X-CSRF-Token")
        return session

    def _html(
        self, body: str, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        return web.Response(
            text=body,
            status=status,
            content_type="text/html",
            headers={**_SECURITY_HEADERS, **(headers or {})},
        )

    def _login_page(
        self, message: str = "", *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        return self._html(self._login.replace("{{message}}", note), status=status, headers=headers)

    # ------------------------------------------------------------------ the client

    def _proxied(self, request: web.Request) -> bool:
        """The connection comes from a trusted proxy (so its X-Forwarded-* are believed)."""
        return self._proxies != () and _in(request.remote, self._proxies)

    def client_address(self, request: web.Request) -> str:
        """The client's address: the peer's, or behind trusted proxies the nearest address
        in ``X-Forwarded-For`` that is not one of them."""
        peer = request.remote or ""
        if not self._proxied(request):
            return peer
        hops = [
            h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")
        ]
        for hop in reversed([h for h in hops if h]):
            if not _in(hop, self._proxies):
                return hop
        return peer

    def cookie_secure(self, request: web.Request) -> bool:
        """Whether the session cookie gets ``Secure`` (see ``DashboardSettings.secure_cookie``)."""
        if self.settings.secure_cookie is not None:
            return self.settings.secure_cookie
        if request.transport is not None and request.transport.get_extra_info("sslcontext"):
            return True
        if self._proxied(request):
            # the value the nearest proxy (the one we trust) set or appended last
            proto = request.headers.get("X-Forwarded-Proto", "").rpartition(",")[2]
            if proto.strip().lower() == "https":
                return True
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        local = sockname[0] if isinstance(sockname, tuple) and sockname else None
        return isinstance(local, str) and not _loopback(local)

    def _outage_page(self) -> web.Response:
        """503 HTML while Redis does not answer: when it last did, and a reload every 5 s."""
        seen = self.redis_seen_at
        since = (
            datetime.fromtimestamp(seen, UTC).strftime("%H:%M:%S UTC")
            if seen is not None
            else "this process started"
        )
        body = (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            '<meta http-equiv="refresh" content="5"><title>streamproc dashboard</title>'
            '<link rel="stylesheet" href="/dashboard/static/dashboard.css"></head>'
            '<body class="login"><div class="login-box" data-testid="outage">'
            "<h1>streamproc</h1>"
            '<p class="error" role="alert">The event store (Redis) does not answer: figures '
            f"as of {html.escape(since)}.</p>"
            '<p class="hint">This page reloads every 5 s and shows the dashboard again as soon '
            "as Redis answers.</p></div></body></html>"
        )
        return self._html(body, status=503, headers={"Retry-After": "5"})

    async def page(self, request: web.Request) -> web.Response:
        try:
            session = await self.sessions.check(request.cookies.get(COOKIE))
        except _REDIS_FAILED as e:
            log.warning("dashboard_page_redis_down", error=str(e))
            return self._outage_page()
        if session is None:
            return self._login_page()
        body = self._page.replace("{{csrf}}", html.escape(session.csrf, quote=True))
        return self._html(body.replace("{{agent}}", html.escape(session.agent)))

    async def login(self, request: web.Request) -> web.Response:
        _same_origin(request)
        client = self.client_address(request)
        wait_s = self.logins.retry_after_s(client)
        if wait_s:  # before reading the form: a refused client costs no lookup
            return self._login_page(
                f"Too many refused logins from this address: try again in {wait_s} s.",
                status=429,
                headers={"Retry-After": str(wait_s)},
            )
        form = await request.post()
        token = form.get("token")
        if not isinstance(token, str) or not token.strip():
            return self._login_page("Enter an operator token.", status=400)
        try:
            made = await self.sessions.login(token.strip())
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e
        except NotOperator as e:  # a valid token: its holder learns nothing new from this
            self.logins.failed(client)
            log.warning("dashboard_login_refused", remote=client, agent=e.agent, operator=False)
            return self._login_page(
                f"The token of agent {e.agent!r} lacks --operator: the dashboard needs an "
                "operator token (streamproc agents add NAME --operator).",
                status=403,
            )
        if made is None:
            self.logins.failed(client)
            log.warning("dashboard_login_refused", remote=client)
            return self._login_page("Unknown or revoked token.", status=401)
        sid, session = made
        log.info("dashboard_login", agent=session.agent, remote=client)
        response = web.Response(status=303, headers={"Location": "/dashboard", **_SECURITY_HEADERS})
        response.set_cookie(
            COOKIE,
            sid,
            path="/dashboard",
            max_age=self.settings.session_ttl_s,
            httponly=True,
            samesite="Strict",
            secure=self.cookie_secure(request),
        )
        return response

    async def logout(self, request: web.Request) -> web.Response:
        session = await self._require(request, change=True)
        await self.sessions.logout(request.cookies.get(COOKIE))
        log.info("dashboard_logout", agent=session.agent)
        response = json_response({"logged_out": True}, headers=_SECURITY_HEADERS)
        response.del_cookie(COOKIE, path="/dashboard")
        return response

    # ------------------------------------------------------------------ data

    async def _encoded(self) -> bytes:
        try:
            data = await self.sampler.encoded()
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e
        self.redis_seen_at = time.time()
        return data

    async def snapshot(self, request: web.Request) -> web.Response:
        await self._require(request)
        return web.Response(
            body=await self._encoded(), content_type="application/json", headers=_SECURITY_HEADERS
        )

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: a snapshot now, then one every ``interval_s``.

        The session is checked before every message, so a logout or a revoked agent ends
        the stream within one interval; so does the ingest's shutdown (drain).
        """
        await self._require(request)
        sid = request.cookies.get(COOKIE)
        response = web.StreamResponse(
            headers={
                **_SECURITY_HEADERS,
                "Content-Type": "text/event-stream",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        try:
            await response.write(b"retry: 2000\n\n")
            while not self.draining():
                try:
                    if await self.sessions.check(sid) is None:
                        await response.write(b"event: logout\ndata: {}\n\n")
                        break
                    data = await self.sampler.encoded()
                    self.redis_seen_at = time.time()
                    await response.write(b"event: snapshot\ndata: " + data + b"\n\n")
                except _REDIS_FAILED as e:
                    log.warning("dashboard_snapshot_failed", error=str(e))  # where: logs only
                    message = msgspec.json.encode(
                        {"error": "redis_unavailable", "detail": "the event store does not answer"}
                    )
                    await response.write(b"event: problem\ndata: " + message + b"\n\n")
                await asyncio.sleep(self.settings.interval_s)
        except (ConnectionResetError, ConnectionError):
            pass  # the page went away
        return response

    async def dead_letters(self, request: web.Request) -> web.Response:
        """A group's dead letters, oldest first (``dlq_page`` at most); ``reason`` and
        ``type`` (repeatable) filter them; ``total``: the group's, ``matching``: the filter's."""
        await self._require(request)
        query = request.query
        concern = _concern(query.get("topic", ""), query.get("group", ""))
        reasons = [r for r in query.getall("reason", []) if r]
        types = [t for t in query.getall("type", []) if t]
        page = self.settings.dlq_page
        try:
            letters = await dlq.dead_letters(
                self.client,
                self.keys,
                concern,
                count=None if reasons or types else page,
                types=types,
                reasons=reasons,
            )
            total = await dlq.total(self.client, self.keys, concern)
            replayed = await dlq.replayed_count(self.client, self.keys, concern)
            seconds, micros = await self.client.time()
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e
        now_ms = int(seconds) * 1000 + int(micros) // 1000
        return json_response(
            {
                "topic": concern.topics[0],
                "group": concern.group,
                "total": total,
                "matching": len(letters) if reasons or types else total,
                "replayed": replayed,
                "reasons": list(dlq.REASONS),
                "entries": [_letter(d, now_ms) for d in letters[:page]],
            },
            headers=_SECURITY_HEADERS,
        )

    async def replay(self, request: web.Request) -> web.Response:
        """Replay dead letters into the group's own retry stream (only that group sees them)."""
        session = await self._require(request, change=True)
        if request.content_type != "application/json":
            raise Problem(415, "unsupported_media_type", "send application/json")
        try:
            body = self._replay_decoder.decode(await request.read())
        except msgspec.DecodeError as e:
            raise Problem(400, "invalid", str(e)) from None
        concern = _concern(body.topic, body.group)
        if not body.ids or len(body.ids) > 1000:
            raise Problem(400, "invalid", "ids: 1 to 1000 dead-letter entry ids")
        try:
            letters = []
            for dlq_id in dict.fromkeys(body.ids):
                rows: Any = await self.client.xrange(
                    self.keys.dlq(body.topic, body.group), min=dlq_id, max=dlq_id
                )
                letters += [dlq.DeadLetter(body.topic, i.decode(), f) for i, f in rows]
            new_ids = await dlq.replay(self.client, self.keys, concern, letters)
        except _REDIS_FAILED as e:
            if "Invalid stream ID" in str(e):
                raise Problem(400, "invalid", f"not a stream entry id: {e}") from None
            raise redis_unavailable(1, e) from e
        log.info(
            "dashboard_replay",
            agent=session.agent,
            topic=body.topic,
            group=body.group,
            asked=len(body.ids),
            replayed=len(new_ids),
        )
        return json_response(
            {"replayed": len(new_ids), "entry_ids": new_ids}, headers=_SECURITY_HEADERS
        )

    async def tasks(self, request: web.Request) -> web.Response:
        """Tasks for the Tasks view: ``status`` and ``type`` (repeatable) filter them; queued
        and running first, then finished, newest first (``dlq_page`` at most)."""
        from streamproc.tasks.panel import task_rows  # here: tasks import the dashboard's panels

        await self._require(request)
        statuses = [x for x in request.query.getall("status", []) if x]
        if any(x not in _TASK_STATUSES for x in statuses):
            raise Problem(400, "invalid", f"status must be one of {', '.join(_TASK_STATUSES)}")
        types = [x for x in request.query.getall("type", []) if x]
        try:
            rows, active = await task_rows(
                self.client, self.keys, statuses=statuses, types=types, limit=self.settings.dlq_page
            )
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e
        return json_response(
            {"active": active, "tasks": msgspec.to_builtins(rows)}, headers=_SECURITY_HEADERS
        )

    async def cancel_task(self, request: web.Request) -> web.Response:
        """Cancel a task as ``DELETE /v1/tasks/{id}`` does, recorded as cancelled by the
        operator: a queued one ends now (200), a running one is asked to stop (202)."""
        from streamproc.tasks.panel import cancel_task

        session = await self._require(request, change=True)
        if request.content_type != "application/json":
            raise Problem(415, "unsupported_media_type", "send application/json")
        try:
            body = self._cancel_decoder.decode(await request.read())
        except msgspec.DecodeError as e:
            raise Problem(400, "invalid", str(e)) from None
        if not body.id or len(body.id) > 200:
            raise Problem(400, "invalid", "id: a task id")
        try:
            verdict = await cancel_task(self.client, self.keys, body.id, by=session.agent)
        except _REDIS_FAILED as e:
            raise redis_unavailable(1, e) from e
        log.info("dashboard_task_cancel", agent=session.agent, task_id=body.id, verdict=verdict)
        if verdict == "missing":
            raise Problem(404, "not_found", f"no task {body.id!r} (or it expired)")
        if verdict in ("completed", "failed"):
            raise Problem(409, "already_finished", f"task {body.id} is {verdict}")
        return json_response(
            {"id": body.id, "verdict": verdict},
            status=202 if verdict == "cancelling" else 200,
            headers=_SECURITY_HEADERS,
        )

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in _STATIC:
            raise Problem(404, "not_found", f"no asset {name!r}")
        return web.Response(
            body=_asset(name),
            content_type=_STATIC[name],
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"},
        )


def _same_origin(request: web.Request) -> None:
    """Refuse a cross-site state change: ``Origin`` (when sent) must name this host."""
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        raise Problem(403, "cross_origin", "cross-site requests are refused")
    origin = request.headers.get("Origin")
    if origin is not None and urlsplit(origin).netloc != request.host:
        raise Problem(403, "cross_origin", f"Origin {origin!r} is not this site")


def _in(
    address: str | None, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> bool:
    try:
        ip = ipaddress.ip_address((address or "").split("%", 1)[0])
    except ValueError:
        return False
    return any(ip in n for n in networks)


def _loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def _concern(topic: str, group: str) -> Concern:
    try:
        return Concern(group=check_name("group", group), topics=(topic,), handlers={})
    except ConfigError as e:
        raise Problem(400, "invalid", str(e)) from None


def _letter(d: dlq.DeadLetter, now_ms: int) -> dict[str, Any]:
    """One dead letter for the page: the table's columns, and on expand the payload (indented
    JSON, or as stored) and the full error."""
    pretty = d.payload()
    return {
        "dlq_id": d.dlq_id,
        "id": d.get("id"),
        "type": d.get("type"),
        "key": d.get("key"),
        "reason": d.reason,
        "undecodable": d.undecodable,
        "error_type": d.get("dlq_error_type"),
        "error": d.get("dlq_error"),
        "attempts": d.get("dlq_attempts"),
        "deliveries": d.get("dlq_deliveries"),
        "consumer": d.get("dlq_consumer"),
        "entry_id": d.get("dlq_entry_id"),
        "at": d.get("dlq_at"),
        "age_s": max(now_ms - d.at_ms, 0) // 1000,
        "payload": pretty if pretty is not None else d.get("data"),
    }


DASHBOARD: web.AppKey[Dashboard] = web.AppKey("dashboard", Dashboard)


def add_dashboard(
    app: web.Application,
    *,
    client: aioredis.Redis,
    keys: Keys,
    agents: AgentStore,
    settings: DashboardSettings | None = None,
    schedules: Sequence[Schedule] = (),
    panels: Sequence[Panel] = (),
    draining: Callable[[], bool] = lambda: False,
    limits: LimitsOf | None = None,
    memory_alert_ratio: float = 0.8,
) -> Dashboard:
    """Add the dashboard's routes to ``app`` (the ingest app); returns the Dashboard.

    ``schedules``: the application's ticker table (``App.schedules``), for next fire times.
    ``panels``: the application's panels (``App.panels``), each a table on the page.
    ``limits``: each group's limits (``inspect.limits_of(app.concerns)``); the defaults when
    None. ``memory_alert_ratio``: the Redis memory card is high at or above it
    (``RedisSettings.memory_alert_ratio``).
    """
    dashboard = Dashboard(
        client=client,
        keys=keys,
        agents=agents,
        settings=settings,
        schedules=schedules,
        panels=panels,
        draining=draining,
        limits=limits,
        memory_alert_ratio=memory_alert_ratio,
    )
    app[DASHBOARD] = dashboard
    dashboard.add_routes(app.router)
    return dashboard
