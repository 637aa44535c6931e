"""A webhook receiver for tests: a real aiohttp server on 127.0.0.1 that answers from a script.

``Receiver.plan`` is a list of answers used in order, one per request (then ``default``):
``200``, ``500``, ``(429, "2")`` (status, Retry-After), ``400``, ``"hang"`` (answers after
``hang_s``). It verifies every Standard Webhooks signature with the reference package when it
has the secret, and keeps what it received: every request, and the distinct webhook ids.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

Answer = int | str | tuple[int, str]


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    verified: bool | None
    #: What it was answered (0 until answered).
    status: int = 0
    #: When it arrived (this host's clock, which the local Redis shares).
    arrived_at: float = field(default_factory=time.time)

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")

    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Receiver:
    plan: list[Answer] = field(default_factory=list)
    default: Answer = 200
    secret: str | None = None
    hang_s: float = 5.0
    #: Seconds each answer takes (a slow destination, for the benchmark).
    latency_s: float = 0.0
    received: list[Received] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._arrived = asyncio.Condition()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        verified: bool | None = None
        if self.secret is not None:
            try:
                Webhook(self.secret).verify(body, headers)
                verified = True
            except WebhookVerificationError:
                verified = False
        got = Received(request.path, headers, body, verified)
        self.received.append(got)
        answer = self.plan.pop(0) if self.plan else self.default
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        assert self._arrived is not None
        async with self._arrived:
            self._arrived.notify_all()
        if answer == "hang":
            await asyncio.sleep(self.hang_s)
            answer = 200
        headers_out: dict[str, str] = {}
        if isinstance(answer, tuple):
            status, retry_after = answer
            headers_out["Retry-After"] = retry_after
        else:
            status = int(answer)
        got.status = status
        self.answered.append(status)
        return web.Response(
            status=status, text="ok" if status < 300 else "nope", headers=headers_out
        )

    def ids(self) -> Counter[str]:
        """How often each webhook id arrived."""
        return Counter(r.webhook_id for r in self.received)

    def accepted_ids(self) -> Counter[str]:
        """Webhook ids of requests answered 2xx (what a deduplicating receiver keeps)."""
        return Counter(r.webhook_id for r in self.received if 200 <= r.status < 300)

    async def wait_for(self, n: int, timeout_s: float = 20.0) -> None:
        """Until ``n`` requests arrived."""
        assert self._arrived is not None

        async def enough() -> None:
            assert self._arrived is not None
            async with self._arrived:
                await self._arrived.wait_for(lambda: len(self.received) >= n)

        await asyncio.wait_for(enough(), timeout_s)
