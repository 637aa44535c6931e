"""Helpers shared by the ingest and task tests: a real ingest server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestServer

from schemas import REGISTRY
from streamproc import Keys, Producer
from streamproc.ingest import AgentStore, Ingest, IngestSettings, create_app
from streamproc.tasks import TaskType

__all__ = ("Server", "cluster_event", "running_ingest")


def cluster_event(**over: Any) -> dict[str, Any]:
    """A valid cluster.spot_interruption body."""
    body: dict[str, Any] = {
        "type": "cluster.spot_interruption",
        "cluster_id": "c1",
        "instance_id": "i-0abc",
        "instance_type": "m5.large",
        "availability_zone": "eu-west-1a",
    }
    body.update(over)
    return body


class Server:
    """A running ingest app, a client session to it, and a way to mint tokens."""

    def __init__(
        self, server: TestServer, session: aiohttp.ClientSession, ingest: Ingest, keys: Keys
    ) -> None:
        self.server, self.session, self.ingest, self.keys = server, session, ingest, keys
        self.url = str(server.make_url("")).rstrip("/")
        self.agents = AgentStore(ingest.client, keys, cache_s=0)

    async def token(
        self,
        name: str,
        types: Sequence[str] = ("*",),
        *,
        operator: bool = False,
        submit: Sequence[str] = (),
        clusters: Sequence[str] = ("*",),
    ) -> str:
        """A token for ``name``; by default it posts every type for every cluster."""
        _, token = await self.agents.add(
            name, types=types, operator=operator, submit=submit, clusters=clusters
        )
        return token

    async def post(
        self,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        method: str = "POST",
    ) -> tuple[int, Any, Mapping[str, str]]:
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        kwargs: dict[str, Any] = {"headers": h}
        if data is None and body is not None:
            data = orjson.dumps(body)
            h.setdefault("Content-Type", "application/json")
        if data is not None:
            # aiohttp warns about large raw bytes bodies; a file-like object is streamed.
            kwargs["data"] = io.BytesIO(data) if len(data) > 256 * 1024 else data
        async with self.session.request(method, self.url + path, **kwargs) as r:
            raw = await r.read()
            try:
                parsed: Any = await r.json(content_type=None) if raw else None
            except ValueError:
                parsed = raw.decode(errors="replace")
            return r.status, parsed, r.headers


@contextlib.asynccontextmanager
async def running_ingest(
    client: aioredis.Redis,
    keys: Keys,
    producer: Producer,
    *,
    task_types: Mapping[str, TaskType] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    routes: Sequence[Callable[[web.Application, Ingest], None]] = (),
    memory_alert_ratio: float = 0.8,
    **settings: Any,
) -> AsyncIterator[Server]:
    """An ingest server on 127.0.0.1 (``routes``: the app's route hooks, as ``App.routes``;
    ``memory_alert_ratio``: the dashboard's, as ``create_app``'s)."""
    ingest = Ingest(
        client=client,
        registry=REGISTRY,
        keys=keys,
        producer=producer,
        settings=IngestSettings(**{"auth_cache_s": 0.0, **settings}),
        task_types=task_types,
        groups=groups,
    )
    app: web.Application = create_app(ingest, routes=routes, memory_alert_ratio=memory_alert_ratio)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Server(server, session, ingest, keys)
    finally:
        await server.close()
