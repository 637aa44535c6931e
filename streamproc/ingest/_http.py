"""JSON error answers: every refusal is ``{"error": code, "detail": ..., "path": ...}``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web

from streamproc import tracing

__all__ = (
    "SERVER_NAME",
    "Problem",
    "check_query",
    "idempotency_key",
    "json_response",
    "redis_unavailable",
    "trace_requests",
)

log = structlog.get_logger("streamproc.ingest")

#: The ``Server`` header of every answer: no product versions for a caller to match
#: against known vulnerabilities.
SERVER_NAME = "streamproc"


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


class Problem(Exception):
    """A request that is refused: raised anywhere in a handler, answered by the middleware.

    ``error`` is a short machine-readable code (also the ``reason`` label of the rejection
    metric); ``detail`` says why, for a person; ``path`` is the JSON path of the bad value.
    """

    def __init__(
        self,
        status: int,
        error: str,
        detail: Any,
        *,
        path: str | None = None,
        headers: dict[str, str] | None = None,
        close: bool = False,
        **extra: Any,
    ) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status, self.error, self.detail, self.path = status, error, detail, path
        self.headers, self.extra = headers, extra
        #: How many items the refused request held, where it was counted: what the refusal
        #: costs against the agent's rate (not sent).
        self.items: int | None = None
        #: Close the connection after the answer (a body that will not be read).
        self.close = close

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.error, "detail": self.detail}
        if self.path is not None:
            body["path"] = self.path
        body.update(self.extra)
        return json_response(body, status=self.status, headers=self.headers)


def redis_unavailable(retry_after_s: int, e: BaseException) -> Problem:
    """The 503 for a Redis failure: a fixed text outward, the error itself only in the log.

    Redis' messages name internal hosts and ports (``Error 111 connecting to
    10.0.3.7:6379``), and callers may be unauthenticated.
    """
    log.warning("redis_unavailable", error=f"{type(e).__name__}: {e}")
    return Problem(
        503,
        "redis_unavailable",
        "the event store is unavailable; retry later",
        headers={"Retry-After": str(retry_after_s)},
    )


def idempotency_key(request: web.Request) -> str | None:
    """The ``Idempotency-Key`` header: 1-200 printable ASCII characters, no spaces."""
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200 or not key.isascii() or not key.isprintable() or " " in key:
        raise Problem(
            400,
            "bad_idempotency_key",
            "Idempotency-Key must be 1-200 printable ASCII characters without spaces",
        )
    return key


def check_query(request: web.Request, allowed: frozenset[str]) -> None:
    """400 ``invalid_query`` naming the first query parameter the route does not take: an
    ignored parameter would hide a client's typo (``?stauts=failed`` listing everything)."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise Problem(
            400,
            "invalid_query",
            f"unknown query parameter {unknown[0][:64]!r}; this route takes "
            + ", ".join(sorted(allowed)),
            path=unknown[0][:64],
        )


#: Not traced: probes and scrapes, and the dashboard's reads (its polling and event stream);
#: a span every few seconds from each would bury the requests that publish.
_UNTRACED = frozenset(("/healthz", "/readyz", "/metrics"))


@web.middleware
async def trace_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """A SERVER span per request (``streamproc.tracing``, installed while tracing is on),
    continuing an incoming ``traceparent`` header; the events the request publishes carry it."""
    path = request.path
    if path in _UNTRACED or (request.method == "GET" and path.startswith("/dashboard")):
        return await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else None
    attributes = {"http.request.method": request.method, "url.path": path}
    if route is not None:
        attributes["http.route"] = route
    # OpenTelemetry's HTTP conventions: "{method} {route}" (the route, not the path: few names).
    name = f"{request.method} {route}" if route is not None else request.method
    with tracing.server_span(name, request.headers, attributes) as span:
        response = await handler(request)
        tracing.answered(span, response.status)
        return response
