"""Lua scripts sent as EVALSHA inside pipelines, loaded once.

redis-py's registered scripts send SCRIPT EXISTS before every pipeline that uses them: one
more round trip per batch on the hot path. Here a script is loaded once (SCRIPT LOAD); when a
pipeline answers NOSCRIPT (Redis restarted or SCRIPT FLUSH), the caller loads it again and
sends the whole pipeline again, which is safe because every streamproc script is idempotent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

__all__ = ("Lua", "with_scripts")

T = TypeVar("T")


class Lua:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def queue(self, pipe: Any, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Add an EVALSHA of this script to a pipeline (a Redis Cluster pipeline, which
        blocks ``evalsha``, sends it to the node of the first key's slot)."""
        pipe.execute_command("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(
        self, client: aioredis.Redis, keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        """Run it alone (loading it first if the server does not know it)."""
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


async def with_scripts(
    client: aioredis.Redis, scripts: Sequence[Lua], send: Callable[[], Awaitable[T]]
) -> T:
    """Run ``send`` (which executes a pipeline of EVALSHAs); on NOSCRIPT load and send again."""
    try:
        return await send()
    except NoScriptError:
        for s in scripts:
            await client.script_load(s.source)
        return await send()
