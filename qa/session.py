"""A crawl session's state in Redis, for clients to follow (seed 004's ``SessionManager``).

``<p>:state:{qa}:session:<id>`` (a hash, kept ``session_ttl_s`` = 24 h after its last update):
``status`` (``running``, ``completed``, ``partial`` — stopped at its time limit with what it
had —, ``failed``), ``task_id``, ``base_url``, ``pages_crawled``, ``bugs_found``, ``browser``,
``errors`` (a JSON list, the last 20), ``started_at``, ``updated_at``, ``finished_at``. A
finished session is also put in ``<p>:state:{qa}:sessions`` (scored by when it finished) for the
daily cleanup. Every change is one MULTI (the hash, its TTL and the index together).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import redis.asyncio as aioredis

from qa import _keys
from qa.settings import settings
from streamproc.keys import Keys

__all__ = ("SessionStore",)

#: Errors kept in the hash (the newest).
MAX_ERRORS = 20


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class SessionStore:
    def __init__(self, client: aioredis.Redis, keys: Keys, session_id: str) -> None:
        self.client, self.keys, self.session_id = client, keys, session_id
        self.key = _keys.session(keys, session_id)
        self.errors: list[str] = []

    async def _write(self, fields: dict[str, Any], *, finished_ms: int | None = None) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            mapping: dict[Any, Any] = {**fields, "updated_at": _now()}
            pipe.hset(self.key, mapping=mapping)
            pipe.expire(self.key, settings().session_ttl_s)
            if finished_ms is not None:
                pipe.zadd(_keys.sessions(self.keys), {self.session_id: finished_ms})
            await pipe.execute()

    async def start(self, *, task_id: str, base_url: str, attempt: int) -> None:
        """The session is running (again, on a retry: its counters start over)."""
        self.errors = []
        await self._write(
            {
                "session_id": self.session_id,
                "status": "running",
                "task_id": task_id,
                "base_url": base_url,
                "attempt": attempt,
                "pages_crawled": 0,
                "bugs_found": 0,
                "errors": "[]",
                "started_at": _now(),
                "finished_at": "",
            }
        )

    async def progress(self, *, pages_crawled: int, bugs_found: int, **extra: Any) -> None:
        await self._write({"pages_crawled": pages_crawled, "bugs_found": bugs_found, **extra})

    async def error(self, message: str) -> None:
        """Note an error the session goes on after (a page that failed in the browser)."""
        self.errors = [*self.errors, message[:500]][-MAX_ERRORS:]
        await self._write({"errors": msgspec.json.encode(self.errors).decode()})

    async def finish(
        self, status: str, *, pages_crawled: int, bugs_found: int, error: str = ""
    ) -> None:
        if error:
            self.errors = [*self.errors, error[:500]][-MAX_ERRORS:]
        finished = datetime.now(UTC)
        await self._write(
            {
                "status": status,
                "pages_crawled": pages_crawled,
                "bugs_found": bugs_found,
                "errors": msgspec.json.encode(self.errors).decode(),
                "finished_at": finished.isoformat(timespec="milliseconds"),
            },
            finished_ms=int(finished.timestamp() * 1000),
        )

    @staticmethod
    async def get(client: aioredis.Redis, keys: Keys, session_id: str) -> dict[str, Any] | None:
        """The session as a dict (counters as ints, errors as a list); None when unknown."""
        raw: Any = await client.hgetall(_keys.session(keys, session_id))
        if not raw:
            return None
        out: dict[str, Any] = {k.decode(): v.decode(errors="replace") for k, v in raw.items()}
        for k in ("pages_crawled", "bugs_found", "attempt"):
            out[k] = int(out.get(k) or 0)
        out["errors"] = msgspec.json.decode(out.get("errors") or "[]")
        return out
