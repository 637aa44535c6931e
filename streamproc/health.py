"""The small HTTP server of every long-running role: ``/metrics``, ``/healthz``, ``/readyz``.

- ``/healthz`` (liveness): 200 while the event loop answers, with its last measured lag.
- ``/readyz`` (readiness): 200 when ``ready()`` is true (e.g. Redis reachable and the groups
  exist), else 503 — a load balancer or Kubernetes stops sending work, nothing restarts.
- ``/metrics``: the Prometheus text format of ``registry``; each ``before_scrape`` coroutine
  runs first (e.g. ``ConsumerCollector.refresh`` reads XINFO GROUPS, cached).

Any role starts it with ``start_http_server(port=…, ready=…)`` (the ticker and ingest too);
``start_consumer_http`` wires in the consumers' collector. Port 0 binds a free port
(``server.port`` says which). The host defaults to 127.0.0.1; containers pass 0.0.0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from streamproc.consumer import Consumer
from streamproc.keys import Keys
from streamproc.metrics import ConsumerCollector
from streamproc.offload import LoopLagMonitor

__all__ = ("HealthServer", "start_consumer_http", "start_http_server")

log = structlog.get_logger("streamproc.health")


class HealthServer:
    """A running server; ``await close()`` stops it (and what it started)."""

    def __init__(
        self,
        runner: web.AppRunner,
        port: int,
        lag_task: asyncio.Task[None],
        on_close: Sequence[Callable[[], None]] = (),
    ) -> None:
        self.runner, self.port, self._lag_task = runner, port, lag_task
        self._on_close = list(on_close)

    async def close(self) -> None:
        await self.runner.cleanup()
        await _cancel(self._lag_task)
        for fn in self._on_close:
            fn()
        self._on_close.clear()


async def start_http_server(
    *,
    port: int,
    ready: Callable[[], bool],
    host: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
    before_scrape: Sequence[Callable[[], Awaitable[None]]] = (),
) -> HealthServer:
    """Serve /metrics, /healthz and /readyz on host:port (0: a free port)."""
    # Event-loop lag: streamproc_event_loop_lag_seconds in the default registry.
    monitor = LoopLagMonitor(interval_s=0.25, keep=1)
    lag_task = asyncio.create_task(monitor.run())

    async def metrics(_: web.Request) -> web.Response:
        for fn in before_scrape:
            await fn()
        return web.Response(
            body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        lag_s = monitor.samples_s[-1] if monitor.samples_s else 0.0
        return web.json_response({"status": "ok", "loop_lag_s": round(lag_s, 4)})

    async def readyz(_: web.Request) -> web.Response:
        ok = bool(ready())
        return web.json_response({"ready": ok}, status=200 if ok else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        await _cancel(lag_task)
        raise
    bound = int(runner.addresses[0][1]) if runner.addresses else port
    log.info("http_listening", host=host, port=bound)
    return HealthServer(runner, bound, lag_task)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def start_consumer_http(
    consumers: Sequence[Consumer],
    client: aioredis.Redis,
    keys: Keys,
    *,
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
) -> HealthServer:
    """The server of ``streamproc consume``: ready when every consumer is ready."""
    collector = ConsumerCollector(consumers, client, keys)
    registry.register(collector)
    try:
        server = await start_http_server(
            port=port,
            host=host,
            registry=registry,
            ready=lambda: all(c.ready for c in consumers),
            before_scrape=[collector.refresh],
        )
    except BaseException:
        registry.unregister(collector)
        raise
    server._on_close.append(lambda: registry.unregister(collector))
    return server
