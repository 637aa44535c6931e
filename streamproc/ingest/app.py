"""The ingest service: agents POST events, operators submit tasks (aiohttp).

Each request: authenticate (bearer token) → check the Content-Type → read the body within
the size limit → decode and validate every item (all-or-nothing) → check the agent's scopes →
take from the agent's rate bucket → stamp ``source`` and ``received_at`` → publish in one
pipeline → 202 with the event ids and entry ids. A 202 is sent only after Redis answered the
XADDs. Every refusal is a JSON body ``{"error", "detail", "path"?}`` with a precise status; an
unexpected exception is logged and answered 500 without stopping the server.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec
import redis.asyncio as aioredis
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from streamproc import tracing
from streamproc._aio import wait_event
from streamproc.codec import Registry
from streamproc.connection import REDIS_DOWN
from streamproc.errors import BackpressureError, PublishError
from streamproc.event import Event
from streamproc.groups import group_infos
from streamproc.ingest import metrics
from streamproc.ingest._http import (
    SERVER_NAME,
    Problem,
    idempotency_key,
    json_response,
    redis_unavailable,
    trace_requests,
)
from streamproc.ingest._serve import Connections, fd_cap
from streamproc.ingest.auth import Agent, AgentStore, AuthThrottled
from streamproc.ingest.compat import add_compat_routes
from streamproc.ingest.decode import CONTENT_TYPES, EventDecoder, ItemError, Prepare
from streamproc.ingest.openapi import build_spec
from streamproc.ingest.ratelimit import RateLimiter
from streamproc.ingest.schedules import ScheduleApi
from streamproc.ingest.settings import IngestSettings
from streamproc.ingest.tasks import TaskApi
from streamproc.keys import Keys
from streamproc.printable import CONTROL_CHARS
from streamproc.producer import Producer
from streamproc.schedule import Schedule
from streamproc.tasks.events import TaskRequested
from streamproc.tasks.runner import TaskType

if TYPE_CHECKING:
    from streamproc.dashboard.panels import Panel
    from streamproc.dashboard.routes import DashboardSettings
    from streamproc.inspect import LimitsOf

__all__ = ("INGEST", "Ingest", "agent_event_id", "create_app", "idem_marker")

log = structlog.get_logger("streamproc.ingest")

#: Namespace of event ids derived from an Idempotency-Key.
_IDEM_NS = uuid.UUID("0b7f4d2e-5c1a-4e8b-9f3d-6a2c8e1b7d40")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
_REDIS_FAILED: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisError)


class Ingest:
    """The request handlers and what they share (one per process)."""

    def __init__(
        self,
        *,
        client: aioredis.Redis,
        registry: Registry[Any],
        keys: Keys,
        producer: Producer,
        settings: IngestSettings | None = None,
        task_types: Mapping[str, TaskType] | None = None,
        groups: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.client, self.keys, self.producer = client, keys, producer
        self.settings = s = settings or IngestSettings()
        #: Agents post every registered type except task requests (those enter by /v1/tasks)
        #: and the application's internal events (``Event.external`` False).
        self.event_types: list[type[Event]] = [
            t for t in registry.by_name.values() if t.external and not issubclass(t, TaskRequested)
        ]
        self.decoder = EventDecoder(self.event_types, max_batch=s.max_batch)
        self.agents = AgentStore(client, keys, cache_s=s.auth_cache_s)
        self.limiter = RateLimiter(
            client, keys, rate_per_s=s.rate_events_per_s, burst=s.rate_burst, lease_s=s.rate_lease_s
        )
        #: topic → the groups that must exist for /readyz.
        self.groups = dict(groups or {})
        self.tasks = TaskApi(self, task_types or {})
        self.schedules = ScheduleApi(self, registry)
        self._scopes: dict[tuple[str, ...], dict[str, bool]] = {}
        #: Requests being handled; ``drain`` waits for none.
        self.in_flight = 0
        #: Bytes of request bodies read and not yet answered (``max_inflight_bytes``).
        self.body_bytes = 0
        #: Connections of a ``GuardedSite`` (header deadline, cap); the middleware tells it
        #: when a request's headers are complete and when its answer is made.
        self.connections = Connections(
            header_read_timeout_s=s.header_read_timeout_s,
            max_connections=fd_cap(s.max_connections),
        )
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()
        self.spec = msgspec.json.encode(
            build_spec(self.event_types, task_types or {}, max_batch=s.max_batch)
        )

    async def drain(self, timeout_s: float) -> bool:
        """After the listener closed: let in-flight requests finish; True if all did.

        aiohttp's own shutdown drops the rest of a body still arriving, so this waits first,
        with connections open; answers given meanwhile close their connection.
        """
        self.draining = True
        if not await wait_event(self._idle, timeout_s):
            log.warning("drain_timeout", in_flight=self.in_flight)
            return False
        return True

    def _enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def _leave(self) -> None:
        self.in_flight -= 1
        if not self.in_flight:
            self._idle.set()

    # ------------------------------------------------------------------ shared steps

    async def authenticate(self, request: web.Request, *, operator: bool = False) -> Agent:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": 'Bearer realm="streamproc"'}
        if scheme.lower() != "bearer" or not token.strip():
            raise Problem(401, "unauthorized", "missing bearer token", headers=challenge)
        try:
            agent = await self.agents.authenticate(token.strip(), client=request.remote or "")
        except AuthThrottled as e:  # counted by the rejections metric; not logged (a flood)
            raise Problem(
                429,
                "too_many_failures",
                f"too many unknown tokens from this address; retry in {e.retry_after_s}s",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.settings.retry_after_s, e) from e
        if agent is None:
            raise Problem(401, "unauthorized", "unknown or revoked token", headers=challenge)
        if operator and not agent.operator:
            raise Problem(403, "forbidden", f"agent {agent.name!r} is not an operator")
        return agent

    def body_format(self, request: web.Request, allowed: Sequence[str] | None = None) -> str:
        """The body's format from its Content-Type (absent = JSON); else 415."""
        raw = request.headers.get("Content-Type")
        if raw is None:
            return "json"
        fmt = CONTENT_TYPES.get(raw)  # the usual bare value: no parsing
        if fmt is None:
            fmt = CONTENT_TYPES.get(request.content_type)
        if fmt is None or (allowed is not None and fmt not in allowed):
            accepted = [t for t, f in CONTENT_TYPES.items() if allowed is None or f in allowed]
            raise Problem(
                415,
                "unsupported_media_type",
                f"Content-Type {request.content_type!r} is not accepted; use one of "
                + ", ".join(accepted),
                accepted=accepted,
            )
        return fmt

    async def read_body(self, request: web.Request) -> bytes:
        """The body, refused with 413 past max_body_bytes (declared, streamed or decompressed).

        The bytes count against the process's ``max_inflight_bytes`` until the request ends
        (503 with Retry-After past it), and the whole read must end within
        ``body_read_timeout_s`` (408, and the connection is closed).
        """
        s = self.settings
        limit = s.max_body_bytes
        declared = request.content_length
        if declared is not None and declared > limit:
            raise _too_large(limit)
        # With a Content-Encoding, Content-Length counts the compressed bytes while aiohttp
        # hands over decompressed ones: then the length is known only at the end.
        encoded = request.headers.get("Content-Encoding", "identity").lower() != "identity"
        try:
            async with asyncio.timeout(s.body_read_timeout_s):
                if declared is not None and not encoded:  # the common case: one read
                    self._hold(request, declared)
                    return await request.content.readexactly(declared) if declared else b""
                chunks: list[bytes] = []
                size = 0
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        raise _too_large(limit)
                    self._hold(request, len(chunk))
                    chunks.append(chunk)
        except TimeoutError:
            raise Problem(
                408,
                "body_timeout",
                f"the body did not arrive within {s.body_read_timeout_s:g} s",
                close=True,
            ) from None
        except asyncio.IncompleteReadError as e:
            raise Problem(
                400,
                "bad_body",
                f"the body ended after {len(e.partial)} of {declared} bytes (Content-Length)",
            ) from None
        except HttpProcessingError as e:
            raise Problem(400, "bad_body", f"the body could not be read: {e.message}") from None
        return b"".join(chunks)

    def _hold(self, request: web.Request, size: int) -> None:
        """Count ``size`` more body bytes of ``request`` in flight; 503 past the limit."""
        if self.body_bytes + size > self.settings.max_inflight_bytes:
            raise Problem(
                503,
                "overloaded",
                "this server holds as many request bodies as it may; retry later",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        self.body_bytes += size
        request[_HELD] = request.get(_HELD, 0) + size

    async def _take(self, agent: Agent, events: int) -> None:
        """Take ``events`` from the agent's rate bucket; 429 with Retry-After when over."""
        try:
            wait_s = await self.limiter.take(agent.name, events)
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.settings.retry_after_s, e) from e
        if wait_s:
            raise Problem(
                429,
                "rate_limited",
                f"agent {agent.name!r} is over its rate of {self.settings.rate_events_per_s:g} "
                f"events/s (burst {self.settings.rate_burst}); retry in {wait_s}s",
                headers={"Retry-After": str(wait_s)},
            )

    def _allowed(self, agent: Agent) -> dict[str, bool]:
        allowed = self._scopes.get(agent.types)
        if allowed is None:
            allowed = {t.type_name(): agent.may_post(t.type_name()) for t in self.event_types}
            if len(self._scopes) > 1000:
                self._scopes.clear()
            self._scopes[agent.types] = allowed
        return allowed

    async def publish(
        self,
        events: Sequence[Event],
        idempotency_keys: Sequence[str | None] | None,
        dedup: Sequence[bool] | None = None,
    ) -> list[str]:
        """Publish, mapping failures to 503 with Retry-After."""
        try:
            produced = await self.producer.append(
                events, idempotency_keys=idempotency_keys, dedup=dedup
            )
            return [p.entry_id for p in produced]
        except BackpressureError as e:
            retry = max(self.settings.retry_after_s, int(e.waited_s) or 1)
            raise Problem(
                503,
                "backpressure",
                str(e),
                headers={"Retry-After": str(retry)},
                topic=e.topic,
                group=e.group,
            ) from e
        except PublishError as e:
            raise redis_unavailable(self.settings.retry_after_s, e) from e
        except _REDIS_FAILED as e:
            raise redis_unavailable(self.settings.retry_after_s, e) from e

    # ------------------------------------------------------------------ events

    async def post_events(self, request: web.Request) -> web.Response:
        return await self._events(request, None)

    async def post_cluster_events(self, request: web.Request) -> web.Response:
        return await self._events(request, request.match_info["cluster_id"])

    async def _events(self, request: web.Request, cluster_id: str | None) -> web.Response:
        agent = await self.authenticate(request)
        try:
            if cluster_id is not None and not _PATH_CLUSTER_RE.fullmatch(cluster_id):
                # Checked here, not only by the events' schemas: a type without a cluster_id
                # field (worker.*) would carry the path's text on unchecked, into the key.
                raise Problem(
                    422,
                    "invalid_cluster_id",
                    "the path's cluster id must be 1-253 characters without control characters",
                    path="$.cluster_id",  # it is every posted event's cluster_id
                )
            fmt = self.body_format(request)
            idem = idempotency_key(request)
            body = await self.read_body(request)
            prepare: Prepare | None = None
            if cluster_id is not None or idem is not None:
                prepare = _preparer(cluster_id, agent.name, idem)
            events, batch = self.decoder.decode(body, fmt, prepare=prepare)
            allowed = self._allowed(agent)
            denied = [
                (i, e.type_name()) for i, e in enumerate(events) if not allowed[e.type_name()]
            ]
            if denied:
                i = denied[0][0]
                raise Problem(
                    403,
                    "forbidden_type",
                    f"agent {agent.name!r} may not post "
                    + ", ".join(sorted({n for _, n in denied})),
                    path=f"$[{i}].type" if batch else "$.type",
                    allowed=list(agent.types),
                )
            _check_clusters(agent, events, batch)
        except Problem as p:
            if 400 <= p.status < 500:
                # A refused request costs the agent's rate what it carried (its items where
                # they were counted, a whole batch past a size limit, else one event):
                # garbage is no cheaper than events. Over the rate, the answer is 429.
                cost = self.settings.max_batch if p.status == 413 else (p.items or 1)
                await self._take(agent, max(1, min(cost, self.settings.max_batch)))
            raise
        await self._take(agent, len(events))
        now = datetime.now(UTC)
        # An id the sender chose is its own: it becomes an id scoped to the agent (another
        # agent's same text is another event), of fixed length. Ids minted here (or derived
        # from an Idempotency-Key, already the agent's) stay as they are.
        given = self.decoder.ids_given(body, fmt, len(events))
        events = [
            msgspec.structs.replace(
                e,
                id=agent_event_id(agent.name, e.id) if given[i] else e.id,
                source=agent.name,
                received_at=now,
            )
            for i, e in enumerate(events)
        ]
        idem_keys: list[str | None] | None = None
        dedup: list[bool] | None = None
        if idem is not None:
            # The marker of an Idempotency-Key: its own namespace (k:), the agent's, hashed.
            idem_keys = [
                idem_marker(agent.name, idem, i if batch else None) for i in range(len(events))
            ]
        else:  # ids minted here cannot come again: no dedup marker for them
            dedup = given
        entry_ids = await self.publish(events, idem_keys, dedup)
        if len(events) == 1:
            metrics.events(events[0].type_name()).inc()
        else:
            for type_name, n in Counter(e.type_name() for e in events).items():
                metrics.events(type_name).inc(n)
        return json_response(
            {
                "accepted": len(events),
                "received_at": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                "events": [
                    {"id": e.id, "entry_id": entry_id}
                    for e, entry_id in zip(events, entry_ids, strict=True)
                ],
            },
            status=202,
        )

    # ------------------------------------------------------------------ probes

    async def healthz(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        missing: list[str] = []
        try:
            await self.client.ping()
            for topic, wanted in sorted(self.groups.items()):
                have = {g.name for g in await group_infos(self.client, self.keys.stream(topic))}
                missing += [f"{topic}/{g}" for g in wanted if g not in have]
        except _REDIS_FAILED as e:
            log.warning("not_ready", error=f"{type(e).__name__}: {e}")
            return json_response(
                {"ready": False, "redis": False, "detail": "the event store does not answer"},
                status=503,
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        ready = not missing
        return json_response(
            {"ready": ready, "redis": True, "missing_groups": missing}, status=200 if ready else 503
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.spec, content_type="application/json")


def _check_clusters(agent: Agent, events: Sequence[Event], batch: bool) -> None:
    """403 at the first event whose ``cluster_id`` the agent may not speak for (issue 17
    item 3): an event type with a ``cluster_id`` field is about that cluster, and only an agent
    whose ``--clusters`` match it (or an operator) posts it. Types without one are unaffected.
    """
    for i, e in enumerate(events):
        cluster_id = getattr(e, "cluster_id", None)
        if isinstance(cluster_id, str) and not agent.may_speak_for(cluster_id):
            raise Problem(
                403,
                "forbidden_cluster",
                f"agent {agent.name!r} may not post events for cluster {cluster_id[:80]!r}: "
                "its token needs the cluster in --clusters",
                path=f"$[{i}].cluster_id" if batch else "$.cluster_id",
                allowed=list(agent.clusters),
            )


def _too_large(limit: int) -> Problem:
    return Problem(
        413, "body_too_large", f"the body is over the limit of {limit} bytes", limit=limit
    )


#: A cluster id in the path: what the events' names allow (1-253, no control characters).
_PATH_CLUSTER_RE = re.compile(f"[^{CONTROL_CHARS}]{{1,253}}")

#: Namespace of the event ids that stand for the ids agents chose.
_AGENT_ID_NS = uuid.UUID("5e0c7a1d-93b4-4f62-a8d1-2c7e9b40f6a3")


def agent_event_id(agent: str, client_id: str) -> str:
    """The event id for the id ``client_id`` that agent ``agent`` chose: a UUID of the two, so
    agents cannot name (and so dedup away) each other's events, and no text an agent chose goes
    into a Redis key name."""
    return str(uuid.uuid5(_AGENT_ID_NS, f"{agent}\0{client_id}"))


def idem_marker(agent: str, key: str, index: int | None) -> str:
    """The producer's dedup marker of ``agent``'s Idempotency-Key (item ``index`` of a batch):
    ``k:`` and a SHA-256, apart from event ids and from other agents' keys, fixed length."""
    raw = f"{agent}\0{key}" + ("" if index is None else f"\0{index}")
    return "k:" + hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()


def _preparer(cluster_id: str | None, agent: str, idem: str | None) -> Prepare:
    def prepare(index: int, obj: dict[str, Any]) -> None:
        if cluster_id is not None:
            have = obj.get("cluster_id")
            if have is not None and have != cluster_id:
                raise ItemError(
                    f"cluster_id {have!r} differs from the path's {cluster_id!r}",
                    ".cluster_id",
                    "cluster_mismatch",
                )
            obj["cluster_id"] = cluster_id
            if obj.get("key") in (None, ""):  # a key of another type stays, refused (422)
                obj["key"] = cluster_id
        if idem is not None and "id" not in obj:
            obj["id"] = str(uuid.uuid5(_IDEM_NS, f"{agent}:{idem}:{index}"))

    return prepare


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    response: web.StreamResponse
    ingest = request.app[INGEST]
    ingest._enter()
    ingest.connections.request_started(request.transport)
    close = False
    try:
        response = await handler(request)
    except Problem as p:
        metrics.REJECTIONS.labels(p.error).inc()
        response = p.response()
        close = p.close
    except web.HTTPException as e:
        code = (e.reason or "error").lower().replace(" ", "_")
        metrics.REJECTIONS.labels(code).inc()
        headers = {
            k: v for k, v in e.headers.items() if k not in ("Content-Type", "Content-Length")
        }
        response = json_response(
            {"error": code, "detail": e.text}, status=e.status, headers=headers
        )
    except asyncio.CancelledError:
        raise
    except REDIS_DOWN as e:  # a route that does not answer it itself: 503, not 500
        down = redis_unavailable(ingest.settings.retry_after_s, e)
        metrics.REJECTIONS.labels(down.error).inc()
        response = down.response()
    except Exception:
        log.exception("internal_error", path=request.path, method=request.method)
        metrics.REJECTIONS.labels("internal").inc()
        response = json_response({"error": "internal", "detail": "internal error"}, status=500)
    finally:
        ingest._leave()
        ingest.body_bytes -= request.get(_HELD, 0)
        ingest.connections.request_ended(request.transport)
    if ingest.draining:
        response.force_close()
    method = request.method if request.method in _METHODS else "other"
    metrics.answered(route, method, response.status, time.perf_counter() - started)
    if close and request.protocol is not None:
        # The rest of the body is not wanted: answer, then close at once (aiohttp would
        # otherwise read and drop it for up to ``lingering_time``, 10 s).
        response.force_close()
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
    return response


INGEST: web.AppKey[Ingest] = web.AppKey("ingest", Ingest)
#: Body bytes a request holds against ``max_inflight_bytes``.
_HELD: web.RequestKey[int] = web.RequestKey("held_body_bytes", int)


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer of the app (404s, the dashboard, streams) names no versions."""
    response.headers["Server"] = SERVER_NAME


def create_app(
    ingest: Ingest,
    *,
    schedules: Sequence[Schedule] = (),
    routes: Sequence[Callable[[web.Application, Ingest], None]] = (),
    panels: Sequence[Panel] = (),
    dashboard: DashboardSettings | None = None,
    limits: LimitsOf | None = None,
    memory_alert_ratio: float = 0.8,
) -> web.Application:
    """The aiohttp application (the caller owns the Redis client and closes it).

    ``dashboard``: the dashboard's settings (cookie, proxies, login throttle); defaults if None.

    ``schedules``: the application's ticker table, for the dashboard's next fire times.
    ``panels``: the application's dashboard panels (``App.panels``).
    ``limits``: each group's ``Limits`` (``inspect.limits_of(app.concerns)``), which colour
    the dashboard's groups as ``streamproc inspect`` judges them.
    ``memory_alert_ratio``: the dashboard's Redis memory card is high at or above it
    (``RedisSettings.memory_alert_ratio``, as the ingest's ``redis_memory_high`` warning).
    ``routes``: the application's route hooks (``App.routes``), called with the app and this
    ``Ingest``.
    """
    # The trace middleware outside the error one: it sees every answer, refusals included.
    traced = [trace_requests] if tracing.active() else []
    app = web.Application(middlewares=[*traced, _errors_and_metrics])
    app[INGEST] = ingest
    app.on_response_prepare.append(_server_header)
    app.router.add_post("/v1/events", ingest.post_events)
    app.router.add_post("/clusters/{cluster_id}/events", ingest.post_cluster_events)
    ingest.tasks.add_routes(app.router)
    # Seed 003's worker-node routes on the same task API (and JSON /metrics by Accept).
    add_compat_routes(app, ingest, ingest.tasks)
    ingest.schedules.add_routes(app.router)
    app.router.add_get("/healthz", ingest.healthz)
    app.router.add_get("/readyz", ingest.readyz)
    app.router.add_get("/metrics", ingest.metrics)
    app.router.add_get("/openapi.json", ingest.openapi)
    from streamproc.dashboard import add_dashboard  # here: the dashboard imports ingest modules

    add_dashboard(
        app,
        client=ingest.client,
        keys=ingest.keys,
        agents=ingest.agents,
        settings=dashboard,
        schedules=schedules,
        panels=panels,
        draining=lambda: ingest.draining,
        limits=limits,
        memory_alert_ratio=memory_alert_ratio,
    )
    for add_routes in routes:
        add_routes(app, ingest)
    return app
