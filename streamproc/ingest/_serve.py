"""The listening side of ingest: connections that cannot be held open for free.

aiohttp closes a connection that is idle between requests (``keepalive_timeout``) but sets
no deadline on a request's headers and no cap on connections: a client that sends a header
line every few seconds keeps a connection (and a file descriptor) for as long as it likes.
Here each connection is a ``_Guard`` around aiohttp's own protocol:

- a new connection must complete its first request's headers within
  ``header_read_timeout_s``, and every later request its headers within that from its first
  byte; the request handler (the app's middleware) calls ``request_started`` and
  ``request_ended``, so the body and the answer are not under this deadline (the body has
  ``body_read_timeout_s``);
- at most ``max_connections`` are open (and never more than the open-files limit allows):
  a new one past the cap closes the connection idle the longest (waiting for headers or
  for its next request; nginx does the same with its keep-alive connections), or is
  closed at once when every connection is handling a request.
"""

from __future__ import annotations

import asyncio
import resource
from collections.abc import Callable

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from streamproc.ingest.settings import IngestSettings

__all__ = ("Connections", "GuardedSite", "make_runner")

log = structlog.get_logger("streamproc.ingest")

#: File descriptors kept free of connections (Redis pool, logs, the listening socket).
_FD_RESERVE = 128


def make_runner(app: web.Application, settings: IngestSettings) -> web.AppRunner:
    """aiohttp's runner with the ingest timeouts (no access log: metrics count requests)."""
    return web.AppRunner(
        app, access_log=None, shutdown_timeout=1.0, keepalive_timeout=settings.keepalive_timeout_s
    )


def fd_cap(wanted: int) -> int:
    """``wanted``, lowered so connections leave ``_FD_RESERVE`` descriptors of the soft limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - _FD_RESERVE))


class Connections:
    """The open connections of a process: the cap, and a deadline on each request's headers."""

    def __init__(self, *, header_read_timeout_s: float, max_connections: int) -> None:
        self.header_read_timeout_s = header_read_timeout_s
        self.max_connections = max_connections
        #: transport → its guard, oldest first.
        self.open: dict[asyncio.BaseTransport, _Guard] = {}
        #: Connections closed for their headers' deadline, evicted at the cap, refused.
        self.timed_out = self.evicted = self.refused = 0

    def protocol_factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        """What ``loop.create_server`` calls per accepted connection."""

        def make() -> asyncio.Protocol:
            if len(self.open) >= self.max_connections and not self._evict_idlest():
                self.refused += 1
                return _Refused()
            return _Guard(self, server())

        return make

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.busy = True
            guard.disarm()

    def request_ended(self, transport: asyncio.BaseTransport | None) -> None:
        guard = self.open.get(transport) if transport is not None else None
        if guard is not None:
            guard.busy = False
            guard.last_active = asyncio.get_running_loop().time()

    def _evict_idlest(self) -> bool:
        idle = [g for g in self.open.values() if not g.busy]
        if not idle:
            return False
        victim = min(idle, key=lambda g: g.last_active)
        self.evicted += 1
        victim.close()
        return True


class _Refused(asyncio.Protocol):
    """Past the cap with every connection busy: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Guard(asyncio.Protocol):
    """One connection: aiohttp's protocol inside, a deadline on each request's headers."""

    def __init__(self, connections: Connections, inner: RequestHandler) -> None:
        self._connections, self._inner = connections, inner
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.BaseTransport | None = None
        #: Handling a request (headers complete): no header deadline.
        self.busy = False
        self.last_active = self._loop.time()

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self._connections.open[transport] = self
        self._inner.connection_made(transport)
        self._arm()  # the first request's headers, from the connect

    def data_received(self, data: bytes) -> None:
        self.last_active = self._loop.time()
        if self._timer is None and not self.busy:
            self._arm()  # the first bytes of a request: its headers from now
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        self.disarm()
        if self.transport is not None:
            self._connections.open.pop(self.transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # ---------------------------------------------------------------- deadline

    def _arm(self) -> None:
        self._timer = self._loop.call_later(
            self._connections.header_read_timeout_s, self._headers_late
        )

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        self._connections.timed_out += 1
        self.close()

    def close(self) -> None:
        self.disarm()
        if self.transport is not None:
            self._connections.open.pop(self.transport, None)
            self.transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections go through ``connections`` (see the module doc).

    ``port=0`` binds a free port; ``port`` says which once started.
    """

    __slots__ = ("_bound", "_connections", "_host", "_port", "_reuse_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        connections: Connections,
        *,
        host: str,
        port: int,
        reuse_port: bool = False,
        backlog: int = 2048,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._connections, self._host, self._port = connections, host, port
        self._reuse_port, self._bound = reuse_port, port

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._bound}"

    @property
    def port(self) -> int:
        return self._bound

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting the site")
        self._server = await asyncio.get_running_loop().create_server(
            self._connections.protocol_factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_port=self._reuse_port or None,
        )
        self._bound = self._server.sockets[0].getsockname()[1]
