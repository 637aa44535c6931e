"""What the QA tests serve and run: a small site with known bugs, a fake Linear GraphQL
endpoint, and the QA task runners (real consumers of the queues ``crawl``, ``tickets``,
``media``). Everything listens on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import redis.asyncio as aioredis
from aiohttp import web

import qa
from qa.settings import QaSettings, use_settings
from streamproc import Codec, Consumer, ConsumerSettings, Keys, Producer
from streamproc.tasks import TaskStore, TaskType, TaskView, task_concerns, task_event_class

__all__ = (
    "FakeLinear",
    "Site",
    "qa_settings",
    "run_until_settled",
    "runners",
    "serve",
    "submit",
)

PAGE = "<!doctype html><html><head><title>{title}</title></head><body>{body}</body></html>"


def html(title: str, *links: str, extra: str = "") -> web.Response:
    body = "".join(f'<a href="{h}">{h}</a> ' for h in links) + extra
    return web.Response(text=PAGE.format(title=title, body=body), content_type="text/html")


def page(title: str, *links: str) -> Any:
    """A handler answering the same page every time."""

    async def handler(_: web.Request) -> web.Response:
        return html(title, *links)

    return handler


def answer(resp: web.Response | type[web.HTTPException], *args: Any) -> Any:
    async def handler(_: web.Request) -> web.Response:
        if isinstance(resp, web.Response):
            return resp
        raise resp(*args)

    return handler


class Site:
    """The site under test. Every request's path is recorded (``fetched``)."""

    def __init__(self, *, slow_s: float = 0.0) -> None:
        self.fetched: list[str] = []
        self.slow_s = slow_s
        self.in_flight = self.most_in_flight = 0
        self.crawl_delay_s = 0
        self.app = web.Application(middlewares=[self._record])
        r = self.app.router
        r.add_get("/robots.txt", self.robots)
        r.add_get("/", self.index)
        r.add_get("/about", page("About", "/", "/about#team", "/contact"))
        r.add_get("/contact", page("Contact", "/", "mailto:qa@example.invalid"))
        r.add_get("/error", self.error)
        r.add_get("/js-error", self.js_error)
        r.add_get("/old", answer(web.HTTPFound, "/about"))
        r.add_get("/away", answer(web.HTTPFound, "http://elsewhere.invalid/"))
        r.add_get("/deep/{n}", self.deep)
        r.add_get("/private/{name}", page("Secret"))
        r.add_get("/slow/{n}", self.slow)
        r.add_get("/logo.png", self.logo)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.fetched.append(request.path_qs)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            resp: web.StreamResponse = await handler(request)
        finally:
            self.in_flight -= 1
        return resp

    async def logo(self, _: web.Request) -> web.Response:
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    async def robots(self, _: web.Request) -> web.Response:
        delay = f"Crawl-delay: {self.crawl_delay_s}\n" if self.crawl_delay_s else ""
        return web.Response(text=f"User-agent: *\nDisallow: /private/\n{delay}")

    async def index(self, _: web.Request) -> web.Response:
        return html(
            "Home",
            "/about",
            "/missing",
            "/error",
            "/js-error",
            "/deep/1",
            "/private/secret",
            "/old",
            "/away",
            "/logo.png",
            "http://elsewhere.invalid/page",
            "javascript:void(0)",
        )

    async def error(self, _: web.Request) -> web.Response:
        return web.Response(status=500, text="<h1>Internal error</h1>", content_type="text/html")

    async def js_error(self, _: web.Request) -> web.Response:
        script = "<script>console.error('boom: checkout failed'); undefinedFunction();</script>"
        return html("JS", "/", extra=script)

    async def deep(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        return html(f"Deep {n}", f"/deep/{n + 1}")

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.slow_s)
        return html("Slow", "/")

    def saw(self, path: str) -> bool:
        return path in self.fetched


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free 127.0.0.1 port; its base URL."""
    # Handlers still sleeping (slow pages, a lost answer) are not waited for at the end.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


class FakeLinear:
    """Linear's GraphQL ``issueCreate`` / ``issue(id:)``, as far as ``qa.tickets`` uses them:
    an issue's id is the client's, and a second ``issueCreate`` with an existing id is
    refused. ``lose`` answers of issueCreate are lost (created, then answered too late);
    ``limited`` requests get 429 with ``Retry-After: 1``; ``linear_limited`` get Linear's own
    400 ``RATELIMITED`` answer."""

    API_KEY = "lin_api_test"

    def __init__(self) -> None:
        self.issues: dict[str, dict[str, Any]] = {}
        self.creates = self.lookups = self.refused = 0
        self.lose = self.limited = self.linear_limited = 0
        self.app = web.Application()
        self.app.router.add_post("/graphql", self.graphql)

    async def graphql(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != self.API_KEY:
            return web.json_response(
                {"errors": [{"message": "Authentication required",
                             "extensions": {"code": "AUTHENTICATION_ERROR"}}]},
                status=401,
            )  # fmt: skip
        if self.limited:
            self.limited -= 1
            return web.json_response(
                {"error": "slow down"}, status=429, headers={"Retry-After": "1"}
            )
        if self.linear_limited:
            self.linear_limited -= 1
            return web.json_response(
                {"errors": [{"message": "Rate limit exceeded",
                             "extensions": {"code": "RATELIMITED"}}]},
                status=400,
                headers={"X-RateLimit-Requests-Reset": "0"},
            )  # fmt: skip
        body = await request.json()
        query, variables = body["query"], body.get("variables") or {}
        if "issueCreate" in query:
            self.creates += 1
            data = variables["input"]
            if data["id"] in self.issues:
                self.refused += 1
                return web.json_response(
                    {"data": None, "errors": [{"message": "Entity already exists",
                                               "extensions": {"code": "INVALID_INPUT"}}]},
                    status=400,
                )  # fmt: skip
            n = len(self.issues) + 1
            issue = {
                "id": data["id"],
                "identifier": f"QA-{n}",
                "url": f"https://linear.invalid/issue/QA-{n}",
                "title": data["title"],
                "description": data["description"],
                "teamId": data["teamId"],
            }
            self.issues[data["id"]] = issue
            if self.lose:
                self.lose -= 1
                await asyncio.sleep(5)  # past the client's read timeout: the answer is lost
            public = {k: issue[k] for k in ("id", "identifier", "url")}
            return web.json_response({"data": {"issueCreate": {"success": True, "issue": public}}})
        if "issue(" in query:
            self.lookups += 1
            found = self.issues.get(variables["id"])
            if found is None:
                return web.json_response(
                    {"data": None, "errors": [{"message": "Entity not found: Issue",
                                               "extensions": {"code": "INVALID_INPUT"}}]},
                )  # fmt: skip
            public = {k: found[k] for k in ("id", "identifier", "url")}
            return web.json_response({"data": {"issue": public}})
        return web.json_response({"errors": [{"message": "unknown operation"}]}, status=400)


@contextlib.contextmanager
def qa_settings(**kw: Any) -> Iterator[QaSettings]:
    """QA settings for one test (fast, unthrottled), then the defaults again."""
    base: dict[str, Any] = {
        "per_host_rate_per_s": 0.0,
        "browser": "off",
        "allow_private_networks": True,  # the test's site is on 127.0.0.1
    }
    try:
        yield use_settings(QaSettings(**{**base, **kw}))
    finally:
        use_settings(None)


def runners(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    codec: Codec[Any],
    **overrides: dict[str, Any],
) -> dict[str, Consumer]:
    """One runner per QA queue (``crawl``, ``tickets``, ``media``); ``overrides[type name]``:
    TaskType fields to change for the test (e.g. a short retry backoff)."""
    types: dict[str, TaskType] = {
        name: dataclasses.replace(t, **overrides.get(name.replace(".", "_"), {}))
        for name, t in qa.TASK_TYPES.items()
    }
    out = {}
    for concern in task_concerns(types):
        queue = concern.group.removeprefix("tasks-")
        out[queue] = Consumer(
            concern,
            client=client,
            codec=codec,
            keys=keys,
            producer=producer,
            settings=ConsumerSettings(consumer=f"qa-{queue}", block_ms=20, min_idle_ms=60_000),
        )
    return out


async def submit(
    client: aioredis.Redis, keys: Keys, producer: Producer, type_name: str, task_id: str,
    payload: dict[str, Any],
) -> None:  # fmt: skip
    """What ``POST /v1/tasks`` does, without the HTTP server."""
    tt = qa.TASK_TYPES[type_name]
    checked = msgspec.to_builtins(msgspec.convert(payload, tt.payload_type))
    await TaskStore(client, keys).create(
        task_id, type=type_name, priority="normal", submitted_by="t"
    )
    await producer.publish(
        task_event_class("normal", tt.queue)(id=task_id, task_type=type_name, payload=checked)
    )


async def run_until_settled(
    runner: Consumer, store: TaskStore, task_ids: list[str], *, rounds: int = 2_000
) -> list[TaskView]:
    """Drive ``runner`` one step at a time until every task ended (retries included)."""
    for _ in range(rounds):
        views = [await store.get(t) for t in task_ids]
        if all(v is not None and v.status in ("completed", "failed", "cancelled") for v in views):
            return [v for v in views if v is not None]
        await runner.process_once(block_ms=20)
    raise AssertionError(f"tasks not settled: {[await store.get(t) for t in task_ids]}")
