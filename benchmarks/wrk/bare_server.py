"""Baselines for ingest-wrk.sh: bare aiohttp on uvloop, the least an HTTP endpoint costs here.

    python benchmarks/wrk/bare_server.py PORT noop|xadd REDIS_URL

``noop`` reads the body and answers 202 with a small JSON body; ``xadd`` also appends the
body to a stream with one redis-py XADD per request (no auth, validation, dedup or batching).
"""

from __future__ import annotations

import asyncio
import sys

import orjson
import redis.asyncio as aioredis
import uvloop
from aiohttp import web


async def main(port: int, mode: str, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        entry_id: bytes | str = "0-0"
        if mode == "xadd":
            entry_id = await client.xadd("bare", {"data": body})
        if isinstance(entry_id, bytes):
            entry_id = entry_id.decode()
        return web.Response(
            body=orjson.dumps({"accepted": 1, "entry_id": entry_id}),
            status=202,
            content_type="application/json",
        )

    app = web.Application()
    app.router.add_post("/v1/events", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
